"""Full finetune vs LoRA vs QLoRA on the same model: peak memory and tokens/s, ours next to the same job
through transformers + peft (+ bitsandbytes for QLoRA). Prints a markdown table.

    .venv/bin/python scripts/bench_finetune.py [--preset cpu|8b|70b] [--steps 6]

Presets: cpu, a 207M-parameter Llama (dim 1024, 12 layers) at seq 512, batch 2, fp32; 8b, the Llama 3.1
8B shape at seq 2048, batch 2, bf16 (GPU); 70b, the Llama 3.1 70B shape, our QLoRA only, on one GPU,
from the seeded initialisation (a 70B checkpoint does not fit the benchmark machine's disk, and
transformers quantizes only while loading one). Every other row is a fresh process that loads the same
random-weight Hugging Face checkpoint (written once to a temporary directory).

Peak memory is the process's own: peak CUDA memory reserved on a GPU, peak RSS on CPU. On CPU, glibc
keeps freed large blocks for reuse (its mmap threshold rises after each free), so peak RSS would count
long-dead temporaries, such as each block's high-precision weights before quantization. The CPU memory
columns therefore come from a second run with MALLOC_MMAP_THRESHOLD_=65536 (large blocks go back to
the system when freed); the tokens/s columns come from a run without it (it halves CPU speed).
Tokens/s are means over the steps after the first (start-up excluded). Activation checkpointing is off
on both sides on CPU and full on both on a GPU (where ours also compiles); LoRA is rank 8, alpha 16, on
all seven linears of each block.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_common import header, measure  # noqa: E402

PRESETS = {
    "cpu": dict(shape=dict(dim=1024, n_layers=12, n_heads=16, n_kv_heads=8, ffn=2816, vocab=32000), seq=512, batch=2,
                dtype="float32", checkpointing=False, compile=False),
    # GPU presets: activation checkpointing on both sides (transformers' gradient checkpointing), as the
    # memory targets assume; ours also compiles its blocks, as a user of it would.
    "8b": dict(shape=dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn=14336, vocab=128256), seq=2048, batch=2,
               dtype="bfloat16", checkpointing=True, compile=True),
    "70b": dict(flavor="llama3_1_70b", seq=2048, batch=1, dtype="bfloat16", checkpointing=True, compile=True),
}
# (label, our adapters overrides, or None for full finetuning; the transformers + peft equivalent)
METHODS = [
    ("full finetune", [], "full"),
    ("LoRA (base in the compute dtype)", ["adapters.kind=lora"], "lora"),
    ("QLoRA, torchao NF4", ["adapters.kind=lora", "adapters.quantize_base=nf4"], None),
    ("QLoRA, bitsandbytes NF4", ["adapters.kind=lora", "adapters.quantize_base=bnb_nf4"], "qlora"),
    ("QLoRA, HQQ 4-bit", ["adapters.kind=lora", "adapters.quantize_base=hqq"], None),
]


def write_checkpoint(preset: dict, out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    s = preset["shape"]
    config = LlamaConfig(
        hidden_size=s["dim"], num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
        num_key_value_heads=s["n_kv_heads"], intermediate_size=s["ffn"], vocab_size=s["vocab"],
        max_position_embeddings=preset["seq"], tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).to(getattr(torch, preset["dtype"])).save_pretrained(out)


# Glibc tuning for the CPU memory runs (see the module docstring).
RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def ours(preset: dict, checkpoint: Path | None, method: list[str], steps: int, env: dict | None) -> dict | str:
    model = [f"model.flavor={preset['flavor']}"] if checkpoint is None else ["model.flavor=null", f"model.init_from={checkpoint}"]
    overrides = [
        "--config", "configs/debug.yaml", *model, "tokenizer.kind=byte",
        f"activation_checkpoint.mode={'full' if preset['checkpointing'] else 'none'}", f"compile.enabled={preset['compile']}",
        f"training.seq_len={preset['seq']}", f"training.local_batch_size={preset['batch']}", "training.global_batch_size=-1",
        f"training.steps={steps}", "metrics.log_every=1", "checkpoint.enabled=false", "lr_scheduler.warmup_steps=1",
        f"training.mixed_precision_param={preset['dtype']}", *method,
    ]
    return measure(overrides, nproc=1, skip_steps=1, env=env)


def hf_worker(checkpoint: str, method: str, seq: int, batch: int, dtype: str, steps: int, checkpointing: bool) -> None:
    """One transformers (+ peft, + bitsandbytes) finetuning job; prints its figures as JSON."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from trainer.metrics import peak_memory_gib

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {"dtype": getattr(torch, dtype), "device_map": str(device)}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=getattr(torch, dtype),
        )
    model = LlamaForCausalLM.from_pretrained(checkpoint, **kwargs).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method != "full":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step = sum(times[1:]) / len(times[1:])
    print(json.dumps({"step_ms": 1000 * step, "tokens_per_sec": batch * seq / step, "peak_gib": peak_memory_gib(device)}))


def theirs(preset: dict, checkpoint: Path, method: str, steps: int, env: dict | None) -> dict | str:
    cmd = [sys.executable, __file__, "--hf-worker", method, "--checkpoint", str(checkpoint), "--steps", str(steps),
           "--seq", str(preset["seq"]), "--batch", str(preset["batch"]), "--dtype", preset["dtype"]]
    if preset["checkpointing"]:
        cmd.append("--checkpointing")
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        return result.stderr.strip().splitlines()[-1][:120]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _with_memory_of(speed: dict | str, memory: dict | str | None) -> dict | str:
    """The speed run's figures with the peak memory of the memory run (CPU), if there was one."""
    if memory is None or not isinstance(speed, dict):
        return speed
    return {**speed, "peak_gib": memory["peak_gib"]} if isinstance(memory, dict) else memory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--checkpoint", help="an existing Hugging Face Llama directory of the preset's shape")
    parser.add_argument("--hf-worker")
    parser.add_argument("--seq", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--dtype")
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()
    if args.hf_worker:
        hf_worker(args.checkpoint, args.hf_worker, args.seq, args.batch, args.dtype, args.steps, args.checkpointing)
        return
    preset = PRESETS[args.preset]
    methods = METHODS[2:3] if args.preset == "70b" else METHODS
    print(header(f"scripts/bench_finetune.py --preset {args.preset} --steps {args.steps}"))
    print(f"shape {preset.get('shape') or preset['flavor']}, seq {preset['seq']}, batch {preset['batch']}, {preset['dtype']}")
    print("| method | ours: tokens/s | ours: peak mem (GiB) | transformers + peft: tokens/s | transformers + peft: peak mem (GiB) | speed-up |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else None
        if checkpoint is None and "shape" in preset:
            checkpoint = Path(tmp) / "hf"
            write_checkpoint(preset, checkpoint)
        cpu = not torch.cuda.is_available()
        for label, overrides, hf_method in methods:
            a = _with_memory_of(ours(preset, checkpoint, overrides, args.steps, None),
                                ours(preset, checkpoint, overrides, 2, RETURN_FREED) if cpu else None)
            b = "-"
            if hf_method and checkpoint:
                b = _with_memory_of(theirs(preset, checkpoint, hf_method, args.steps, None),
                                    theirs(preset, checkpoint, hf_method, 2, RETURN_FREED) if cpu else None)
            cell = lambda m, key, fmt: f"{m[key]:{fmt}}" if isinstance(m, dict) else m  # noqa: E731
            speedup = f"{a['tokens_per_sec'] / b['tokens_per_sec']:.2f}x" if isinstance(a, dict) and isinstance(b, dict) else "-"
            print(f"| {label} | {cell(a, 'tokens_per_sec', ',.0f')} | {cell(a, 'peak_gib', '.2f')} | "
                  f"{cell(b, 'tokens_per_sec', ',.0f')} | {cell(b, 'peak_gib', '.2f')} | {speedup} |", flush=True)


if __name__ == "__main__":
    main()
