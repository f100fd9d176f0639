"""The model-family seam, used the way the next family will use it: a toy family defined here (blocks of
its own, with other parameter names and a GELU MLP) and put in the registry, and nothing else changed,
plans, dry-runs, trains with LoRA over its own target names and resumes from its checkpoint. Also: a start
builds its meta model once (--check, --dry-run and training), and checkpoints written before each family
had its own args dataclass still read."""

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
import train
from models.common.args import DecoderArgs
from models.common.attention import Attention
from models.common.decoder import Decoder
from models.common.dense_tp import dense_tp_plan
from models.family import HFFormat, ModelFamily
from models.llama.model import LlamaTransformer
from parallel.pp import split_stages
from tests.helpers import REPO, flavor_args


@dataclass(frozen=True, kw_only=True)
class ToyArgs(DecoderArgs):
    family = "toy"
    mlp_ratio: int = 4

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return self.mlp_ratio * self.dim


class ToyBlock(nn.Module):
    def __init__(self, args: ToyArgs):
        super().__init__()
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.fc_in = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.fc_out = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, cache=None, start=0):
        h = self.norm(x)  # parallel attention and MLP from one norm, as in GPT-J
        return x + self.attention(h, cos, sin, cache=cache, start=start) + self.fc_out(F.gelu(self.fc_in(h)))


class Toy(Decoder):
    builds = 0

    def __init__(self, args: ToyArgs):
        Toy.builds += 1
        super().__init__(args, lambda args, layer_id: ToyBlock(args))


def _toy_flops(args, seq_len):
    per_layer = 4 * args.dim * args.dim + 2 * args.dim * args.hidden_dim
    return 6 * (args.n_layers * per_layer + args.vocab_size * args.dim) + 12 * args.n_layers * args.dim * seq_len


TOY = ModelFamily(
    name="toy", args=ToyArgs, model=Toy,
    flavors={"toy_debug": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=-1, max_seq_len=256)},
    hf=HFFormat(model_type="toy", args_from_config=None, config=None, to_hf=None, from_hf=None),
    tp_plan=dense_tp_plan, split_stages=split_stages, init_std=lambda name, args: None if "norm" in name else 0.02,
    flops_per_token=_toy_flops, activation_elements=lambda args, mode, every: 8 * args.dim + 2 * args.hidden_dim,
    tp_sizes=lambda args: {"n_heads": args.n_heads}, adapter_targets={"mlp": r"layers\.\d+\.fc_(in|out)"},
)


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setitem(models.FAMILIES, "toy", TOY)
    Toy.builds = 0


def _train(out, *overrides) -> int:
    return train.main(["--config", "configs/debug.yaml", f"job.output_dir={out}", "training.seq_len=64",
                       "training.local_batch_size=2", "training.cpu_malloc=system", "data.prefetch=0",
                       "metrics.log_every=1", *overrides])


def test_a_family_from_outside_plans_trains_with_lora_and_resumes(tmp_path, toy_family, capsys):
    toy = ["model.flavor=toy_debug", "adapters.kind=lora", "adapters.targets=[mlp]", "checkpoint.interval=2"]
    assert train.main(["--config", "configs/debug.yaml", "--dry-run", *toy]) == 0
    assert "ToyArgs(dim=64" in capsys.readouterr().out and Toy.builds == 1
    assert _train(tmp_path, *toy, "training.steps=2") == 0
    out = capsys.readouterr().out
    assert "training 10,240 of " in out, out  # 2 layers x (fc_in + fc_out) x rank 8 x (64 + 256)
    assert Toy.builds == 2
    assert _train(tmp_path, *toy, "training.steps=4") == 0
    assert "resumed from" in capsys.readouterr().out
    assert train.main(["--config", "configs/debug.yaml", "--dry-run", *toy, "model.ffn_hidden_dim=64"]) == 2
    assert "model.ffn_hidden_dim is not a field of the toy family's shape: remove it" in capsys.readouterr().err
    # Its blocks take no attention mask: document attention is refused before any work, not a TypeError.
    assert train.main(["--config", "configs/debug.yaml", "--dry-run", *toy, "data.attention=document"]) == 2
    assert "data.attention=document needs attention masks, which the toy family's blocks do not take" in capsys.readouterr().err
    from trainer.build import load_run

    model = load_run(tmp_path)  # the base rebuilt, the adapters from the checkpoint
    assert type(model).__name__ == "Toy" and type(model.layers["0"].fc_in).__name__ == "LoRALinear"
    assert model(torch.randint(0, 256, (1, 8))).shape == (1, 8, 320)


def test_a_start_builds_its_meta_model_once(tmp_path, monkeypatch, capsys):
    builds = []
    original = LlamaTransformer.__init__
    monkeypatch.setattr(LlamaTransformer, "__init__", lambda self, args: (builds.append(1), original(self, args))[1])
    for command in (["--dry-run", "adapters.kind=lora"], ["--check", f"job.output_dir={tmp_path}"]):
        builds.clear()
        assert train.main(["--config", "configs/debug.yaml", *command]) == 0
        assert len(builds) == 1, command
    builds.clear()
    assert _train(tmp_path, "training.steps=1", "eval.split_fraction=0.05", "eval.every=1", "export.hf=true") == 0
    assert len(builds) == 1  # plan, model, checkpoint, validation and export: one meta model


LEGACY = {  # what checkpoints held before each family had its own args (ModelArgs, shared by every family)
    "llama": {"attention_head_dim": None, "dim": 128, "family": "llama", "ffn_dim_multiplier": None, "ffn_hidden_dim": None,
              "max_seq_len": 1024, "multiple_of": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 4, "norm_eps": 1e-05,
              "qk_norm": False, "rope_scaling": None, "rope_theta": 10000.0, "tie_embeddings": False, "vocab_size": 320},
    "qwen3": {"attention_head_dim": 64, "dim": 128, "family": "qwen3", "ffn_dim_multiplier": None, "ffn_hidden_dim": None,
              "max_seq_len": 1024, "multiple_of": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 4, "norm_eps": 1e-06,
              "qk_norm": True, "rope_scaling": None, "rope_theta": 1000000.0, "tie_embeddings": False, "vocab_size": 320},
}


def test_checkpoints_from_before_the_family_split_still_read():
    assert models.args_from_json(json.dumps(LEGACY["llama"])) == flavor_args("debug", vocab_size=320)
    assert models.args_from_json(json.dumps(LEGACY["qwen3"])) == flavor_args("qwen3_debug", vocab_size=320)
    for args in (flavor_args("llama3_1_8b"), flavor_args("qwen3_8b")):
        assert models.args_from_json(args.to_json()) == args
    with pytest.raises(ValueError, match="family 'gpt5' is not one we train"):
        models.args_from_json(json.dumps({**LEGACY["llama"], "family": "gpt5"}))


def test_flavors_and_hf_model_types_are_unique_across_families():
    flavors = [name for f in models.FAMILIES.values() for name in f.flavors]
    assert len(flavors) == len(set(flavors))
    assert len({f.hf.model_type for f in models.FAMILIES.values()}) == len(models.FAMILIES)



def test_the_architecture_page_names_files_that_exist():
    """docs/architecture.md (the steps to add a family) stays true to the tree: every file it names as
    existing does (those it says a later change will add are marked new or perhaps)."""
    import re

    text = (REPO / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:models|trainer|parallel|fp8|launch|bench|tests|docs)/[\w/.<>]+?\.py)", text))
    future = {"models/common/moe.py", "parallel/cp.py"}  # "perhaps in a new", "a new"
    missing = sorted(p for p in named - future if "<" not in p and not (REPO / p).is_file())
    assert len(named) > 20 and not missing, missing
