"""The reference model a device profile's compute efficiency is measured on: a small Llama trained one
microbatch (forward, loss, backward) as a 1-rank run computes it, against what the time model (estimate.py)
predicts for it from the profile's own rates.

The time model counts matmuls, attention and a block's main elementwise chain; a real step also runs RoPE,
the residual adds, the embedding's backward, gradient zeroing, the loss's softmax and autograd's own work
per op, and its matmuls have a real model's shapes, not the calibration's squares. The ratio (predicted /
measured) is stored per precision and thread count and divides the model's compute for every layout. The
reference is not the shape of any bench.planner row (dim 512, sequences of 512), so those rows test the
model's reach to other shapes, layouts, checkpointing modes and adapters, not this measurement.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.planner import timing
from trainer.planner.devices import DeviceProfile

REPO = Path(__file__).resolve().parents[2]
SHAPES = {
    "cpu": ["model.dim=384", "model.n_layers=2", "model.n_heads=6", "model.n_kv_heads=2", "model.ffn_hidden_dim=1024",
            "model.vocab_size=4096", "training.seq_len=256", "training.local_batch_size=4", "training.global_batch_size=4"],
    "cuda": ["model.dim=2048", "model.n_layers=2", "model.n_heads=16", "model.n_kv_heads=8", "model.ffn_hidden_dim=5632",
             "model.vocab_size=32768", "training.seq_len=2048", "training.local_batch_size=2", "training.global_batch_size=2"],
}


def reference_plan(device_type: str, dtype: str):
    from trainer.config import load_config
    from trainer.plan import make_plan

    overrides = [*SHAPES[device_type], f"training.mixed_precision_param={dtype}"]
    return make_plan(load_config(REPO / "configs" / "debug.yaml", overrides), 1)


def _precision(plan, device: torch.device):
    from trainer.precision import Precision

    training = plan.cfg.training
    return Precision.from_config(training.mixed_precision_param, training.mixed_precision_reduce, device)


def measure(device: torch.device, dtype: str, trials: int = 7) -> float:
    """Seconds of the reference's training microbatch on this process's threads (the median of `trials`:
    one number scales every layout's compute, so more trials than a rate's)."""
    from trainer.build import build_whole_model

    plan = reference_plan(device.type, dtype)
    args, precision = plan.model_args, _precision(plan, device)
    model = build_whole_model(args, [], init_from=None, seed=0, device=device)
    batch = plan.cfg.training.local_batch_size
    tokens = torch.randint(0, args.vocab_size, (batch, plan.cfg.training.seq_len + 1), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))

    def step():
        with precision.autocast(device, fsdp=False):
            logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)

    return timing.seconds(step, trials, timing.synchronizer(device))


def efficiency(profile: DeviceProfile, measured: dict[str, float]) -> dict[str, float]:
    """{key: predicted compute / measured} for measured = {"dtype@threads" (CPU) or "dtype": seconds}."""
    from trainer.dry_run import busiest_parts
    from trainer.planner.estimate import COMPUTE_PARTS, predict

    out = {}
    for key, seconds in measured.items():
        dtype, _, threads = key.partition("@")
        device = torch.device("cpu" if profile.kind == "cpu" else "cuda")
        plan = reference_plan(device.type, dtype)
        p = predict(plan, profile, _precision(plan, device), busiest_parts(plan), memory=False,
                    threads=int(threads) if threads else None)
        out[key] = sum(v for k, v in p.seconds.items() if k in COMPUTE_PARTS) / seconds
    return out
