"""Knowledge distillation end to end: karpathy's pretrained stories260K teaches a smaller, randomly
initialised student on the TinyStories sample (a few KB, so that a student trained on its labels alone
overfits), validated on held-out TinyStories text. The same trainer, with the distillation loss."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import run_train, tensorboard_scalars

STEPS = 60


def _args(shared, out, *extra):
    return [
        "--config", "configs/debug.yaml", "model.dim=64", "model.n_layers=2", "model.n_heads=8", "model.n_kv_heads=4",
        "tokenizer.kind=auto", f"tokenizer.path={shared('tokenizers/tok512/tok512.model')}",
        f"data.source={shared('text/tinystories/tinystories_sample.txt')}", "data.text_sample_by=line",
        "data.num_streams=2", "training.seq_len=128", f"training.steps={STEPS}", "metrics.log_every=1",
        f"eval.source={shared('text/tinystories/tinystories_train_head.txt')}", f"eval.every={STEPS}",
        "checkpoint.enabled=false", f"job.output_dir={out}", *extra,
    ]


def test_distilled_student_beats_the_cross_entropy_student_and_shards(shared, tmp_path):
    teacher = [f"distill.teacher={shared('models/stories260K/stories260K.bin')}", "distill.kd_ratio=0.5"]
    ce = run_train(_args(shared, tmp_path / "ce"))
    assert ce.returncode == 0, ce.stderr[-3000:]
    kd = run_train(_args(shared, tmp_path / "kd", *teacher, "eval.sample_prompts=[Once upon a time]", "eval.sample_tokens=24"))
    assert kd.returncode == 0, kd.stderr[-3000:]
    assert "distilling from" in kd.stdout and "(ce " in kd.stdout
    # The validation's greedy sample: on the console and as TensorBoard text.
    sample = next(line for line in kd.stdout.splitlines() if line.startswith("sample"))
    print(f"\n{sample}")
    accumulator = EventAccumulator(str(tmp_path / "kd" / "tensorboard"))
    accumulator.Reload()
    (text,) = accumulator.Tensors("eval/sample_0/text_summary")
    assert text.step == STEPS and text.tensor_proto.string_val[0].decode().startswith("**Once upon a time**")
    ce_eval = tensorboard_scalars(tmp_path / "ce", "eval/loss")[STEPS]
    kd_eval = tensorboard_scalars(tmp_path / "kd", "eval/loss")[STEPS]
    print(f"\nDISTILL held-out loss after {STEPS} steps: cross-entropy only {ce_eval:.4f}, distilled {kd_eval:.4f}")
    assert kd_eval < ce_eval - 0.2

    # FSDP2 over 2 ranks, the teacher sharded too, against the single process.
    two = run_train(_args(shared, tmp_path / "two", *teacher), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    for tag in ("loss/train", "loss/kl", "loss/ce"):
        one_run, two_run = tensorboard_scalars(tmp_path / "kd", tag), tensorboard_scalars(tmp_path / "two", tag)
        worst = max(abs(one_run[s] - two_run[s]) for s in one_run)
        print(f"DISTILL 2 ranks vs 1, {tag}: max difference {worst:.2e}")
        assert sorted(two_run) == list(range(1, STEPS + 1)) and worst < 1e-5


def test_a_lora_student_learns_from_a_4bit_teacher_on_two_ranks(shared, tmp_path):
    """Adapters over a frozen (here seeded) base, with the reverse KL, from a teacher whose block linears
    are torchao NF4, sharded by FSDP2 over 2 ranks like the student; stories kept apart in their windows
    (data.attention=document), the teacher seeing the same masks."""
    args = _args(shared, tmp_path, f"distill.teacher={shared('models/stories260K/stories260K.bin')}",
                 "distill.kd_ratio=0.5", "distill.loss=reverse", "distill.teacher_quantize=nf4",
                 "adapters.kind=lora", "adapters.rank=8", "data.attention=document")
    args[args.index(f"training.steps={STEPS}")] = "training.steps=20"
    args[args.index(f"eval.every={STEPS}")] = "eval.every=20"
    result = run_train(args, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training 19,456 of 183,616 parameters" in result.stdout  # the adapters only
    kl = tensorboard_scalars(tmp_path, "loss/kl")
    print(f"\nDISTILL LoRA student, NF4 teacher, reverse KL: step 1 {kl[1]:.4f}, step 20 {kl[20]:.4f}")
    assert kl[20] < kl[1] - 0.3, kl


def test_a_dense_teacher_distills_into_a_mixture_of_experts_student_on_expert_parallel_ranks(shared, tmp_path):
    """stories260K (dense) teaching a Qwen3-MoE student whose experts are split over 2 ranks (ep 2): the
    load-balancing loss rides along in the backward, and the KL to the teacher falls."""
    teacher = [f"distill.teacher={shared('models/stories260K/stories260K.bin')}", "distill.kd_ratio=0.5"]
    student = ["model.flavor=qwen3_moe_debug", "model.dim=64", "model.n_heads=2", "model.n_kv_heads=1", "parallel.ep=2",
               "training.steps=20", "eval.every=0"]
    run = run_train([*_args(shared, tmp_path, *teacher), *student], nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "experts: 8 in 2 of 2 layers" in run.stdout and "(ep 2 of it)" in run.stdout
    kl, aux = tensorboard_scalars(tmp_path, "loss/kl"), tensorboard_scalars(tmp_path, "moe/aux_loss")
    print(f"\nDISTILL into a MoE student on ep 2: kl {kl[1]:.4f} -> {kl[20]:.4f}, aux loss {aux[20]:.4f}")
    assert kl[20] < 0.5 * kl[1] and sorted(aux) == list(range(1, 21))
