"""Hugging Face import/export against transformers.LlamaForCausalLM, the oracle for the forward pass."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.weights.hf_export import export_hf
from trainer.weights.errors import CheckpointError
from trainer.weights.load import load_model, read_checkpoint_args


def _hf_model(tmp_path, tied: bool, rope_scaling: bool, shard: bool = False):
    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 50000.0}
    if rope_scaling:
        rope = {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        }
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_parameters=rope,
    )
    hf = LlamaForCausalLM(config).float().eval()
    # Random (not the default near-zero) norm weights, so a mixed-up norm would show in the logits.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB" if shard else "5GB")
    return hf


def _ours(path):
    return load_model(path)


@pytest.mark.parametrize("tied,rope_scaling,shard", [(False, False, False), (True, True, False), (False, True, True)])
def test_logits_match_transformers(tmp_path, tied, rope_scaling, shard):
    hf = _hf_model(tmp_path, tied, rope_scaling, shard)
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = _ours(tmp_path / "hf")
    assert ours.args.tie_embeddings == tied and (ours.args.rope_scaling is not None) == rope_scaling
    tokens = torch.randint(0, 300, (2, 200))  # past original_max_position_embeddings: scaling matters
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-5


def test_export_round_trip_loads_in_transformers(tmp_path):
    _hf_model(tmp_path, tied=False, rope_scaling=True)
    ours = _ours(tmp_path / "hf")
    export_hf(ours, tmp_path / "export", dtype=torch.float32, max_shard_bytes=50_000)
    assert (tmp_path / "export" / "model.safetensors.index.json").exists()  # sharded on purpose
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    tokens = torch.randint(0, 300, (2, 100))
    with torch.no_grad():
        diff = (ours(tokens) - reloaded(tokens).logits).abs().max().item()
    assert diff < 1e-5
    # And back into our model: the weights survive both directions unchanged.
    again = _ours(tmp_path / "export")
    for (name, a), (_, b) in zip(ours.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name


def test_bad_checkpoints_name_the_file(tmp_path):
    _hf_model(tmp_path, tied=False, rope_scaling=False)
    with pytest.raises(CheckpointError, match="no such file or directory"):
        read_checkpoint_args(tmp_path / "nowhere")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors"):
        _ours(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        read_checkpoint_args(tmp_path / "hf")


def test_shape_mismatch_is_reported(tmp_path):
    _hf_model(tmp_path, tied=False, rope_scaling=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight: shape"):
        _ours(tmp_path / "hf")


def test_tied_config_beside_a_head_of_its_own(tmp_path):
    """tie_word_embeddings=true and an lm_head.weight in the file: the same tensor loads (tied); a different
    one is refused by name rather than dropped."""
    from safetensors.torch import load_file, save_file

    _hf_model(tmp_path, tied=False, rope_scaling=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(CheckpointError, match=r"tie_word_embeddings=true, but model.safetensors holds its own lm_head.weight"):
        _ours(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    assert _ours(tmp_path / "hf").args.tie_embeddings
