"""LoRA / DoRA against peft on the same weights: the oracle for the adapter math."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from models import build_meta_model
from models.llama.hf import NAMES
from tests.helpers import build_adapted
from trainer.adapters import apply_adapters, init_adapter
from trainer.adapters.lora import LoRALinear
from trainer.config import ConfigError
from trainer.config.schema import AdaptersConfig
from trainer.weights.load import read_checkpoint_args

PEFT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _pair(tmp_path, kind, rslora, targets=("q", "k", "v", "o", "gate", "up", "down"), quantize_base="none"):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=200, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
    )
    hf = LlamaForCausalLM(config).float()
    hf.save_pretrained(tmp_path / "base")
    if quantize_base == "bnb_nf4":
        assert len(targets) == 7  # transformers quantizes every linear of the blocks
        # Training mode, as in training: in eval mode bitsandbytes runs CPU inference through a bf16 kernel.
        hf = _load_in_4bit(tmp_path / "base").train()
    peft_cfg = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, use_dora=kind == "dora", use_rslora=rslora,
        target_modules=[PEFT_NAMES[t] for t in targets],
    )
    peft_model = get_peft_model(hf, peft_cfg)

    cfg = AdaptersConfig(kind=kind, rank=4, alpha=8, rslora=rslora, targets=list(targets), quantize_base=quantize_base)
    ours = build_adapted(read_checkpoint_args(tmp_path / "base"), cfg, tmp_path / "base", seed=0)
    # Same adapter weights on both sides; B random so that the update is not zero.
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(0, 0.1)
                if module.magnitude is not None:
                    module.magnitude.mul_(torch.empty_like(module.magnitude).uniform_(0.8, 1.2))
                target = peft_model.base_model.model.get_submodule(NAMES.to_hf(f"{name}.weight").removesuffix(".weight"))
                target.lora_A["default"].weight.copy_(module.lora_a)
                target.lora_B["default"].weight.copy_(module.lora_b)
                if module.magnitude is not None:
                    target.lora_magnitude_vector["default"].weight.copy_(module.magnitude)
    return ours, peft_model


def _load_in_4bit(path):
    """peft's QLoRA setting, as its users get it: transformers loads the linears as bitsandbytes NF4
    with double quantization."""
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    return LlamaForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.float32, device_map="cpu")


def _peft_params(peft_model):
    out = {}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            out[name] = p
    return out


@pytest.mark.parametrize("kind,rslora,quantize_base", [
    ("lora", False, "none"), ("dora", False, "none"), ("lora", True, "none"), ("lora", False, "bnb_nf4"), ("dora", False, "bnb_nf4"),
])
def test_forward_and_gradients_match_peft(tmp_path, kind, rslora, quantize_base):
    ours, theirs = _pair(tmp_path, kind, rslora, quantize_base=quantize_base)
    if quantize_base == "bnb_nf4":  # both sides really run on a 4-bit base: peft's own QLoRA layer
        assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
        assert type(ours.layers["0"].attention.wq.quantized).__name__ == "BnbNF4Weight"
    tokens = torch.randint(0, 200, (2, 48), generator=torch.Generator().manual_seed(1))
    our_logits = ours(tokens)
    their_logits = theirs(input_ids=tokens).logits
    assert (our_logits - their_logits).abs().max().item() < 1e-5
    our_logits.float().logsumexp(-1).mean().backward()
    their_logits.float().logsumexp(-1).mean().backward()

    # Only adapter parameters train, on both sides, and their gradients agree.
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    per_layer = 3 if kind == "dora" else 2
    assert len(trainable) == 2 * 7 * per_layer and all("lora" in n or "magnitude" in n for n in trainable)
    theirs_by_name = _peft_params(theirs)
    for name, module in ours.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        prefix = "base_model.model." + NAMES.to_hf(f"{name}.weight").removesuffix(".weight")
        pairs = [(module.lora_a, f"{prefix}.lora_A.default.weight"), (module.lora_b, f"{prefix}.lora_B.default.weight")]
        if module.magnitude is not None:
            pairs.append((module.magnitude, f"{prefix}.lora_magnitude_vector.default.weight"))
        for ours_param, their_name in pairs:
            diff = (ours_param.grad - theirs_by_name[their_name].grad).abs().max().item()
            assert diff < 1e-5, (name, their_name, diff)


def test_zero_update_at_start_and_dora_magnitude_is_the_row_norm(tmp_path):
    ours, _ = _pair(tmp_path, "dora", False, targets=("q",))
    module = ours.layers["0"].attention.wq
    init_adapter(module, "layers.0.attention.wq", seed=0)
    assert torch.equal(module.lora_b, torch.zeros_like(module.lora_b))
    assert torch.allclose(module.magnitude, module.weight.norm(dim=1))
    x = torch.randn(3, 64)
    assert torch.allclose(module(x), x @ module.weight.T, atol=1e-6)


def test_bad_adapter_settings(tmp_path):
    model = build_meta_model(read_checkpoint_args(_save_tiny(tmp_path)))
    with pytest.raises(ConfigError, match=r"adapters.targets=\['qq'\] matches no linear layer"):
        apply_adapters(model, AdaptersConfig(kind="lora", targets=["qq"]))
    with pytest.raises(ConfigError, match="not a valid regular expression|nor a valid regular expression"):
        apply_adapters(model, AdaptersConfig(kind="lora", targets=["layers.(["]))


def _save_tiny(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"
