"""The float8 settings (the config's `fp8` section; the trainer's schema takes it from here, since fp8/ may
not import the trainer)."""

from dataclasses import dataclass, field


@dataclass
class Float8Config:
    """torchao float8 training of the transformer blocks' linear layers (fp8/). The output head, layers
    whose sizes are not multiples of 16 and names in filter_fqns stay in the training dtype."""

    enabled: bool = False
    # tensorwise: one scale per tensor, the fastest, and the only one with float8 all-gather and float8
    # tensor parallel; rowwise: a scale per row (more accurate, slower); rowwise_with_gw_hp: rowwise with
    # the weight gradient's matmul in high precision (the most accurate).
    recipe: str = "tensorwise"
    # FSDP2 gathers the float8 weights (1 byte each) instead of the training dtype's; their scales are
    # computed for all layers at once after each optimizer step. tensorwise only.
    fsdp_float8_all_gather: bool = False
    # Linear layers whose name contains any of these strings stay in high precision.
    filter_fqns: list[str] = field(default_factory=list)
    # Also keep the layers that torchao's own size filter finds too small to gain from float8 (thresholds
    # measured on H100; tensorwise and rowwise).
    auto_filter_small_kn: bool = False
    # Compute the float8 matmuls in high precision (float8 numerics, not its speed): for CPU runs and tests,
    # or GPUs older than compute capability 8.9.
    emulate: bool = False
