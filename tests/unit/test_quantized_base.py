"""4-bit frozen bases against each quantizing library's own result on the same weights."""

import pytest
import torch
from torch import nn

from trainer.adapters.lora import LoRALinear


def _weights() -> torch.Tensor:
    # A Llama-like weight: small, roughly normal, with a few large outliers that stress the block scales.
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    w[::37, ::41] *= 8
    return w


def _reference(kind: str, w: torch.Tensor) -> torch.Tensor:
    """What the library itself gives, called the way its own users call it."""
    if kind == "nf4":
        from torchao.quantization import to_nf4

        return to_nf4(w).get_original_weight()  # torchao's defaults: block 64, scaler block 256
    if kind == "bnb_nf4":
        import bitsandbytes as bnb

        p = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=64).to("cpu")
        return bnb.functional.dequantize_4bit(p.data, p.quant_state)
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data.copy_(w)
    return HQQLinear(linear, BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float32, device="cpu").dequantize()


def _quantized_layer(kind: str, w: torch.Tensor, dora: bool = False) -> LoRALinear:
    base = nn.Linear(w.shape[1], w.shape[0], bias=False)
    base.weight.data.copy_(w)
    layer = LoRALinear(base, rank=4, alpha=8, dropout=0.0, rslora=False, dora=dora)
    layer.quantize_base(kind, shards=1, hqq_group_size=64)
    return layer


@pytest.mark.parametrize("kind", ["nf4", "bnb_nf4", "hqq"])
def test_dequantization_error_is_the_librarys(kind):
    w = _weights()
    layer = _quantized_layer(kind, w)
    ours, reference = layer.base_weight(), _reference(kind, w)
    our_error, their_error = (ours - w).abs(), (reference - w).abs()
    assert our_error.max() <= their_error.max() * (1 + 1e-6) and our_error.mean() <= their_error.mean() * (1 + 1e-6)
    assert torch.allclose(ours, reference, atol=1e-7, rtol=0)
    # It is 4-bit: a real quantization error, and about half a byte per weight (plus statistics).
    assert 1e-4 < our_error.mean() < 0.05 * w.abs().max()
    stored = sum(t.numel() * t.element_size() for t in _inner_tensors(layer))
    assert stored < 0.3 * w.numel() * w.element_size(), stored


@pytest.mark.parametrize("kind", ["nf4", "bnb_nf4", "hqq"])
def test_forward_and_input_gradient_use_the_dequantized_base(kind):
    w = _weights()
    layer = _quantized_layer(kind, w)
    dense = layer.base_weight().detach()
    x = torch.randn(3, 7, 512, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.no_grad():
        layer.lora_a.normal_(0, 0.1)
        layer.lora_b.normal_(0, 0.1)
    expected = x_ref @ dense.T + layer.scale * (x_ref @ layer.lora_a.T) @ layer.lora_b.T
    out = layer(x)
    assert torch.allclose(out, expected, atol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-4)
    assert layer.lora_a.grad is not None and all(p.grad is None for n, p in layer.named_parameters() if "lora" not in n)


@pytest.mark.parametrize("kind", ["nf4", "bnb_nf4", "hqq"])
def test_dora_norm_is_of_the_dequantized_base(kind):
    w = _weights()
    layer = _quantized_layer(kind, w, dora=True)
    with torch.no_grad():
        layer.lora_a.normal_(0, 0.1)
        layer.lora_b.normal_(0, 0.1)
    dense = layer.base_weight()
    expected = torch.linalg.norm(dense + layer.scale * layer.lora_b @ layer.lora_a, dim=1)
    assert torch.allclose(layer.weight_norm(), expected, atol=1e-6)


def _inner_tensors(layer: LoRALinear):
    if layer.quantized is not None:
        tensors = [layer.quantized.codes]
        state = getattr(layer.quantized, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.state2.absmax, state.code, state.state2.code]
        meta = getattr(layer.quantized, "meta", {})
        tensors += [v for v in meta.values() if torch.is_tensor(v)]
        return tensors
    nf4 = layer.weight.data
    return [nf4.quantized_data, nf4.quantized_scalers, nf4.quantization_factor]


@pytest.mark.parametrize("quantize_base", ["none", "nf4"])
def test_frozen_base_is_stored_in_the_compute_dtype(quantize_base):
    """Frozen weights never meet the optimizer, so an adapter run keeps them in the compute dtype
    (bf16 on a GPU); only the adapters are fp32."""
    from models.llama.args import LlamaArgs
    from trainer.build import build_whole_model
    from trainer.config.schema import AdaptersConfig, ExportConfig
    from trainer.converters.adapters import AdapterConverter

    args = LlamaArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_hidden_dim=256, max_seq_len=64)
    converter = AdapterConverter(AdaptersConfig(kind="dora", quantize_base=quantize_base), ExportConfig(), init_from=None, seed=0)
    model = build_whole_model(args, [converter], init_from=None, seed=0, frozen_dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    assert {n.rpartition(".")[2] for n, p in model.named_parameters() if p.requires_grad} == {"lora_a", "lora_b", "magnitude"}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer runs bf16 without FSDP
        logits = model(torch.randint(0, 256, (2, 16)))
    logits.float().mean().backward()
    assert logits.isfinite().all() and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_no_more_than_one_block_is_ever_in_high_precision():
    """Loading a 4-bit base unit by unit: whenever a tensor is read, the model holds at most one block's
    adapted weights in high precision (the block being loaded); all earlier ones are 4-bit already."""
    from functools import partial

    from models import build_meta_model
    from models.llama.args import LlamaArgs
    from parallel.mesh import ParallelDims
    from parallel.parallelize import materialize_units
    from trainer.build import materialize_converted
    from trainer.config.schema import AdaptersConfig, ExportConfig
    from trainer.converters.adapters import AdapterConverter
    from trainer.weights.seeded_init import SeededInit

    args = LlamaArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_hidden_dim=256, max_seq_len=64)
    converter = AdapterConverter(AdaptersConfig(kind="lora", quantize_base="nf4"), ExportConfig(), init_from=None, seed=0)
    model = build_meta_model(args)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    converter.convert(model, ParallelDims(dp_replicate=1, dp_shard=1, tp=1, pp=1, world_size=1))
    block_bytes = sum(m.weight.numel() * 4 for m in model.layers["0"].modules() if isinstance(m, LoRALinear))
    seen = []

    class Watching(SeededInit):
        def get(self, name):
            held = sum(
                m.weight.numel() * 4 for m in model.modules()
                if isinstance(m, LoRALinear) and not m.weight.is_meta and type(m.weight.data).__name__ != "NF4Tensor"
            )
            seen.append(held)
            return super().get(name)

    weights = Watching(args, seed=0, shapes=shapes)
    materialize_units(model, partial(materialize_converted, weights=weights, converters=[converter], device=torch.device("cpu"),
                                     shards=1, seed=0, frozen_dtype=torch.float32))
    assert len(seen) == len(weights.names) and max(seen) <= block_bytes and max(seen) > 0
    assert all(type(m.weight.data).__name__ == "NF4Tensor" for m in model.modules() if isinstance(m, LoRALinear))


@pytest.mark.parametrize("kind", ["nf4", "bnb_nf4", "hqq"])
def test_a_4bit_distillation_teacher_computes_with_the_librarys_weights(kind, shared):
    """distill.teacher_quantize: the real stories260K with every block linear 4-bit (embeddings, norms and
    the head as they were) gives the logits of the same model whose block weights are the library's
    own dequantization."""
    from trainer.adapters.frozen import FrozenLinear
    from trainer.adapters.quantize import nf4_scaler_block
    from trainer.config import load_config
    from trainer.distill import build_teacher
    from trainer.precision import Precision
    from trainer.weights.load import load_model, read_checkpoint_args

    path = shared("models/stories260K/stories260K.bin")
    cfg = load_config("configs/debug.yaml", [f"distill.teacher={path}", f"distill.teacher_quantize={kind}",
                                             "adapters.hqq_group_size=64"])
    teacher = build_teacher(cfg.distill, read_checkpoint_args(path), hqq_group_size=cfg.adapters.hqq_group_size,
                            fsdp_mesh=None, shards=1, precision=Precision(torch.float32, torch.float32),
                            device=torch.device("cpu"))
    reference = load_model(path)
    frozen = {n: m for n, m in teacher.named_modules() if isinstance(m, FrozenLinear)}
    assert len(frozen) == 7 * len(teacher.layers) and not any(p.requires_grad for p in teacher.parameters())
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = reference(tokens)
        for name, module in frozen.items():
            w = reference.get_submodule(name).weight
            if kind == "nf4":  # torchao's own quantizer, at the scaler block our FSDP sharding picks
                from torchao.quantization import to_nf4

                library = to_nf4(w, 64, nf4_scaler_block(w.numel(), 1)).get_original_weight()
            else:
                library = _reference(kind, w)
            reference.get_submodule(name).weight.copy_(library)
        ours, theirs = teacher(tokens), reference(tokens)
    print(f"\nTEACHER {kind}: max |ours - library's| = {(ours - theirs).abs().max():.2e}, "
          f"max |ours - high precision| = {(ours - full).abs().max():.2e}")
    assert type(teacher.tok_embeddings.weight.data).__name__ == "Tensor"
    assert (ours - theirs).abs().max() < 1e-4 < 1e-2 < (ours - full).abs().max()
