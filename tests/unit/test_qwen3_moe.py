"""The Qwen3-MoE family against transformers' Qwen3MoeForCausalLM (the oracle): logits and the
load-balancing loss of an imported random model, the export reloaded in transformers, both of its weight
layouts (one tensor per expert as files hold them, the fused one it keeps in memory), the published
shapes; and DeepSeek-V3-style routing against transformers' DeepseekV3MoE block."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from models import build_meta_model, family_of
from models.common.moe import MoE, load_balancing_loss
from models.common.router import Routing
from tests.helpers import flavor_args
from trainer.weights.errors import CheckpointError
from trainer.weights.hf_export import export_hf
from trainer.weights.load import load_model, read_checkpoint_args

VOCAB = 300


def _hf_qwen3_moe(path, **overrides) -> Qwen3MoeForCausalLM:
    """A random Qwen3-MoE: 8 experts, 2 per token, 4 layers of which layer 1 is dense (mlp_only_layers)."""
    torch.manual_seed(0)
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
                  norm_topk_prob=True, mlp_only_layers=[1], decoder_sparse_step=1, max_position_embeddings=256,
                  router_aux_loss_coef=0.01, output_router_logits=True, tie_word_embeddings=False)
    hf = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**fields, **overrides})).float().eval()
    with torch.no_grad():  # random norms and a sharp router, so a misplaced tensor or expert shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "mlp.gate" in name or "experts" in name:
                p.normal_(0, 0.3)
    hf.save_pretrained(path)
    return hf


def test_logits_and_auxiliary_loss_match_transformers_and_the_export_reloads(tmp_path):
    hf = _hf_qwen3_moe(tmp_path / "hf")
    assert any(".experts.0.gate_proj.weight" in k for k in load_file(tmp_path / "hf" / "model.safetensors"))
    ours = load_model(tmp_path / "hf")
    args = ours.args
    assert (args.family, args.num_experts, args.top_k, args.moe_layers) == ("qwen3_moe", 8, 2, [0, 2, 3])
    assert hasattr(ours.layers["1"], "feed_forward") and not hasattr(ours.layers["1"], "moe")
    tokens = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = ours(tokens)
        theirs = hf(tokens)
    diff = (logits - theirs.logits).abs().max().item()
    stats = [ours.layers[str(i)].moe.last_stats for i in args.moe_layers]
    aux = load_balancing_loss(stats, args.num_experts).item()
    print(f"\nQWEN3-MOE: max |logits - transformers| = {diff:.2e}; aux loss {aux:.8f} vs {theirs.aux_loss.item():.8f}")
    assert diff < 1e-5
    assert abs(aux - theirs.aux_loss.item()) < 1e-6
    assert sum(int(s.counts.sum()) for s in stats) == 3 * 200 * 2  # every token reached both its experts

    export_hf(ours, tmp_path / "export", dtype=torch.float32)
    assert set(load_file(tmp_path / "export" / "model.safetensors")) == set(load_file(tmp_path / "hf" / "model.safetensors"))
    reloaded = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    assert reloaded.config.num_experts == 8 and reloaded.config.mlp_only_layers == [1]
    with torch.no_grad():
        assert (reloaded(tokens).logits - logits).abs().max().item() < 1e-5
    assert read_checkpoint_args(tmp_path / "export") == args


def test_fused_expert_tensors_load_and_missing_or_extra_experts_are_named(tmp_path):
    hf = _hf_qwen3_moe(tmp_path / "hf", mlp_only_layers=[])
    reference = load_model(tmp_path / "hf")
    # transformers' in-memory layout (gate_up_proj, down_proj per layer), as some conversions write it
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    (fused_dir / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(fused_dir / "model.safetensors"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(fused_dir / "model.safetensors")
    fused = load_model(fused_dir)
    for (name, a), (_, b) in zip(reference.named_parameters(), fused.named_parameters()):
        assert torch.equal(a, b), name

    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    for name, change in (("model.layers.2.mlp.experts.5.up_proj.weight", "drop"),
                         ("model.layers.2.mlp.experts.8.up_proj.weight", "add")):
        broken = tmp_path / change
        broken.mkdir()
        (broken / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
        t = dict(tensors)
        if change == "drop":
            del t[name]
        else:
            t[name] = t["model.layers.2.mlp.experts.0.up_proj.weight"].clone()
        save_file(t, str(broken / "model.safetensors"))
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            load_model(broken)


@pytest.mark.parametrize("flavor", ["qwen3_moe_30b_a3b", "qwen3_moe_235b_a22b"])
def test_flavors_have_the_published_sizes(flavor):
    """Built on meta against transformers' model from the config our export writes: the same tensors
    (per expert, by transformers' names on disk) and the published totals (30.5B / 235B)."""
    args = flavor_args(flavor)
    ours = build_meta_model(args)
    hf = family_of(args).hf
    config = Qwen3MoeConfig.from_dict(hf.config(args, dtype=torch.bfloat16))
    with torch.device("meta"):
        theirs = Qwen3MoeForCausalLM(config)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    names = {n for name, p in ours.named_parameters() for n, _ in hf.hf_tensors(name, p)}
    layer0 = {n for n in names if n.startswith("model.layers.0.")}
    assert len(layer0) == 4 + 2 + 1 + 3 * 128 + 2  # q/k/v/o, q/k norms, router, 128 experts x 3, 2 norms
    # FLOPs count the matmul weights a token meets; the published active counts add the embedding.
    active = family_of(args).flops_per_token(args, 0) / 6 + args.vocab_size * args.dim
    print(f"\nQWEN3-MOE {flavor}: {count / 1e9:.1f}B parameters, {active / 1e9:.2f}B active per token")
    assert round(count / 1e9, 1) == {"qwen3_moe_30b_a3b": 30.5, "qwen3_moe_235b_a22b": 235.1}[flavor]
    published = {"qwen3_moe_30b_a3b": 3.3, "qwen3_moe_235b_a22b": 22.0}[flavor]  # "A3B": 3.3B, "A22B": 22B
    assert abs(active / 1e9 - published) / published < 0.03


@pytest.mark.parametrize("groups,topk_groups", [(1, 1), (4, 2)])
def test_deepseek_v3_routing_matches_transformers(groups, topk_groups):
    """Sigmoid scores, the bias that chooses but does not weigh, group-limited choice, the scaling factor
    and a shared expert: our MoE layer against transformers' DeepseekV3MoE with the same weights."""
    torch.manual_seed(0)
    dim, hidden, experts = 64, 32, 8
    config = DeepseekV3Config(hidden_size=dim, moe_intermediate_size=hidden, n_routed_experts=experts,
                              num_experts_per_tok=2, n_group=groups, topk_group=topk_groups, n_shared_experts=1,
                              routed_scaling_factor=2.5, norm_topk_prob=True)
    theirs = DeepseekV3MoE(config).float()
    routing = Routing(num_experts=experts, top_k=2, norm_topk_prob=True, score_func="sigmoid", groups=groups,
                      topk_groups=topk_groups, scaling=2.5, expert_bias=True, shared_experts=1)
    ours = MoE(dim, hidden, routing)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
        theirs.gate.e_score_correction_bias.normal_(0, 0.3)
        ours.router.weight.copy_(theirs.gate.weight)
        ours.expert_bias.copy_(theirs.gate.e_score_correction_bias)
        gate, up = theirs.experts.gate_up_proj.chunk(2, dim=1)
        ours.experts.w1.copy_(gate)
        ours.experts.w3.copy_(up)
        ours.experts.w2.copy_(theirs.experts.down_proj)
        for ours_name, their_name in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            getattr(ours.shared, ours_name).weight.copy_(getattr(theirs.shared_experts, their_name).weight)
    x = torch.randn(2, 41, dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(x) - theirs(x)).abs().max().item()
        _, their_weights, their_experts = theirs.gate(x)
        weights, chosen, _ = ours.route(x.reshape(-1, dim))
    print(f"\nDeepSeek-V3 routing groups={groups}/{topk_groups}: max |ours - transformers| = {diff:.2e}")
    assert diff < 1e-5
    assert torch.equal(chosen.sort(-1)[0], their_experts.sort(-1)[0])
    if groups > 1:  # every token's experts lie in at most topk_groups groups
        assert ((chosen // (experts // groups)).sort(-1)[0].diff(dim=-1) != 0).sum(-1).max() < topk_groups


def test_training_gradients_match_transformers_loss_with_its_auxiliary_term(tmp_path):
    """The load-balancing loss reaches the routers through the backward (trainer/expert_balance.py), not
    the loss value: the gradients of our cross-entropy equal those of transformers' loss, which adds
    router_aux_loss_coef x its auxiliary loss, for every parameter; the routers' differ without it."""
    from models.qwen3_moe.hf import NAMES
    from trainer.expert_balance import ExpertBalance

    hf = _hf_qwen3_moe(tmp_path / "hf").train()
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(2))
    hf(tokens, labels=tokens).loss.backward()
    theirs = {}
    for name, p in hf.named_parameters():
        if name.endswith("experts.gate_up_proj"):
            theirs[name.replace("gate_up_proj", "w1")], theirs[name.replace("gate_up_proj", "w3")] = p.grad.chunk(2, dim=1)
        else:
            theirs[name.replace("experts.down_proj", "experts.w2")] = p.grad

    def worst_difference(coef: float) -> dict[str, float]:
        ours = load_model(tmp_path / "hf").train()
        balance = ExpertBalance([ours], ours.args, aux_loss_coef=coef, bias_update_rate=0.0)
        balance.start_step(accum=1)
        logits = ours(tokens)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
        balance.after_step(applied=True)
        if coef:
            assert abs(balance.scalars["moe/aux_loss"] - hf(tokens, labels=tokens).aux_loss.item()) < 1e-6
        worst = {"router": 0.0, "other": 0.0}
        for name, p in ours.named_parameters():
            hf_name = name.replace("layers.", "model.layers.").replace("moe.experts", "mlp.experts") if ".experts." in name else NAMES.to_hf(name)
            kind = "router" if "router" in name else "other"
            worst[kind] = max(worst[kind], ((p.grad - theirs[hf_name]).abs().max() / theirs[hf_name].abs().max()).item())
        return worst

    with_aux, without = worst_difference(0.01), worst_difference(0.0)
    print(f"\nQWEN3-MOE gradients against transformers' loss: max relative difference {with_aux} with the auxiliary "
          f"term, routers {without['router']:.2e} without it")
    assert max(with_aux.values()) < 1e-5
    assert without["router"] > 1e-3  # so the test can fail


def test_the_expert_bias_moves_loads_toward_even():
    """DeepSeek-V3's auxiliary-loss-free balancing (trainer/expert_balance.py) on the debug DeepSeek-V3-style
    model with a router skewed toward two experts: stepping only the bias on the same tokens, every MoE
    layer's most loaded expert falls toward the mean; with a zero rate nothing moves."""
    from trainer.expert_balance import ExpertBalance
    from trainer.weights.seeded_init import SeededInit
    from trainer.weights.placement import fill_from

    def run(rate: float) -> list[float]:
        args = flavor_args("qwen3_moe_debug_dsv3", vocab_size=VOCAB)
        model = build_meta_model(args)
        model.to_empty(device="cpu")
        model.init_buffers()
        fill_from(model, SeededInit(args, 0, {n: p.shape for n, p in model.named_parameters()}))
        with torch.no_grad():
            for i in args.moe_layers:
                model.layers[str(i)].moe.router.weight[:2] += 0.2  # experts 0 and 1 favoured
        balance = ExpertBalance([model.train()], args, aux_loss_coef=0.0, bias_update_rate=rate)
        tokens = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(0))
        worst = []
        for _ in range(60):
            balance.start_step(accum=1)
            model(tokens)
            balance.after_step(applied=True)
            worst.append(balance.scalars["moe/load_max_over_mean"])
        return worst

    moving, frozen = run(0.002), run(0.0)
    print(f"\nexpert bias: max/mean load {moving[0]:.2f} -> {moving[-1]:.2f} (rate 0.002), {frozen[0]:.2f} -> "
          f"{frozen[-1]:.2f} (rate 0)")
    assert moving[0] >= 2.0 and moving[-1] < 0.7 * moving[0]
    assert frozen[-1] == frozen[0]


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapters_over_the_experts_match_peft_and_merge(tmp_path, kind):
    """LoRA over every expert (adapters.targets experts) and attention, with nonzero updates, against peft's
    own `target_parameters` LoRA on transformers' model (the oracle): our PEFT export loads in peft over our
    base export and gives our logits; the merged export (LoRA and DoRA) loads in transformers and gives them
    too; the grouped path with adapters equals the per-expert loop, values and gradients."""
    from peft import PeftModel

    from trainer.adapters import apply_adapters, finish_unit
    from trainer.adapters.experts import LoRAExperts
    from trainer.adapters.export import base_named_weights, export_peft, merged_named_weights
    from trainer.config.schema import AdaptersConfig

    hf = _hf_qwen3_moe(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    cfg = AdaptersConfig(kind=kind, rank=4, alpha=8.0, dropout=0.0, targets=["experts", "q"])
    apply_adapters(ours, cfg)
    finish_unit([("", ours)], cfg=cfg, shards=1, seed=0, frozen_dtype=torch.float32)
    experts = [m for m in ours.modules() if isinstance(m, LoRAExperts)]
    assert len(experts) == 3 and all(not m.w1.requires_grad for m in experts)
    with torch.no_grad():  # updates that move every expert, differently
        for name, p in ours.named_parameters():
            if "lora_b" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    tokens = torch.randint(0, VOCAB, (2, 50), generator=torch.Generator().manual_seed(1))
    logits = ours(tokens)
    logits.sum().backward()
    grouped = {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}
    ours.zero_grad()
    for m in experts:
        m.grouped = False
    looped = ours(tokens)
    looped.sum().backward()
    assert (looped - logits).abs().max().item() < 1e-6
    assert max((p.grad - grouped[n]).abs().max().item() / grouped[n].abs().max().item()
               for n, p in ours.named_parameters() if p.requires_grad) < 1e-6

    export_hf(ours, tmp_path / "merged", dtype=torch.float32, tensors=merged_named_weights(ours))
    merged = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    with torch.no_grad():
        diffs = {"merged": (merged(tokens).logits - logits).abs().max().item()}
    if kind == "lora":
        export_hf(ours, tmp_path / "base", dtype=torch.float32, tensors=base_named_weights(ours))
        export_peft(ours, cfg, tmp_path / "peft")
        base = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "base").float().eval()
        with torch.no_grad():
            diffs["peft"] = (PeftModel.from_pretrained(base, tmp_path / "peft").eval()(tokens).logits - logits).abs().max().item()
    print(f"\nADAPTERS OVER EXPERTS ({kind}): max |theirs - ours| = {diffs}")
    assert all(d < 1e-5 for d in diffs.values())
    assert (hf(tokens).logits - logits).abs().max().item() > 1e-2  # the adapters did change the model
