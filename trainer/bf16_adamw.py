"""AdamW whose two moments are stored in bfloat16: 4 bytes of optimizer state per parameter instead of 8.

The update itself is computed in float32 (the parameters stay float32); only the stored moments are
bfloat16. Plain rounding to nearest would lose small updates: with beta2 = 0.999 the second moment moves
by 0.1% a step, under bfloat16's 0.4% spacing, so it would stop moving. The moments are therefore written
back with stochastic rounding (rounded up with a probability equal to the distance to the lower
neighbour), which keeps them unbiased on average.

The rounding's random bits are a hash of each value's own float32 bits and the step, not a draw from a
generator: the result then does not depend on how a tensor is sharded (FSDP or TP on any number of ranks
rounds every element alike, so layouts agree with one process) and needs no RNG state to resume exactly.

The step runs on each rank's local shard (everything in AdamW is elementwise), a slice at a time, so
its float32 temporaries stay small however large a parameter is.
"""

import torch
from torch.distributed.tensor import DTensor

# Elements per slice of the step: its float32 and int64 temporaries are a few times this, in bytes x 4-8.
_SLICE = 1 << 22
_MASK32 = 0xFFFFFFFF


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _hash16(bits: torch.Tensor, step: int) -> torch.Tensor:
    """16 pseudo-random bits per element from its 32 bits and the step (an integer mixing function:
    xor-shifts and odd multipliers, the "lowbias32" constants), in int64 so that nothing overflows."""
    x = (bits ^ ((step * 0x9E3779B9) & _MASK32)) & _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    x ^= x >> 16
    return x & 0xFFFF


def stochastic_round_(out: torch.Tensor, value: torch.Tensor, step: int) -> None:
    """Writes float32 `value` into bfloat16 `out`, rounding each element up or down at random in
    proportion to its distance from the two neighbours (on the magnitude, so alike for both signs)."""
    bits = value.view(torch.int32).to(torch.int64) & _MASK32
    rounded = (bits + _hash16(bits & 0x7FFFFFFF, step)) & 0xFFFF0000  # by magnitude: x and -x round alike
    # Back to a signed 32-bit pattern, then float32 whose low 16 bits are zero: exact in bfloat16.
    rounded = torch.where(rounded >= 1 << 31, rounded - (1 << 32), rounded).to(torch.int32)
    finite = torch.isfinite(value)
    out.copy_(torch.where(finite, rounded.view(torch.float32), value))


class AdamWBF16States(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments) with bfloat16 moments."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    # Same keys and the step as a float32 tensor, as torch's AdamW: checkpoints move between them.
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                step = int(state["step"].item())
                self._update(_local(p), _local(p.grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"]),
                             step=step, lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                             weight_decay=group["weight_decay"])
        return loss

    @staticmethod
    def _update(p, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay) -> None:
        bias1 = 1 - beta1**step
        bias2_sqrt = (1 - beta2**step) ** 0.5
        flat = [t.view(-1) for t in (p, grad, exp_avg, exp_avg_sq)]  # local shards are contiguous
        for start in range(0, flat[0].numel(), _SLICE):
            p_, g_, m_, v_ = (t[start:start + _SLICE] for t in flat)
            g = g_.float()
            m = m_.float().lerp_(g, 1 - beta1)
            v = v_.float().lerp_(g * g, 1 - beta2)
            p_.mul_(1 - lr * weight_decay)
            p_.addcdiv_(m, v.sqrt().div_(bias2_sqrt).add_(eps), value=-lr / bias1)
            stochastic_round_(m_, m, step)
            stochastic_round_(v_, v, step)
