"""LoRA supervised finetuning of the real stories260K on real Alpaca records, through train.py."""

from tests.helpers import run_train, stories260k_args, tensorboard_scalars


def test_lora_sft_of_stories260k_on_alpaca_lowers_the_loss(shared, tmp_path):
    result = run_train([
        "--config", "configs/debug.yaml", *stories260k_args(shared),
        f"data.source={shared('instruct/alpaca/alpaca_data_first2000.json')}", "data.task=sft",
        "data.skip_bad_records=true", "adapters.kind=lora", "adapters.rank=8", "optimizer.lr=3e-3",
        "training.steps=20", "metrics.log_every=1", "checkpoint.enabled=false", f"job.output_dir={tmp_path}",
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping 4 bad records" in result.stdout
    assert "training 46,240 of 306,272 parameters" in result.stdout  # only the adapters train
    loss = tensorboard_scalars(tmp_path, "loss/train")
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (18, 19, 20)) / 3
    assert last < first - 0.4, loss
