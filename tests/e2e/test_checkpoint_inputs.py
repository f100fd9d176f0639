"""Bad checkpoints are named, with the previous complete step suggested; seed, model-only and init_from
starts take the weights and nothing else."""

import pytest

from tests.helpers import run_train, tensorboard_scalars

COMMON = ["--config", "configs/debug.yaml", "metrics.log_every=1", "checkpoint.interval=2", "checkpoint.keep_last=0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = run_train([*COMMON, "training.steps=4", f"job.output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture
def fails(capfd):
    """Runs train.py's main in this process (as `python train.py` does: exit code 2 and one error line,
    seconds of imports saved per case) and returns its error line."""
    import train

    def run(tmp_path, *overrides, args=()):
        code = train.main([*COMMON, "training.steps=6", f"job.output_dir={tmp_path}", *overrides, *args])
        err = capfd.readouterr().err
        assert code == 2 and "Traceback" not in err, err[-2000:]
        return err.strip().splitlines()[-1]

    return run


def test_disabled_checkpointing_neither_saves_nor_picks_up_old_ones(run, tmp_path):
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(run, copy)
    result = run_train([*COMMON, "training.steps=2", "checkpoint.enabled=false", f"job.output_dir={copy}"])
    assert result.returncode == 0 and "resumed from" not in result.stdout
    assert sorted(tensorboard_scalars(copy, "loss/train"))[:2] == [1, 2]  # started at step 1 again


def test_missing_path(run, tmp_path, fails):
    err = fails(tmp_path, "checkpoint.resume_from=/nope/step-3")
    assert "checkpoint.resume_from=/nope/step-3: no such directory" in err


def test_truncated_shard_names_the_file_and_the_previous_step(run, tmp_path, fails):
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(run, copy)
    shard = sorted((copy / "checkpoints" / "step-4").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    err = fails(copy, f"job.output_dir={copy}")
    assert f"{shard} has {shard.stat().st_size:,} bytes where the manifest says" in err  # caught by the manifest
    assert f"The previous complete checkpoint is {copy / 'checkpoints' / 'step-2'}" in err


def test_corrupt_metadata(run, tmp_path, fails):
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "step-4" / ".metadata").write_bytes(b"garbage")
    err = fails(copy, f"job.output_dir={copy}")
    assert "step-4/.metadata has 7 bytes where the manifest says" in err and "step-2" in err
    (copy / "checkpoints" / "step-4" / "manifest.json").unlink()  # a checkpoint from before manifests
    err = fails(copy, f"job.output_dir={copy}")
    assert "step-4/.metadata: cannot be read" in err and "step-2" in err


def test_different_model_shape(run, tmp_path, fails):
    err = fails(tmp_path, f"checkpoint.resume_from={run / 'checkpoints' / 'step-4'}", "model.dim=64", "model.n_heads=2", "model.n_kv_heads=1")
    assert "model.tok_embeddings.weight has shape (320, 128) but this model's is (320, 64)" in err


def test_seed_checkpoint_then_training_starts_from_it(tmp_path):
    seed = run_train([*COMMON, f"job.output_dir={tmp_path}", "checkpoint.create_seed=true"])
    assert seed.returncode == 0, seed.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "step-0" / ".metadata").is_file()
    trained = run_train([*COMMON, "training.steps=2", f"job.output_dir={tmp_path}"], nproc=2)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "resumed from" in trained.stdout and "(model weights only)" in trained.stdout
    fresh = tmp_path / "fresh"
    assert run_train([*COMMON, "training.steps=2", f"job.output_dir={fresh}"]).returncode == 0
    assert tensorboard_scalars(tmp_path, "loss/train")[1] == pytest.approx(tensorboard_scalars(fresh, "loss/train")[1], abs=1e-5)


@pytest.mark.parametrize("how", ["load_only_model", "init_from"])
def test_new_run_from_trained_weights(run, tmp_path, how):
    step4 = run / "checkpoints" / "step-4"
    overrides = (
        [f"checkpoint.resume_from={step4}", "checkpoint.load_only_model=true"] if how == "load_only_model"
        else [f"model.init_from={step4}", "model.flavor=null"]
    )
    result = run_train([*COMMON, "training.steps=2", f"job.output_dir={tmp_path}", *overrides])
    assert result.returncode == 0, result.stderr[-2000:]
    loss = tensorboard_scalars(tmp_path, "loss/train")
    trained = tensorboard_scalars(run, "loss/train")
    assert sorted(loss) == [1, 2]  # a new run: steps count from 1 again
    assert loss[1] < trained[1] - 0.5  # but from trained weights, not from scratch


def test_crafted_metadata_never_runs_code(run, tmp_path, fails):
    import pickle
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(run, copy)
    canary = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            import os

            return os.system, (f"touch {canary}",)

    (copy / "checkpoints" / "step-4" / ".metadata").write_bytes(pickle.dumps(Exploit()))
    # Whoever crafts a .metadata can drop or rewrite the manifest too: the reader itself must refuse.
    (copy / "checkpoints" / "step-4" / "manifest.json").unlink()
    err = fails(copy, f"job.output_dir={copy}")
    assert "refusing to load posix.system" in err or "refusing to load os.system" in err
    assert not canary.exists()


def test_a_flipped_byte_inside_a_tensor_is_refused_at_every_load_and_by_check(run, tmp_path, fails):
    """torch.distributed.checkpoint has no checksums: a byte changed inside a tensor would load as a wrong
    weight. The manifest written at commit names the file at a resume, --check, model.init_from and an
    export; the previous complete step still resumes."""
    import shutil

    import train

    copy = tmp_path / "out"
    shutil.copytree(run, copy)
    step4 = copy / "checkpoints" / "step-4"
    shard = sorted(step4.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40  # the middle of the shard: inside some tensor's bytes, the size unchanged
    shard.write_bytes(bytes(data))
    damaged = f"{shard} does not match its checksum (its bytes changed after it was written): the checkpoint is damaged. " \
              f"The previous complete checkpoint is {copy / 'checkpoints' / 'step-2'}"
    assert damaged in fails(copy, f"job.output_dir={copy}")
    for command in (["--check"], ["--dry-run", f"model.init_from={step4}", "model.flavor=null"]):
        assert damaged in fails(copy, f"job.output_dir={copy}", args=command), command
    from trainer.cli import run_command
    from trainer.export import main as export

    assert run_command(export, [str(step4), str(tmp_path / "hf")]) == 2 and not (tmp_path / "hf" / "config.json").exists()
    assert train.main(["--config", "configs/debug.yaml", f"model.init_from={step4}", "model.flavor=null", "--check"]) == 2
    resumed = run_train([*COMMON, "training.steps=6", f"job.output_dir={copy}",
                         f"checkpoint.resume_from={copy / 'checkpoints' / 'step-2'}"])
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]


def test_a_checkpoint_without_a_manifest_loads_with_a_note(run, tmp_path):
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(run, copy)
    for step in ("step-2", "step-4"):
        (copy / "checkpoints" / step / "manifest.json").unlink()
    result = run_train([*COMMON, "training.steps=6", f"job.output_dir={copy}"])
    assert result.returncode == 0 and "resumed from" in result.stdout, result.stderr[-2000:]
    assert "has no manifest.json (written before checkpoints carried checksums): its files are not verified" in result.stderr
