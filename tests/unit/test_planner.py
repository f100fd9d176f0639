"""The layout planner: its stage views estimate as the real pipeline split does, every layout it proposes
starts (make_plan accepts its overrides) with the memory the dry run gives it, its time model moves the way
each choice should, and its command line refuses bad input in one line."""

import dataclasses

import pytest
import torch

import train
from trainer.config import ConfigError, load_config
from trainer.dry_run import busiest_parts, estimate_memory
from trainer.plan import make_plan
from trainer.planner.candidates import Candidate, variant_plan
from trainer.planner.devices import DATASHEETS, Link, load_profile
from trainer.planner.search import predict_plan, search
from trainer.planner.views import ModelView, busiest_views
from trainer.precision import Precision

H100 = DATASHEETS["h100-80gb"]
FP32 = Precision(torch.float32, torch.float32)


def _cfg(*overrides):
    return load_config("configs/debug.yaml", ["training.global_batch_size=-1", *overrides])


@pytest.mark.parametrize("pp,schedule,layers", [(2, "1f1b", 4), (3, "1f1b", 4), (2, "interleaved_1f1b", 5), (4, "gpipe", 9)])
def test_stage_views_estimate_as_the_real_split(pp, schedule, layers):
    cfg = _cfg(f"parallel.pp={pp}", f"parallel.pp_schedule={schedule}", f"model.n_layers={layers}",
               f"training.local_batch_size={2 * pp}")
    plan = make_plan(cfg, pp)
    real = estimate_memory(plan, FP32)
    viewed = dataclasses.replace(plan, meta=ModelView(plan.meta))
    parts = busiest_views(plan.family, viewed.meta, pp, plan.num_stages)
    assert estimate_memory(viewed, FP32, parts) == real
    assert sorted(len(p.layers) for p in parts) == sorted(len(p.layers) for p in busiest_parts(plan))


def test_every_proposed_layout_starts_with_the_memory_the_plan_gave_it():
    """The overrides printed for each of the best layouts, given to the config parser and make_plan as a
    user would, give the same layout and the same dry-run estimate."""
    cfg = _cfg("training.global_batch_size=16", "data.num_streams=8")
    result = search(cfg, 8, H100)
    assert result.ranked and result.considered > len(result.ranked)
    seen = set()
    for r in result.ranked[:40]:
        overrides = [o for o in r.overrides()] + (["fp8.emulate=true"] if r.candidate.float8 else [])
        plan = make_plan(load_config("configs/debug.yaml", overrides), 8)
        c = r.candidate
        assert (plan.dims.pp, plan.dims.dp_replicate, plan.dims.dp_shard, plan.dims.cp, plan.dims.tp) == \
            (c.pp, c.dp_replicate, c.dp_shard, c.cp, c.tp)
        assert plan.accum_steps == c.accum_steps and plan.cfg.training.global_batch_size == 16
        assert estimate_memory(plan, FP32) == pytest.approx(r.prediction.memory)  # debug.yaml computes in float32
        seen.add(c.layout().split(" x ")[0].split(" ")[0])
    assert len(seen) >= 3  # several kinds of layout among the best, not one repeated


def test_the_time_model_moves_as_each_choice_should():
    cfg = _cfg("model.dim=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=4", "training.seq_len=1024",
               "training.local_batch_size=8", "training.global_batch_size=64", "data.num_streams=8")
    base = make_plan(cfg, 8)
    viewed = dataclasses.replace(base, meta=ModelView(base.meta))

    def predicted(**kw):
        fields = dict(pp=1, dp_replicate=1, dp_shard=8, cp=1, tp=1, ep=1, local_batch=8, accum_steps=1, ac="none")
        fields.update(kw)
        c = Candidate(**fields)
        plan = variant_plan(viewed, c, 8)
        from trainer.planner.estimate import predict

        return predict(plan, H100, Precision(torch.bfloat16, torch.float32),
                       busiest_views(plan.family, plan.meta, plan.dims.pp, plan.num_stages))

    none, full, sel = predicted(), predicted(ac="full"), predicted(ac="selective_op")
    assert full.step_s > sel.step_s > none.step_s and full.device_bytes < sel.device_bytes < none.device_bytes
    assert full.seconds["compute: block matmuls"] == pytest.approx(none.seconds["compute: block matmuls"] * 4 / 3)
    tp = predicted(tp=2, dp_shard=4, local_batch=16)
    assert any(k.startswith("tensor parallel") for k in tp.seconds) and not any(k.startswith("tensor") for k in none.seconds)
    # A pipeline's bubble shrinks with more microbatches and with interleaving.
    pipe = {m: predicted(pp=2, dp_shard=4, local_batch=16, pp_microbatches=m) for m in (2, 8)}
    assert pipe[8].seconds["pipeline bubble"] < pipe[2].seconds["pipeline bubble"]
    inter = predicted(pp=2, dp_shard=4, local_batch=16, pp_microbatches=2, pp_schedule="interleaved_1f1b")
    assert inter.seconds["pipeline bubble"] < pipe[2].seconds["pipeline bubble"]
    # Between nodes the same FSDP traffic is slower.
    inside = predict_plan(base, dataclasses.replace(H100, overlap=0.0))
    across = predict_plan(base, dataclasses.replace(H100, overlap=0.0), nodes=8)
    assert across.step_s > inside.step_s


def test_a_plan_keeps_within_the_memory_margin_and_says_when_nothing_fits():
    cfg = load_config("configs/llama3_1_8b.yaml", [])
    tight = search(cfg, 8, H100, margin=0.3, keep=10**6)
    loose = search(cfg, 8, H100, margin=0.8, keep=10**6)
    assert all(r.prediction.device_bytes <= 0.3 * H100.memory_bytes for r in tight.ranked)
    assert len(tight.ranked) < len(loose.ranked)
    nothing = search(cfg, 1, DATASHEETS["l40s"])
    assert not nothing.ranked and nothing.rejected


def test_fit_link_recovers_latency_and_bandwidth():
    points = [(b, 50e-6 + b / 2e9) for b in (2**16, 2**20, 2**22, 2**24)]
    link = Link.fit(points)
    assert link.latency_s == pytest.approx(50e-6, rel=1e-3) and link.bus_bytes_per_s == pytest.approx(2e9, rel=1e-3)


def test_profiles_round_trip_and_bad_ones_are_named(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(H100.to_json())
    assert load_profile(str(path)) == H100
    path.write_text("{}")
    with pytest.raises(ConfigError, match="not a device profile"):
        load_profile(str(path))
    with pytest.raises(ConfigError, match="neither a known device"):
        load_profile("tpu-v9")


@pytest.mark.parametrize("argv,says", [
    (["--plan", "--device", "tpu-v9"], "neither a known device"),
    (["--device", "h100-80gb"], "go with --plan"),
    (["--plan", "--dry-run"], "separate"),
    (["--plan", "--world-size", "6", "--nodes", "4", "--device", "h100-80gb"], "does not split over --nodes"),
    (["--plan", "--world-size", "16", "--device", "h100-80gb"], "raise --nodes"),
    (["--plan", "--memory-margin", "1.5"], "--memory-margin"),
    (["--calibrate"], "--profile-out"),
])
def test_bad_plan_commands_say_what_to_change(argv, says, capsys):
    assert train.main(["--config", "configs/debug.yaml", *argv]) == 2
    assert says in capsys.readouterr().err


def _cpu_profile(tmp_path):
    """A CPU profile with the rates of a small machine (no measurement: the test needs a fixed one)."""
    profile = dataclasses.replace(H100, name="test cpu", kind="cpu", memory_bytes=16 * 2**30, devices_per_node=4, cores=4,
                                  matmul={f"float32@{t}": [(256, 2e10 * t), (1024, 4e10 * t)] for t in (1, 2, 4)},
                                  attention={f"float32@{t}": [(256, 1e10 * t)] for t in (1, 2, 4)},
                                  elementwise={f"float32@{t}": 5e9 * t for t in (1, 2, 4)},
                                  peak_flops={"float32": 1.6e11}, overlap=0.0, float8_speedup=0.4, process_bytes=3e8)
    path = tmp_path / "cpu.json"
    path.write_text(profile.to_json())
    return path


def test_auto_takes_the_plans_first_choice_and_says_so(tmp_path, capsys):
    path = _cpu_profile(tmp_path)
    overrides = ["parallel.auto=true", f"parallel.auto_profile={path}", "training.global_batch_size=8"]
    assert train.main(["--config", "configs/debug.yaml", "--dry-run", "--world-size", "4", *overrides]) == 0
    out = capsys.readouterr().out
    chosen = next(line for line in out.splitlines() if line.startswith("parallel.auto:"))
    best = search(load_config("configs/debug.yaml", overrides), 4, load_profile(str(path))).ranked[0]
    assert " ".join(best.overrides()) in chosen
    c = best.candidate
    assert f"layout: world 4 = pp {c.pp} x dp_replicate {c.dp_replicate} x dp_shard {c.dp_shard}" in out


def test_auto_without_a_gpu_needs_a_profile(capsys):
    if torch.cuda.is_available():
        pytest.skip("with a GPU, parallel.auto plans with its datasheet")
    assert train.main(["--config", "configs/debug.yaml", "--dry-run", "parallel.auto=true"]) == 2
    assert "parallel.auto_profile=FILE" in capsys.readouterr().err
    assert train.main(["--config", "configs/debug.yaml", "--dry-run", "parallel.auto_profile=x.json"]) == 2
    assert "set parallel.auto=true" in capsys.readouterr().err


def test_the_memory_lower_bound_never_exceeds_the_estimate():
    """The search skips a layout whose stored weights and optimizer state alone are over the margin: that
    bound must never be above the estimate it stands in for (4-bit bases and 8-bit moments included)."""
    from trainer.dry_run import converted_estimate
    from trainer.planner.search import _stored_bytes

    for extra in ([], ["adapters.kind=lora", "adapters.quantize_base=nf4"], ["optimizer.name=adamw_8bit"]):
        cfg = _cfg("training.global_batch_size=16", "data.num_streams=8", *extra)
        for r in search(cfg, 8, H100, keep=60).ranked:
            parts = busiest_views(r.plan.family, r.plan.meta, r.plan.dims.pp, r.plan.num_stages)
            bound = _stored_bytes(r.plan, FP32, converted_estimate(r.plan, FP32, parts))
            assert 0 < bound <= r.prediction.device_bytes, (r.candidate, bound, r.prediction.device_bytes)


def test_measured_wrapper_costs_and_compute_efficiency_enter_the_time(tmp_path):
    """A calibrated profile's FSDP links, tensor-parallel block cost and compute efficiency (calibrate_layouts.py,
    reference.py) replace the raw collectives' figures where they apply, each by exactly its own amount, and
    survive the profile file."""
    from trainer.planner import reference

    base = load_profile(str(_cpu_profile(tmp_path)))
    gather, reduce = Link(2e-3, 3e8), Link(4e-3, 2e8)
    measured = dataclasses.replace(base, fsdp_links={"gather": gather, "reduce": reduce, "replicate_gather": Link(1e-3, 1.0),
                                                     "replicate_reduce": Link(5e-3, 6e8)}, tp_forward_s=0.01, tp_block_s=0.03)
    path = tmp_path / "measured.json"
    path.write_text(measured.to_json())
    assert load_profile(str(path)) == measured

    def time_of(profile, *overrides, world=2):
        return predict_plan(make_plan(_cfg("training.global_batch_size=8", *overrides), world), profile)

    # FSDP: the measured reduce's latency, once per block and microbatch (the profile hides none: overlap 0).
    layers = make_plan(_cfg(), 1).model_args.n_layers
    accum = make_plan(_cfg("training.global_batch_size=8"), 2).accum_steps
    slower = dataclasses.replace(measured, fsdp_links={**measured.fsdp_links, "reduce": Link(5e-3, 2e8)})
    assert time_of(slower).step_s - time_of(measured).step_s == pytest.approx(layers * 1e-3 * accum)
    assert time_of(measured).step_s != time_of(base).step_s  # the raw collectives' links no longer count
    # Tensor parallelism: a block's measured cost, forward and backward, once per block and microbatch.
    tp = time_of(measured, "parallel.tp=2")
    dearer = time_of(dataclasses.replace(measured, tp_block_s=0.05), "parallel.tp=2")
    accum = make_plan(_cfg("training.global_batch_size=8", "parallel.tp=2"), 2).accum_steps
    assert dearer.step_s - tp.step_s == pytest.approx(layers * 0.02 * accum)
    # Compute efficiency: the calibrated remainder is what the counted compute leaves of the measured time.
    half = dataclasses.replace(base, compute_efficiency={"float32@4": 0.5})
    one, two = time_of(base, world=1), time_of(half, world=1)
    from trainer.planner.estimate import COMPUTE_PARTS, UNCOUNTED

    assert two.seconds[UNCOUNTED] == pytest.approx(sum(v for k, v in one.seconds.items() if k in COMPUTE_PARTS))
    predicted = sum(v for k, v in reference.efficiency(base, {"float32@2": 1.0}).items())
    assert 0 < predicted < 10  # the reference's predicted compute over a second, at 2 threads of the profile's rates
    assert reference.efficiency(base, {"float32@2": 2.0})["float32@2"] == pytest.approx(predicted / 2)


def _layout_costs_worker(rank, port, out):
    import os

    import torch.distributed as dist

    from trainer.planner import calibrate_layouts

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    calibrate_layouts.FSDP_DIMS, calibrate_layouts.TP_DIM, calibrate_layouts.TRIALS = (64, 128), 64, 3
    costs = calibrate_layouts.layout_costs(2, torch.device("cpu"), lambda: None)
    if rank == 0:
        torch.save(costs, out)
    dist.destroy_process_group()


def test_the_calibration_measures_the_parallel_wrappers_and_a_reference_step(tmp_path):
    """calibrate_layouts.py over 2 real gloo processes through the project's own FSDP and tensor-parallel
    code, at small widths, and reference.py's training microbatch: every figure a finite, positive cost."""
    import math

    import torch.multiprocessing as mp

    from trainer.planner import reference
    from trainer.planner.calibrate import _free_port

    out = tmp_path / "costs.pt"
    mp.start_processes(_layout_costs_worker, args=(_free_port(), str(out)), nprocs=2, start_method="spawn")
    costs = torch.load(out, weights_only=False)
    assert set(costs["fsdp_links"]) == {"gather", "reduce", "replicate_gather", "replicate_reduce"}
    for name, link in costs["fsdp_links"].items():
        assert link.latency_s >= 0 and link.bus_bytes_per_s > 0 and math.isfinite(link.latency_s), name
        assert link.seconds(2**20, 1) > 0, name
    assert 0 < costs["tp_forward_s"] < costs["tp_block_s"] < 1
    assert 0 < reference.measure(torch.device("cpu"), "float32", trials=1) < 60
