"""The default job as a user runs it: 200 steps of configs/debug.yaml, read back from TensorBoard."""

import pytest

from tests.helpers import run_train, tensorboard_scalars


@pytest.mark.slow
def test_default_config_loss_falls(tmp_path):
    result = run_train(["--config", "configs/debug.yaml", f"job.output_dir={tmp_path}", "export.hf=true", "export.dtype=float32"])
    assert result.returncode == 0, result.stderr[-3000:]
    loss = tensorboard_scalars(tmp_path, "loss/train")
    assert set(loss) == {1, *range(10, 201, 10)}
    # A byte-level model starts near ln(259) = 5.56 nats; it must fall well below it.
    assert loss[1] > 5.0
    assert loss[200] < 0.5 * loss[1], loss
    assert max(loss[s] for s in range(150, 201, 10)) < min(loss[s] for s in (10, 20, 30))
    for tag in ("lr", "grad_norm", "throughput/tokens_per_sec_per_device", "throughput/mfu_percent", "memory/peak_gib"):
        assert len(tensorboard_scalars(tmp_path, tag)) == 21, tag
    # The console line carries every metric the brief names.
    last = [line for line in result.stdout.splitlines() if line.startswith("step    200")][0]
    for word in ("loss", "lr", "grad_norm", "tok/s/device", "mfu", "mem", "ms"):
        assert word in last
    assert (tmp_path / "config.yaml").read_text().startswith("job:")
    _check_export(tmp_path / "export" / "hf", loss[200])


def _check_export(folder, final_loss):
    """The trained model, exported, loads in transformers, which scores held-out text as ours does."""
    import torch
    from transformers import LlamaForCausalLM

    from trainer.config.schema import DataConfig
    from trainer.data.documents import load_documents
    from trainer.weights.load import load_model

    hf = LlamaForCausalLM.from_pretrained(folder).eval()
    ours = load_model(folder)
    text = load_documents(DataConfig())[5]
    ids = torch.tensor([[256] + list(text.encode())[:255]])
    with torch.no_grad():
        hf_out = hf(ids, labels=ids)
        assert (hf_out.logits - ours(ids)).abs().max().item() < 1e-4
    assert hf_out.loss.item() < 4.0  # far below the untrained ln(259) = 5.56
