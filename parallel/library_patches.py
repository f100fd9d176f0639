"""Every change the project makes to a library's global state, and every private torch / torchao name it
relies on, in one place (tests/unit/test_library_patches.py resolves each name and fails loudly when a
library moves one).

A global change happens only while a run that needs it is built and trains: each is a context manager
that the trainer enters for the run's lifetime and that restores what it changed on exit. Nothing here
runs from --check or --dry-run. One exception: the import-noise filter at the end, which the entry points
install for the process's life; it drops two messages and changes no behaviour. This module imports torch
only inside its functions: train.py installs that filter before it reports a config mistake, which must
not wait for torch.
"""

import contextlib
import importlib
import logging
import warnings

# dotted name -> where the project uses it and why it cannot use a public one.
PRIVATE_NAMES = {
    "torch.optim.optimizer._get_fused_kernels_supported_devices":
        "trainer/optimizer.py: whether torch has a fused AdamW kernel for the device (no public query)",
    "torch.cpu._is_amx_tile_supported": "trainer/precision.py: bf16 by default only on CPUs with bf16 matmul units",
    "torch.cpu._is_avx512_bf16_supported": "trainer/precision.py: likewise",
    "torch.distributed.device_mesh.DeviceMesh._flatten":
        "parallel/mesh.py: one flattened data-parallel mesh (slicing it from the root again is deprecated)",
    "torch.ops.aten._scaled_dot_product_flash_attention": "parallel/ac.py: attention outputs selective AC keeps",
    "torch.ops.aten._scaled_dot_product_efficient_attention": "parallel/ac.py: likewise",
    "torch.ops.aten._scaled_dot_product_cudnn_attention": "parallel/ac.py: likewise",
    "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu":
        "parallel/ac.py: likewise; models/common/causal_runs.py: the log-sum-exp public SDPA does not return",
    "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward":
        "models/common/causal_runs.py: each block's gradient against the merged output",
    "torch.ops._c10d_functional.reduce_scatter_tensor":
        "parallel/ac.py: TP's reduce-scatter output is kept, not communicated again in recompute",
    "torch.ops._c10d_functional.all_gather_into_tensor": "float8_all_gather_over_gloo below",
    "torch.distributed._functional_collectives.all_gather_single_autograd":
        "parallel/cp.py: a differentiable, compile-traceable all-gather of keys and values (no public one)",
    "torch._grouped_mm": "models/common/moe.py: one matmul over every expert's tokens (no public grouped matmul)",
    "torch.ops.aten._grouped_mm": "parallel/ac.py: the experts' matmul outputs selective AC keeps",
    "torch.ops._c10d_functional_autograd.all_to_all_single":
        "parallel/ac.py: expert parallelism's all-to-all output is kept, not communicated again in recompute",
    "torch.distributed._functional_collectives.all_to_all_single_autograd":
        "parallel/ep.py: a differentiable all-to-all with variable splits (no public one)",
    "torch.utils.checkpoint.SAC_IGNORED_OPS": "sac_ignores_profiler_ranges below",
    "torch.ops.profiler._record_function_enter_new": "sac_ignores_profiler_ranges below",
    "torch.ops.profiler._record_function_exit": "sac_ignores_profiler_ranges below",
    "torch._inductor.config._micro_pipeline_tp": "async_tp_compile below",
    "torch.distributed._symmetric_memory.enable_symm_mem_for_group": "async_tp_compile below",
    "torch.distributed.tensor.parallel.ColwiseParallel._prepare_input_fn":
        "trainer/adapters/tp.py: LoRA layers reuse the styles' input / output layouts for their own parameters",
    "torch.distributed.tensor.parallel.ColwiseParallel._prepare_output_fn": "trainer/adapters/tp.py: likewise",
    "torch.distributed.tensor.parallel.RowwiseParallel._prepare_input_fn": "trainer/adapters/tp.py: likewise",
    "torch.distributed.tensor.parallel.RowwiseParallel._prepare_output_fn": "trainer/adapters/tp.py: likewise",
    "torch.distributed.checkpoint.filesystem._StorageInfo":
        "trainer/checkpoint/safe_reader.py: a class DCP pickles into .metadata, admitted by the safe unpickler",
    "torch.serialization._get_layout": "trainer/checkpoint/safe_reader.py: likewise",
    "torch.distributed.checkpoint.FileSystemReader._get_metadata_path":
        "trainer/checkpoint/safe_reader.py: where .metadata is, read without pickle.load",
    "torch.distributed.tensor._dtensor_spec.DTensorSpec":
        "trainer/optimizer_offload.py: a host tensor in a parameter's DTensor layout (from_local would move it to the "
        "mesh's device; FSDP2 builds its CPU-offloaded shards this way)",
    "torch.distributed.tensor._dtensor_spec.TensorMeta": "trainer/optimizer_offload.py: likewise",
    "torchao.optim.quant_utils.quantize_8bit_with_qmap":
        "trainer/checkpoint/quantized_moments.py: quantize saved moments with their saved block scales (exact resume)",
    "torchao.optim.quant_utils.quantize_4bit_with_qmap": "trainer/checkpoint/quantized_moments.py: likewise",
    "torchao.float8._auto_filter_for_recipe":
        "fp8/conversion.py: torchao's own too-small-to-gain size thresholds (fp8.auto_filter_small_kn)",
    "torchao.float8.float8_linear.matmul_with_hp_or_float8_args":
        "fp8/conversion.py: an adapter over a float8 base computes its frozen product in float8",
    "torchao.float8.float8_ops.FLOAT8_OPS_TABLE": "float8_all_gather_over_gloo below",
    "torchao.float8.float8_training_tensor.Float8TrainingTensor":
        "float8_all_gather_over_gloo below: rebuilt from its _data, _scale, _orig_dtype, _linear_mm_config, _gemm_input_role",
}
# The LR scheduler's state-dict key for the last learning rates (trainer/checkpoint/state.py).
SCHEDULER_LAST_LR_KEY = "_last_lr"


def resolve(dotted: str):
    """The object a dotted name of PRIVATE_NAMES names (raises if the library moved it)."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return found
    raise ImportError(dotted)


@contextlib.contextmanager
def async_tp_compile(group):
    """Lets compiled blocks fuse the sequence all-gather / reduce-scatter into the matmuls (async TP):
    inductor's global micro-pipeline switch, on for the run, and symmetric memory for the TP group (a
    property of that group, gone with it)."""
    import torch._inductor.config as inductor_config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    before = inductor_config._micro_pipeline_tp
    inductor_config._micro_pipeline_tp = True
    with warnings.catch_warnings():
        # torch 2.13 does this itself and warns that the call is no longer needed; 2.11 still needs it.
        warnings.simplefilter("ignore", FutureWarning)
        enable_symm_mem_for_group(group.group_name)
    try:
        yield
    finally:
        inductor_config._micro_pipeline_tp = before


@contextlib.contextmanager
def sac_ignores_profiler_ranges():
    """Selective activation checkpointing replays a block's ops in its backward and requires the same ops
    in the same order. Under expert or tensor parallelism a MoE block holds FSDP units of its own,
    whose hooks open profiler ranges (record_function) inside the checkpointed region, a different number
    of times in the recompute than in the forward; those ranges compute nothing, so while this is entered
    SAC lets them run uncounted, as it already does the detaches it inserts itself."""
    from torch.utils.checkpoint import SAC_IGNORED_OPS

    ranges = {resolve("torch.ops.profiler._record_function_enter_new").default,
              resolve("torch.ops.profiler._record_function_exit")._RecordFunction}
    added = ranges - SAC_IGNORED_OPS
    SAC_IGNORED_OPS.update(added)
    try:
        yield
    finally:
        SAC_IGNORED_OPS.difference_update(added)


@contextlib.contextmanager
def float8_all_gather_over_gloo():
    """gloo has no float8 types ("Invalid scalar type"): while it is entered, torchao's float8 all-gather
    of a CPU tensor moves the same bytes as uint8, which is bitwise the same (float8 tensor parallelism in
    CPU runs and tests). CUDA tensors take torchao's own path. torchao's op table is restored on exit."""
    import torch
    from torchao.float8 import float8_ops
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    table = float8_ops.FLOAT8_OPS_TABLE
    ops = (torch.ops._c10d_functional.all_gather_into_tensor.default,
           torch.ops.c10d_functional.all_gather_into_tensor.default)
    originals = {op: table[op] for op in ops}

    def gathering_bytes(original):
        def gather(aten_op, args, kwargs=None):
            t = args[0]
            data = t._data.contiguous()
            if data.device.type != "cpu":
                return original(aten_op, args, kwargs)
            gathered = aten_op(data.view(torch.uint8), *args[1:], **(kwargs or {}))
            return Float8TrainingTensor(gathered.view(data.dtype), t._scale, t._orig_dtype, t._linear_mm_config,
                                        t._gemm_input_role)
        return gather

    for op, original in originals.items():
        table[op] = gathering_bytes(original)
    try:
        yield
    finally:
        table.update(originals)


# Lines libraries print at import that say nothing to a user of this project, per rank: logger -> the start
# of the message. The entry points install the filter once per process (quiet_import_noise).
IMPORT_NOISE = {
    # torchao tries its C++ extensions (mxfp8, CUTLASS sm90a kernels) built for other torch / CUDA versions;
    # the float8 training and NF4 paths used here are Python over torch ops and do not need them.
    "torchao": "Failed to load ",
    # torchao registers an Enum as a pytree constant; torch 2.13 warns that this is deprecated.
    "torch.utils._pytree": "%s is an Enum subclass",
}


class _DropImportNoise(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def quiet_import_noise() -> None:
    for name, start in IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropImportNoise) for f in logger.filters):
            logger.addFilter(_DropImportNoise(start))
