"""Keys and values of the tokens a model has already seen, so that generation computes each new token
from itself and the cache instead of re-running the whole sequence (O(n) per token, not O(n^2))."""

import torch


class LayerCache:
    """One attention layer's keys and values after RoPE, (batch, kv_heads, seen, head_dim)."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class KVCache:
    """What `Transformer.forward(tokens, cache=...)` reads and extends: one LayerCache per block, and
    how many positions are already in it (where the next tokens' RoPE angles start)."""

    def __init__(self, layer_ids):
        self.layers = {layer_id: LayerCache() for layer_id in layer_ids}
        self.length = 0
