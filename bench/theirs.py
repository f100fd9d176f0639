"""The other side of a row: a plain training loop over transformers' model of the checkpoint
(LlamaForCausalLM, Qwen3MoeForCausalLM; + peft LoRA, + bitsandbytes NF4 for QLoRA), the way their users
write one, in a fresh process. A mixture of experts adds its load-balancing loss as transformers does when
given labels, with the experts implementation asked for (--experts). The same checkpoint,
the same batches (our data pipeline, which is not what is measured: its time is the data phase), the
same AdamW (torch's default implementation unless --adamw says otherwise), learning rate, clipping and
precision. Prints its figures as one JSON line.

    python -m bench.theirs --checkpoint DIR --method full|lora|qlora --seq S --batch B --dtype D --steps N
        [--checkpointing] [--adamw default|foreach|fused] [--profile-step K] [--experts eager|grouped_mm|batched_mm]
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser()
    for name, kind in (("--checkpoint", str), ("--method", str), ("--seq", int), ("--batch", int), ("--dtype", str),
                       ("--steps", int)):
        parser.add_argument(name, type=kind, required=True)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--adamw", choices=("default", "foreach", "fused"), default="default",
                        help="torch's default implementation for the device (the for-loop on CPU), or foreach / fused")
    parser.add_argument("--profile-step", type=int, default=0, help="profile this step (torch.profiler): its top ops")
    parser.add_argument("--experts", choices=("eager", "grouped_mm", "batched_mm"),
                        help="a mixture of experts: transformers' experts implementation (default: its own choice)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from trainer.config import load_config
    from trainer.data import PackedLoader, load_documents
    from trainer.metrics import peak_memory_gib
    from trainer.profiling import profiled, top_ops
    from trainer.tokenizer import build_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    kwargs = {"dtype": dtype, "device_map": str(device)}
    if args.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    if args.experts:
        kwargs["experts_implementation"] = args.experts
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, **kwargs).train()
    aux_coef = getattr(model.config, "router_aux_loss_coef", 0.0) if hasattr(model.config, "num_experts") else 0.0
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.method != "full":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    implementation = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[args.adamw]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, **implementation)

    cfg = load_config("configs/debug.yaml", ["data.source=stdlib", "tokenizer.kind=byte"])
    loader = PackedLoader(load_documents(cfg.data), build_tokenizer(cfg.tokenizer), cfg.data, args.seq, args.batch,
                          dp_rank=0, dp_size=1, seed=cfg.job.seed)

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    record = {k: [] for k in ("step_ms", "data_ms", "forward_ms", "backward_ms", "optimizer_ms", "other_ms", "loss")}

    def one_step() -> None:
        t0 = now()
        inputs, labels, _ = (t.to(device) for t in loader.next_batch())
        t1 = now()
        out = model(input_ids=inputs, output_router_logits=True) if aux_coef else model(input_ids=inputs)
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten())
        if aux_coef:  # what transformers adds when given labels
            loss = loss + aux_coef * out.aux_loss
        t2 = now()
        loss.backward()
        t3 = now()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = now()
        record["loss"].append((loss - aux_coef * out.aux_loss).item() if aux_coef else loss.item())
        t5 = now()
        for key, ms in zip(("data_ms", "forward_ms", "backward_ms", "optimizer_ms", "other_ms"),
                           (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            record[key].append(1000 * ms)
        record["step_ms"].append(1000 * (t5 - t0))

    ops = []
    for step in range(1, args.steps + 1):
        if step == args.profile_step:
            with profiled(device, lambda prof: ops.extend(top_ops(prof, device))):
                one_step()
        else:
            one_step()
    record["tokens_per_sec"] = [args.batch * args.seq / (ms / 1000) for ms in record["step_ms"]]
    print(json.dumps({"steps": record, "peak_gib": peak_memory_gib(device), "ops": ops}))


if __name__ == "__main__":
    main()
