"""train.py starting from a real pretrained model (stories260K, llama2.c format) and its real tokenizer."""

from tests.helpers import run_train, stories260k_args, tensorboard_scalars


def test_finetune_stories260k_starts_from_its_weights(shared, tmp_path):
    result = run_train([
        "--config", "configs/debug.yaml", *stories260k_args(shared),
        f"data.source={shared('text/tinystories/tinystories_train_head.txt')}", "data.num_streams=1",
        "data.add_eos=false", "training.steps=10", "metrics.log_every=1", "optimizer.lr=1e-4",
        f"job.output_dir={tmp_path}",
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training 260,032 of 260,032 parameters" in result.stdout
    loss = tensorboard_scalars(tmp_path, "loss/train")
    # From random weights the first loss would be ln(512) = 6.2; the pretrained model knows this text.
    assert loss[1] < 1.7, loss
    assert loss[10] < 1.7, loss
