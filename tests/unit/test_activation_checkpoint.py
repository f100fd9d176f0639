"""Each activation-checkpointing mode gives exactly the gradients of no checkpointing, keeps parameter
names, and recomputes what it says it does."""

import pytest
import torch
import torch.nn.functional as F

from parallel.ac import apply_ac
from models.llama.args import LlamaArgs
from tests.helpers import build_adapted
from trainer.config.schema import AdaptersConfig

ARGS = LlamaArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64)


def _model(mode: str, every: int = 2, adapters: str = "none"):
    model = build_adapted(ARGS, AdaptersConfig(kind=adapters, rank=4), None, seed=1)
    apply_ac(model, mode=mode, every=every)
    if adapters != "none":
        with torch.no_grad():  # a non-zero update, so the adapter path matters
            for name, p in model.named_parameters():
                if name.endswith("lora_b"):
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


def _grads(model):
    tokens = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("adapters", ["none", "dora"])
@pytest.mark.parametrize("mode", ["full", "selective_layer", "selective_op"])
def test_gradients_equal_no_checkpointing(mode, adapters):
    reference = _grads(_model("none", adapters=adapters))
    grads = _grads(_model(mode, adapters=adapters))
    assert grads
    assert grads.keys() == reference.keys()  # names unchanged by the wrapping
    for name in reference:
        assert torch.equal(grads[name], reference[name]), name


@pytest.mark.parametrize("mode", ["none", "full", "selective_op"])
def test_offloaded_activations_give_the_same_gradients(mode):
    """activation_checkpoint.offload: what blocks save goes to host buffers and comes back for backward."""
    from parallel.activation_offload import apply_activation_offload

    reference = _grads(_model(mode, adapters="dora"))
    model = _model(mode, adapters="dora")
    hooks = apply_activation_offload(model)
    grads = _grads(model)
    assert grads.keys() == reference.keys()
    for name in reference:
        assert torch.allclose(grads[name], reference[name], rtol=0, atol=1e-6), name  # measured: equal
    # Checkpointed blocks save only their inputs (selective_op keeps its saved outputs in the checkpoint,
    # outside the hooks' reach): 3 of the 4 blocks (not the last), 2 x 63 tokens x 64 fp32.
    inputs = 3 * 2 * 63 * 64 * 4
    assert hooks.bytes_moved == inputs if mode != "none" else hooks.bytes_moved > 10 * inputs


def test_recomputation_happens_where_configured():
    calls = {}

    def count(model):
        for layer_id, block in model.layers.items():
            # A pre-hook: recomputation stops early, once the tensors backward needs exist again.
            block.feed_forward.register_forward_pre_hook(lambda *_, i=layer_id: calls.__setitem__(i, calls.get(i, 0) + 1))

    for mode, recomputed in [("none", set()), ("full", {"0", "1", "2", "3"}), ("selective_layer", {"0", "2"})]:
        calls.clear()
        model = _model(mode)
        count(model)
        _grads(model)
        assert {i for i, n in calls.items() if n == 2} == recomputed, mode
