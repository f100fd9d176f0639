"""Adapter runs save adapter-only checkpoints, which resume exactly after kill -9: QDoRA over an NF4
base sharded by FSDP2, where the base is rebuilt (loaded and quantized) at every start, with adapter
dropout drawing random masks every step, checkpoints written in the background (async) and bfloat16
optimizer moments."""

from concurrent.futures import ThreadPoolExecutor

from tests.helpers import kill_9_and_resume, run_train, tensorboard_scalars
from trainer.checkpoint.safe_reader import SafeFileSystemReader

ARGS = ["--config", "configs/debug.yaml", "training.steps=12", "metrics.log_every=1", "checkpoint.interval=4",
        "adapters.kind=dora", "adapters.quantize_base=nf4", "adapters.rank=4", "optimizer.lr=1e-2", "job.deterministic=true",
        # Dropout makes the resumed losses depend on the restored RNG state: anything that draws from the
        # global generator between the restore and step 1 shows here.
        "adapters.dropout=0.1", "checkpoint.async_save=true",
        # bfloat16 moments, stochastically rounded: their state must come back exactly too.
        "optimizer.name=adamw_bf16"]


def test_adapter_only_checkpoint_resumes_exactly(tmp_path):
    with ThreadPoolExecutor(max_workers=2) as pool:  # independent runs, side by side
        full = pool.submit(run_train, ["--config", "configs/debug.yaml", "training.steps=4", "checkpoint.interval=4",
                                       f"job.output_dir={tmp_path / 'full'}"], env={"OMP_NUM_THREADS": "1"})
        reference = run_train([*ARGS, f"job.output_dir={tmp_path / 'ref'}"], nproc=2)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert full.result().returncode == 0
    saved = SafeFileSystemReader(str(tmp_path / "ref" / "checkpoints" / "step-4")).read_metadata().state_dict_metadata
    model_keys = {k for k in saved if k.startswith("model.")}
    # The adapters (A, B, DoRA magnitude of 7 layers x 4 blocks) and nothing of the frozen base.
    assert len(model_keys) == 84 and all(k.endswith((".lora_a", ".lora_b", ".magnitude")) for k in model_keys)
    assert "model.tok_embeddings.weight" not in saved and "model.layers.0.attention.wq.weight" not in saved
    size = lambda d: sum(f.stat().st_size for f in d.iterdir())  # noqa: E731
    assert size(tmp_path / "ref" / "checkpoints" / "step-4") < size(tmp_path / "full" / "checkpoints" / "step-4") / 3

    out = tmp_path / "run"
    kill_9_and_resume(ARGS, out, tmp_path / "ref", nproc=2, checkpoint_step=4, compare=range(9, 13))


def test_resuming_over_another_base_is_refused(tmp_path):
    """Adapter checkpoints hold no base: resuming them over a different one would be silently wrong. Over
    the same base, plain LoRA (no 1-D parameters to train) resumes exactly."""
    common = ["--config", "configs/debug.yaml", "checkpoint.interval=2", "adapters.kind=lora", "adapters.quantize_base=nf4",
              "metrics.log_every=1", "job.deterministic=true",
              # A schedule that does not depend on training.steps, so that 2 steps + 1 resumed equal 3 straight.
              "lr_scheduler.warmup_steps=0", "lr_scheduler.decay_type=constant"]
    args = [*common, "training.steps=2", f"job.output_dir={tmp_path}"]
    with ThreadPoolExecutor(max_workers=2) as pool:  # independent runs, side by side
        straight = pool.submit(run_train, [*common, "training.steps=3", f"job.output_dir={tmp_path / 'straight'}"],
                               env={"OMP_NUM_THREADS": "1"})
        first = run_train(args, env={"OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_train([*args, "training.steps=4", "adapters.quantize_base=none"])
    assert again.returncode == 2
    assert ('its adapters were trained over the base {"init_from": "seeded init, job.seed=0", "quantize_base": "nf4"}, '
            'but this run\'s base is {"init_from": "seeded init, job.seed=0", "quantize_base": "none"}') in again.stderr
    assert (tmp_path / "checkpoints" / "step-2").is_dir()  # the completed checkpoint is kept
    resumed = run_train([*args, "training.steps=3"], env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    straight = straight.result()
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert tensorboard_scalars(tmp_path, "loss/train")[3] == tensorboard_scalars(tmp_path / "straight", "loss/train")[3]
