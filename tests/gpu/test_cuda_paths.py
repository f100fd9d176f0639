"""One test per CUDA-only path, each against the same computation on CPU or in fp32 where the numbers can be
compared (skipped without CUDA, saying why): NCCL, FSDP2 bf16 mixed precision and float8 all-gather, bf16
training, compile, flash attention, LoRA over float8, QLoRA over each 4-bit library, checkpoint resume,
generation, the memory figures, document attention through FlexAttention, the MoE grouped matmul and the
quantized exports in transformers (async TP needs two GPUs: not here). Runs train.py in this process (one
CUDA start for all of them) except where a CPU reference needs a process of its own. `bash scripts/gpu_acceptance.sh` runs them; so does
`pytest -s tests/gpu` on any CUDA machine."""

import os
import socket
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import train
from tests.helpers import REPO, flavor_args

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU; CPU runs test these paths' numerics elsewhere", allow_module_level=True)

CUDA = torch.device("cuda", 0)
BASE = ["--config", "configs/debug.yaml", "metrics.log_every=1", "data.prefetch=0", "training.seq_len=128",
        "training.local_batch_size=4"]


def _train(out, *overrides) -> dict[int, dict]:
    """train.py in this process; the step records it wrote (trainer/run_record.py)."""
    from trainer.run_record import read_records

    code = train.main([*BASE, f"job.output_dir={out}", *overrides])
    assert code == 0, f"train.py exited {code}"
    return read_records(out / "metrics.jsonl", "step")


def _losses(records: dict[int, dict]) -> list[float]:
    return [records[s]["loss/train"] for s in sorted(records)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nccl_fsdp2_bf16_mixed_precision_and_float8_all_gather():
    """A one-GPU NCCL world: a collective, FSDP2 with bf16 parameters against the fp32 model, and FSDP2's
    float8 all-gather (tensorwise, scales precomputed) against bf16 FSDP2. Two ranks cannot share one GPU
    under NCCL (it refuses a duplicate device), so one rank is what a one-GPU machine can check."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from fp8.config import Float8Config
    from fp8.conversion import convert_linears
    from models import build_meta_model
    from parallel.parallelize import parallelize
    from trainer.build import build_whole_model, materialize_converted
    from trainer.weights.seeded_init import SeededInit

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, device_id=CUDA)
    try:
        total = torch.ones(8, device=CUDA)
        dist.all_reduce(total)
        assert total.sum().item() == 8
        mesh = init_device_mesh("cuda", (1,))
        args = flavor_args("debug", vocab_size=256, dim=256, n_heads=8, n_kv_heads=4)
        tokens = torch.randint(0, 256, (4, 129), device=CUDA, generator=torch.Generator(CUDA).manual_seed(0))

        def loss_of(model):
            loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
            loss.backward()
            return loss.item()

        def sharded(float8: bool):
            model = build_meta_model(args)
            shapes = {n: p.shape for n, p in model.named_parameters()}
            if float8:
                convert_linears(model, Float8Config(enabled=True, fsdp_float8_all_gather=True))
            parallelize(model, tp_mesh=None, tp_plan=None, ac_mode="none", ac_every=1, compile=False, fsdp_mesh=mesh,
                        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, reshard_after_forward="default",
                        cpu_offload=False, materialize=partial(materialize_converted, weights=SeededInit(args, 0, shapes, CUDA),
                                                               converters=[], device=CUDA, shards=1, seed=0,
                                                               frozen_dtype=torch.float32))
            if float8:
                from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

                precompute_float8_dynamic_scale_for_fsdp(model)
            return model

        fp32 = loss_of(build_whole_model(args, [], init_from=None, seed=0, device=CUDA))
        bf16 = loss_of(sharded(float8=False))
        print(f"\nGPU FSDP2 one rank: fp32 {fp32:.5f}, bf16 mixed precision {bf16:.5f}", end="")
        assert abs(bf16 - fp32) / fp32 < 1e-2
        if torch.cuda.get_device_capability() >= (8, 9) and _has("torchao"):
            float8 = loss_of(sharded(float8=True))
            print(f", float8 all-gather {float8:.5f}")
            assert abs(float8 - bf16) / bf16 < 3e-2
    finally:
        dist.destroy_process_group()


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def _cpu_run(out, *overrides) -> list[float]:
    """The same run on this machine's CPU, in a process of its own (CUDA hidden)."""
    from trainer.run_record import read_records

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "train.py", *BASE, f"job.output_dir={out}", *overrides], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return _losses(read_records(out / "metrics.jsonl", "step"))


def test_fp32_matches_cpu_and_bf16_compile_train_like_it(tmp_path):
    """From one seed checkpoint (written on CPU): CUDA fp32 against CPU fp32, then bf16 autocast and
    compiled blocks on CUDA against CUDA fp32, and the CUDA memory figures in the record."""
    seed = tmp_path / "seed"
    _cpu_run(seed, "checkpoint.create_seed=true")
    start = ["model.flavor=null", f"model.init_from={seed / 'checkpoints' / 'step-0'}", "training.steps=10",
             "checkpoint.enabled=false"]
    cpu = _cpu_run(tmp_path / "cpu", *start, "training.mixed_precision_param=float32")
    fp32 = _train(tmp_path / "fp32", *start, "training.mixed_precision_param=float32")
    bf16 = _losses(_train(tmp_path / "bf16", *start, "training.mixed_precision_param=bfloat16"))
    compiled = _losses(_train(tmp_path / "compiled", *start, "training.mixed_precision_param=float32", "compile.enabled=true"))
    gpu = _losses(fp32)
    print(f"\nGPU losses at step 10: cpu {cpu[-1]:.5f}, cuda fp32 {gpu[-1]:.5f}, bf16 {bf16[-1]:.5f}, compiled {compiled[-1]:.5f}")
    assert abs(gpu[0] - cpu[0]) < 1e-4 and abs(gpu[-1] - cpu[-1]) / cpu[-1] < 1e-3
    assert abs(compiled[-1] - gpu[-1]) / gpu[-1] < 1e-3
    assert abs(bf16[-1] - gpu[-1]) / gpu[-1] < 3e-2
    last = fp32[max(fp32)]
    assert 0 < last["memory/peak_allocated_gib"] <= last["memory/peak_gib"]


def test_flash_attention_equals_the_math_path():
    """Our attention (grouped-query, RoPE) through SDPA's flash kernel, in bf16, against SDPA's math path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from models.common.attention import Attention
    from models.common.rope import rope_tables

    args = flavor_args("debug", vocab_size=256, dim=512, n_heads=8, n_kv_heads=2)
    torch.manual_seed(0)
    attention = Attention(args).to(CUDA, torch.bfloat16)
    cos, sin = rope_tables(args.head_dim, 1024, args.rope_theta, None, device=CUDA)
    x = torch.randn(2, 1024, 512, device=CUDA, dtype=torch.bfloat16)
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = attention(x, cos, sin).float()
        with sdpa_kernel(SDPBackend.MATH):
            math = attention(x, cos, sin).float()
    error = ((flash - math).norm() / math.norm()).item()
    print(f"\nGPU flash attention vs math: relative error {error:.2e}")
    assert error < 1e-2


@pytest.mark.parametrize("kind", ["nf4", "bnb_nf4", "hqq"])
def test_qlora_trains_on_cuda_and_dequantizes_as_on_cpu(tmp_path, kind):
    """QLoRA over each library's 4-bit base on CUDA: the loss falls over 10 steps, and the library
    dequantizes a weight it quantized on the GPU as it does on the CPU."""
    from trainer.adapters.quantize import missing_library, quantize

    package = missing_library(kind)
    if package:
        pytest.skip(f"{package} is not installed (carry its wheel: make gpu-wheels, BNB=1 for bitsandbytes)")
    losses = _losses(_train(tmp_path, "adapters.kind=lora", f"adapters.quantize_base={kind}", "optimizer.lr=3e-3",
                            "training.steps=10", "checkpoint.enabled=false", "model.dim=256", "model.n_heads=4",
                            "model.n_kv_heads=4", "model.ffn_hidden_dim=768"))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.02

    def dequantized(device):
        q = quantize(weight.to(device), kind, shards=1, hqq_group_size=64)
        return (q.dequantize() if hasattr(q, "dequantize") and not torch.is_tensor(q) else q.get_original_weight()).float().cpu()

    gpu, cpu = dequantized(CUDA), dequantized("cpu")
    error = ((gpu - cpu).norm() / cpu.norm()).item()
    quantization = ((cpu - weight).norm() / weight.norm()).item()
    print(f"\nGPU {kind}: losses {losses[0]:.4f} -> {losses[-1]:.4f}; CUDA vs CPU dequantization {error:.2e} "
          f"(4-bit error {quantization:.3f})")
    if kind == "hqq":
        # HQQ optimises its scales and zero points iteratively, and its CUDA run settles elsewhere than its
        # CPU run (measured on an H200: 3.3e-2 apart, against a 4-bit error of 0.087): the oracle is then how
        # well each keeps the weight, which must be as well on the GPU as on the CPU.
        gpu_quantization = ((gpu - weight).norm() / weight.norm()).item()
        assert gpu_quantization < 1.1 * quantization, (gpu_quantization, quantization)
        return
    # torchao's NF4 is the same torch ops on both devices; bitsandbytes' CUDA kernel may round a value at a
    # code boundary the other way. Neither may come near what 4 bits cost.
    assert error < {"nf4": 1e-6, "bnb_nf4": 0.02 * quantization}[kind]


def test_lora_over_a_float8_base_on_cuda(tmp_path):
    if torch.cuda.get_device_capability() < (8, 9) or not _has("torchao"):
        pytest.skip("needs torchao and a GPU of compute capability 8.9+ (float8 matmuls)")
    records = _train(tmp_path, "fp8.enabled=true", "adapters.kind=lora", "optimizer.lr=3e-3", "training.steps=10",
                     "checkpoint.enabled=false", "model.dim=256", "model.n_heads=4", "model.n_kv_heads=4",
                     "model.ffn_hidden_dim=768", "training.mixed_precision_param=bfloat16")
    losses = _losses(records)
    assert losses[-1] < losses[0] and "throughput/mfu_mixed_percent" in records[10]


def test_resume_on_cuda_is_bitwise(tmp_path):
    """Deterministic kernels: a run stopped by SIGTERM after a few steps (it saves where it stops) and
    started again, against the same 8 steps in one go."""
    import signal
    import threading
    import time

    common = ["job.deterministic=true", "training.steps=8", "checkpoint.interval=100", "training.mixed_precision_param=bfloat16"]
    split = tmp_path / "split"

    def stop_after_step_2():
        record = split / "metrics.jsonl"
        while not (record.is_file() and '"step": 2,' in record.read_text()):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        whole = _losses(_train(tmp_path / "whole", *common))
        watcher = threading.Thread(target=stop_after_step_2, daemon=True)
        watcher.start()
        assert train.main([*BASE, f"job.output_dir={split}", *common]) == 75  # preempted: saved, exit 75
        watcher.join()
        resumed = _train(split, *common)
    finally:
        torch.use_deterministic_algorithms(False)
    assert _losses(resumed) == whole


def test_generation_on_cuda_equals_cpu(tmp_path):
    """Greedy tokens from the same checkpoint, with the KV cache, on the GPU and on the CPU (fp32)."""
    from trainer.generate import Sampling, generate
    from trainer.weights.load import load_model

    _train(tmp_path, "training.steps=40", "training.mixed_precision_param=float32")
    step = tmp_path / "checkpoints" / "step-40"
    prompt = list(b"def main(")
    models = {device: load_model(step, device) for device in ("cuda", "cpu")}
    with torch.no_grad():
        logits = {d: m(torch.tensor([prompt], device=d))[0].float().cpu() for d, m in models.items()}
    assert (logits["cuda"] - logits["cpu"]).abs().max() < 1e-3
    for sampling in (Sampling(max_new_tokens=24), Sampling(max_new_tokens=24, temperature=1.0, top_k=50, seed=3)):
        tokens = {d: generate(m, prompt, sampling) for d, m in models.items()}
        print(f"\nGPU generation ({sampling.temperature}): {bytes(t % 256 for t in tokens['cuda'])!r}", end="")
        assert tokens["cuda"] == tokens["cpu"]
        assert not sampling.temperature or len(set(tokens["cuda"])) > 1  # sampled: a real test of equal logits



def _paragraphs(tmp_path) -> list[str]:
    """Overrides for document attention over short documents made here (the standard library's argparse.py,
    one document per blank-line-separated paragraph, several to a window), so the test needs no
    ../shared/data on the GPU machine."""
    import sysconfig
    from pathlib import Path

    text = tmp_path / "paragraphs.txt"
    text.write_text((Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text())
    return [f"data.source={text}", "data.text_sample_by=paragraph", "data.attention=document"]


def _flex_against_sdpa(device) -> tuple[float, float]:
    """Packed documents' attention through FlexAttention's block mask against SDPA's boolean mask, fp32:
    the largest output and query-gradient differences."""
    from models.common.masking import WindowMask

    torch.manual_seed(0)
    seq = 512
    lengths = torch.tensor([[100, 37, 250, 125], [3, 300, 9, 200]])
    documents = torch.stack([torch.repeat_interleave(torch.arange(4), n) for n in lengths]).to(device)
    q = torch.randn(2, 8, seq, 64, device=device)
    k, v = torch.randn(2, 2, seq, 64, device=device), torch.randn(2, 2, seq, 64, device=device)
    outs, grads = [], []
    for kernel in ("flex", "sdpa"):
        query = q.clone().requires_grad_()
        out = WindowMask.build(documents, seq=seq, kernel=kernel).attend(query, k, v)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(query.grad)
    return (outs[0] - outs[1]).abs().max().item(), (grads[0] - grads[1]).abs().max().item()


def test_document_attention_through_flex_equals_sdpa_and_trains_compiled(tmp_path, capsys):
    """FlexAttention is what training takes for packed documents on CUDA with compile on
    (trainer/plan.py): its block mask against SDPA's boolean mask (forward and backward, fp32), then 10
    compiled steps with it against the same steps eager (SDPA)."""
    out_error, grad_error = _flex_against_sdpa(CUDA)
    print(f"\nGPU document attention, flex vs sdpa: output {out_error:.1e}, query gradient {grad_error:.1e}")
    assert out_error < 1e-5 and grad_error < 1e-4
    documents = [*_paragraphs(tmp_path), "training.steps=10", "training.mixed_precision_param=float32", "job.seed=0"]
    compiled = _losses(_train(tmp_path / "flex", *documents, "compile.enabled=true"))
    assert "FlexAttention, compiled" in capsys.readouterr().out
    eager = _losses(_train(tmp_path / "sdpa", *documents))
    print(f"GPU document attention, 10 steps: compiled flex {compiled[-1]:.5f}, eager sdpa {eager[-1]:.5f}")
    assert abs(compiled[0] - eager[0]) < 1e-3 and abs(compiled[-1] - eager[-1]) / eager[-1] < 1e-3


def _grouped_against_loop(device) -> dict[str, float]:
    """A mixture's experts in bfloat16 through the grouped matmul against the one-expert-at-a-time loop
    (bf16, and fp32 as the oracle): relative errors of the output and the weights' gradients."""
    import copy

    from models.common.moe import GroupedExperts, _grouped_mm_fits

    torch.manual_seed(0)
    experts = GroupedExperts(8, 512, 256).to(device)
    for w in experts.parameters():
        torch.nn.init.normal_(w, std=0.02)
    counts = torch.tensor([40, 0, 17, 100, 3, 64, 0, 32], device=device)
    x = torch.randn(int(counts.sum()), 512, device=device)
    runs = {}
    for name, dtype in (("grouped", torch.bfloat16), ("loop bf16", torch.bfloat16), ("fp32", torch.float32)):
        module = copy.deepcopy(experts).to(dtype)
        inputs = x.to(dtype)
        if name == "grouped":
            assert module.grouped and _grouped_mm_fits(inputs, module.w1)  # the kernel, not the fallback loop
            out = module(inputs, counts)
        else:
            out = module.loop(inputs, counts)
        out.float().square().sum().backward()
        runs[name] = [out.detach().float(), *(w.grad.float() for w in (module.w1, module.w2, module.w3))]

    def relative(a, b):
        return max(((p - q).norm() / q.norm()).item() for p, q in zip(runs[a], runs[b]))

    return {"grouped vs loop bf16": relative("grouped", "loop bf16"), "grouped vs fp32": relative("grouped", "fp32"),
            "loop bf16 vs fp32": relative("loop bf16", "fp32")}


def test_moe_grouped_matmul_equals_the_loop_and_trains_compiled(tmp_path):
    """torch._grouped_mm on CUDA (bfloat16: what a MoE model trains with there, and the only dtype compile
    traces it for) against the loop of per-expert matmuls, forward and backward; then the Qwen3-MoE debug
    model 10 steps in bf16 with compile against fp32 eager."""
    errors = _grouped_against_loop(CUDA)
    print(f"\nGPU MoE grouped matmul: {', '.join(f'{k} {v:.1e}' for k, v in errors.items())}")
    assert errors["grouped vs fp32"] < 1e-2 and errors["grouped vs fp32"] < 2 * errors["loop bf16 vs fp32"] + 1e-3
    moe = ["model.flavor=qwen3_moe_debug", "training.steps=10", "job.seed=0"]
    fp32 = _losses(_train(tmp_path / "fp32", *moe, "training.mixed_precision_param=float32"))
    bf16 = _losses(_train(tmp_path / "bf16", *moe, "training.mixed_precision_param=bfloat16", "compile.enabled=true"))
    print(f"GPU MoE, 10 steps: bf16 compiled {bf16[-1]:.5f}, fp32 eager {fp32[-1]:.5f}")
    assert abs(bf16[-1] - fp32[-1]) / fp32[-1] < 3e-2


def _quantized_exports_against_ours(out, device, dtype) -> dict[str, float]:
    """Each quantized export of the run in `out`, loaded by transformers on `device` in `dtype`, against our
    quantized model of it on the CPU in fp32: the relative error of the logits."""
    from transformers import AutoModelForCausalLM

    from trainer.config.schema import QATConfig
    from trainer.qat.export import FORMATS, quantized_model
    from trainer.weights.load import load_model

    export = out / "export"
    final = load_model(export / "hf", "cpu")
    tokens = torch.tensor([list(b"def main(argv):\n    return 0\n")])
    errors = {}
    for name in ("w4a16", "w8a8_fp8"):
        ours = quantized_model(final, FORMATS[name].scheme, QATConfig())
        theirs = AutoModelForCausalLM.from_pretrained(export / name, dtype=dtype).to(device).eval()
        with torch.no_grad():
            expected = ours(tokens)
            got = theirs(tokens.to(device)).logits.float().cpu()
        errors[name] = ((got - expected).norm() / expected.norm()).item()
    return errors


def test_quantized_exports_load_in_transformers_on_cuda(tmp_path):
    """A float8 QAT run's W4A16 and W8A8 float8 exports (compressed-tensors) loaded by transformers on the GPU,
    where its float8 path may run real float8 matmuls, in bf16, against our quantized model on the CPU."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (make gpu-wheels carries it)")
    _train(tmp_path, "training.steps=10", "training.mixed_precision_param=float32", "qat.scheme=float8",
           "export.hf=true", "export.dtype=float32", "export.quantized=[w4a16,w8a8_fp8]")
    errors = _quantized_exports_against_ours(tmp_path, CUDA, torch.bfloat16)
    print(f"\nGPU quantized exports in transformers (bf16, CUDA) vs ours (fp32, CPU): relative logit error {errors}")
    assert all(error < 3e-2 for error in errors.values())
