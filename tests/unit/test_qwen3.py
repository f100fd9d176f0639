"""Qwen3 through the model-family seam, against transformers' Qwen3ForCausalLM (forward parity, export)
and peft (LoRA over it). Its head size (32) differs from dim / heads (16) on purpose."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen3Config, Qwen3ForCausalLM

from trainer.adapters.lora import LoRALinear
from trainer.config.schema import AdaptersConfig
from trainer.weights.hf_export import export_hf
from models.qwen3.hf import NAMES
from tests.helpers import build_adapted, flavor_args
from trainer.weights.load import load_model, read_checkpoint_args

VOCAB = 300


def _hf_qwen3(path, tied: bool) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    hf = Qwen3ForCausalLM(config).float().eval()
    with torch.no_grad():  # random norms (q_norm and k_norm included), so a misplaced one shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(path)
    return hf


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_and_the_export_reloads(tmp_path, tied):
    hf = _hf_qwen3(tmp_path / "hf", tied)
    ours = load_model(tmp_path / "hf")
    args = ours.args
    assert (args.family, args.head_dim, args.tie_embeddings) == ("qwen3", 32, tied)
    assert type(ours).__name__ == "Qwen3Transformer" and ours.layers["0"].attention.q_norm.weight.shape == (32,)
    tokens = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = ours(tokens)
        diff = (logits - hf(tokens).logits).abs().max().item()
    print(f"\nQWEN3 tied={tied}: max |logits - transformers| = {diff:.2e}")
    assert diff < 1e-5

    export_hf(ours, tmp_path / "export", dtype=torch.float32)
    reloaded = Qwen3ForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    assert reloaded.config.model_type == "qwen3" and reloaded.config.head_dim == 32
    with torch.no_grad():
        assert (reloaded(tokens).logits - logits).abs().max().item() < 1e-5
    assert read_checkpoint_args(tmp_path / "export") == args


def test_lora_over_qwen3_matches_peft(tmp_path):
    hf = _hf_qwen3(tmp_path / "base", tied=False).train()
    targets = ["q", "k", "v", "o", "gate", "up", "down"]
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    theirs = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[names[t] for t in targets]))
    cfg = AdaptersConfig(kind="lora", rank=4, alpha=8, targets=targets)
    ours = build_adapted(read_checkpoint_args(tmp_path / "base"), cfg, tmp_path / "base", seed=0).train()
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(0, 0.1)
                target = theirs.base_model.model.get_submodule(NAMES.to_hf(f"{name}.weight").removesuffix(".weight"))
                target.lora_A["default"].weight.copy_(module.lora_a)
                target.lora_B["default"].weight.copy_(module.lora_b)
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    ours_logits, their_logits = ours(tokens), theirs(tokens).logits
    assert (ours_logits - their_logits).abs().max().item() < 1e-5
    ours_logits.square().mean().backward()
    their_logits.square().mean().backward()
    worst = 0.0
    for name, module in ours.named_modules():
        if isinstance(module, LoRALinear):
            target = theirs.base_model.model.get_submodule(NAMES.to_hf(f"{name}.weight").removesuffix(".weight"))
            worst = max(worst, (module.lora_a.grad - target.lora_A["default"].weight.grad).abs().max().item(),
                        (module.lora_b.grad - target.lora_B["default"].weight.grad).abs().max().item())
    print(f"\nQWEN3 LoRA: max |adapter grad - peft| = {worst:.2e}")
    assert worst < 1e-6


@pytest.mark.parametrize("flavor", ["qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b", "qwen3_14b", "qwen3_32b"])
def test_flavors_have_the_published_sizes(flavor):
    """Our flavor, built on meta, against transformers' Qwen3ForCausalLM built on meta from the config
    our export would write: the same parameter count, and transformers' own names for every tensor."""
    from models import build_meta_model, family_of

    args = flavor_args(flavor)
    ours = build_meta_model(args)
    with torch.device("meta"):
        theirs = Qwen3ForCausalLM(Qwen3Config.from_dict(family_of(args).hf.config(args, dtype=torch.bfloat16)))
    their_names = {n for n, _ in theirs.named_parameters()}
    assert {NAMES.to_hf(n) for n, _ in ours.named_parameters()} == their_names
    count = sum(p.numel() for p in ours.parameters())
    print(f"\nQWEN3 {flavor}: {count:,} parameters")
    assert count == sum(p.numel() for p in theirs.parameters())
