"""Each user mistake gives one line on stderr naming what is wrong and what to do, and a non-zero exit,
before any training work (nothing is written to the output directory)."""

import pytest

import train
from tests.helpers import run_train

CONFIG = ["--config", "configs/debug.yaml"]


def _error(capsys, tmp_path, *overrides, config=CONFIG):
    code = train.main([*config, f"job.output_dir={tmp_path / 'out'}", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == train.EXIT_USER_ERROR
    assert err.startswith("error: ") and "\n" not in err, err
    assert not (tmp_path / "out").exists()  # failed before training work
    return err


CASES = {
    "unknown key": (["training.stepz=5"], "unknown config key 'training.stepz' in training; did you mean 'training.steps'?"),
    "unknown section": (["optimiser.lr=1"], "did you mean 'optimizer'?"),
    "wrong type": (["training.steps=many"], "config key 'training.steps': Value 'many' of type 'str' could not be converted to Integer"),
    "bad choice": (["lr_scheduler.decay_type=cosin"], "lr_scheduler.decay_type='cosin' is not one of: cosine, linear, constant"),
    "global batch": (["training.global_batch_size=10"], "training.global_batch_size=10 is not a multiple of training.local_batch_size x data-parallel size = 4 x 1 = 4"),
    "parallel sizes": (["parallel.dp_shard=2"], "pp x dp_replicate x dp_shard x tp = 1 x 1 x 2 x 1 = 2 do not multiply to the world size 1"),
    "seq_len": (["training.seq_len=4096"], "training.seq_len=4096 is over the model's maximum sequence length 1024"),
    "flavor": (["model.flavor=llama9"], "model.flavor='llama9' is not one of: debug, llama3_2_1b"),
    "override form": (["training.steps"], "override 'training.steps' is not of the form dotted.key=value"),
    "missing data": (["data.source=/nope/x.jsonl"], "data.source=/nope/x.jsonl: no such file, directory or glob match"),
    "missing checkpoint": (["model.init_from=/nope/model"], "model.init_from: no such file or directory: /nope/model"),
    "missing tokenizer": (["tokenizer.kind=auto", "tokenizer.path=/nope/tok.model"], "tokenizer.path: no such file or directory: /nope/tok.model"),
    "negative steps": (["training.steps=0"], "training.steps=0 must be at least 1"),
    "adapter kind": (["adapters.kind=qlora"], "adapters.kind='qlora' is not one of: none, lora, dora"),
    "adapter rank": (["adapters.kind=lora", "adapters.rank=0"], "adapters.rank=0 must be at least 1"),
    "adapter dropout": (["adapters.kind=dora", "adapters.dropout=1.0"], "adapters.dropout=1.0 must lie in [0, 1)"),
    "adapter targets": (["adapters.kind=lora", "adapters.targets=[qkv]"], "adapters.targets=['qkv'] matches no linear layer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_message(capsys, tmp_path, case):
    overrides, expected = CASES[case]
    assert expected in _error(capsys, tmp_path, *overrides)


def test_missing_config_file(capsys, tmp_path):
    assert "config file not found: nope.yaml" in _error(capsys, tmp_path, config=["--config", "nope.yaml"])


def test_invalid_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    assert f"{bad}: not valid YAML" in _error(capsys, tmp_path, config=["--config", str(bad)])


def test_bad_data_records(capsys, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n' * 20)
    err = _error(capsys, tmp_path, f"data.source={tmp_path / 'd.jsonl'}")
    assert "d.jsonl: no field 'text' (its fields: body); set data.text_field" in err
    (tmp_path / "short.jsonl").write_text('{"text": "tiny"}\n' * 20)
    err = _error(capsys, tmp_path, f"data.source={tmp_path / 'short.jsonl'}")
    assert "every document is too short" in err


def test_exit_code_of_the_real_process(tmp_path):
    result = run_train([*CONFIG, "training.stepz=5"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unknown config key 'training.stepz' in training; did you mean 'training.steps'?"
    )


def test_dry_run_reports_sizes_and_memory(capsys):
    assert train.main(["--config", "configs/debug.yaml", "--dry-run", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "parameters total: 820,352" in out and "parameters non_embedding: 779,392" in out
    assert "layout: world 2 = pp 1 x dp_replicate 1 x dp_shard 2 x tp 1; 1 microbatch(es)" in out
    assert "optimizer state (AdamW, fp32, trainable only)" in out and "total" in out
    assert "FLOPs per token (training): " in out


def test_dry_run_of_a_70b_shape_needs_no_memory(capsys):
    # Built on the meta device: planning a 70B job allocates nothing.
    code = train.main(["--config", "configs/debug.yaml", "--dry-run", "--world-size", "8", "model.flavor=llama3_1_70b",
                       "tokenizer.kind=byte", "training.global_batch_size=-1"])
    out = capsys.readouterr().out
    assert code == 0 and "parameters total: 70,553,706,496" in out


def test_on_and_off_are_words_not_booleans():
    """YAML reads `off` as false; metrics.progress documents on / off, and both mean what they say."""
    from trainer.config import load_config

    assert [load_config("configs/debug.yaml", [f"metrics.progress={w}"]).metrics.progress for w in ("off", "on", "auto")] == \
        ["off", "on", "auto"]


def test_check_holds_the_plan_against_the_machine(capsys):
    """The 70B QLoRA config on a machine without two GPUs and 50 GiB of host memory: --check says why it
    cannot run here (or, planning for another machine, says it as a note and passes)."""
    from trainer.machine_fit import Machine, fit_problems, this_machine
    from trainer.plan import make_plan

    config = ["--config", "configs/llama3_1_70b_qlora.yaml", "--check", "--world-size", "2"]
    plan = make_plan(train.load_config(config[1]), 2)
    cpu_host = Machine(gpus=0, gpu_bytes=0, gpu_name="", host_available=24 * 2**30, cores=2)
    assert fit_problems(plan, cpu_host, 2) == [
        "the ranks need about 50.5 GiB of host memory (2 rank(s) x 25.3 GiB, the device's share included: without a "
        "GPU it is host memory) by the dry run's estimate; 24.0 GiB is available"]
    one_gpu = Machine(gpus=1, gpu_bytes=24 * 2**30, gpu_name="L4", host_available=256 * 2**30, cores=16)
    assert fit_problems(plan, one_gpu, 2) == ["2 rank(s) on this host need a GPU each; it has 1"]
    assert fit_problems(plan, one_gpu, 1) == []  # the other rank on another node
    small_gpus = Machine(gpus=2, gpu_bytes=4 * 2**30, gpu_name="T4", host_available=30 * 2**30, cores=16)
    assert [p.split(";")[0] for p in fit_problems(plan, small_gpus, 2)] == [
        "a rank needs about 5.3 GiB of GPU memory by the dry run's estimate",
        "the ranks need about 39.9 GiB of host memory (2 x 19.9 GiB offloaded) by the dry run's estimate"]

    if not fit_problems(plan, this_machine(), 2):
        pytest.skip("this machine could run the 70B QLoRA plan")
    assert train.main(config) == train.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (torchao's import noise before it, in this process)
    assert err.startswith("error: this plan cannot run on this machine (") and "--for-another-machine" in err
    assert train.main([*config, "--for-another-machine"]) == 0
    out = capsys.readouterr().out
    assert "check: ok" in out and "note: planned for another machine; this one (" in out


def test_a_list_of_integers_names_the_bad_item():
    """trainer.cli.integers (bench.long_context --seq, bench.qat --seeds): the list, or the item it refuses."""
    import argparse

    from trainer.cli import integers

    assert integers(1)("8192,16384") == [8192, 16384] and integers(0)("0") == [0]
    for text, message in (("8192,abc", "'8192,abc': 'abc' is not an integer (a comma-separated list, e.g. 1,2)"),
                          ("16,0", "'16,0': 0 must be at least 1"), ("", "'': '' is not an integer")):
        with pytest.raises(argparse.ArgumentTypeError) as refused:
            integers(1)(text)
        assert str(refused.value).startswith(message), str(refused.value)
