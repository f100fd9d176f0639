"""One mixture-of-experts layer, forward + backward, ours against transformers' Qwen3-MoE block with each of
its experts implementations, on the same weights and tokens.

python -m bench.moe [--dim 256] [--hidden 128] [--experts 64] [--top-k 8] [--tokens 4096] [--repeats 10]

Prints the median milliseconds of each (after three warm-up runs). On CPU the grouped kernel is a loop of
matmuls in C++; transformers' eager path loops in Python over the experts the tokens hit, which is what
the expert count changes.
"""

import statistics
import sys
import time

import torch

from trainer.cli import Parser, at_least, run_command


def _time(module: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats + 3):
        xi = x.clone().requires_grad_()
        start = time.perf_counter()
        module(xi).square().mean().backward()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def parse_args(argv: list[str]):
    parser = Parser(prog="python -m bench.moe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=at_least(16), default=256)
    parser.add_argument("--hidden", type=at_least(16), default=128)
    parser.add_argument("--experts", type=at_least(2), default=64)
    parser.add_argument("--top-k", type=at_least(1), default=8)
    parser.add_argument("--tokens", type=at_least(16), default=4096)
    parser.add_argument("--repeats", type=at_least(1), default=10)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from models.common.moe import MoE
    from models.common.router import Routing

    args = parse_args(argv)
    torch.manual_seed(0)
    ours = MoE(args.dim, args.hidden, Routing(num_experts=args.experts, top_k=args.top_k))
    rows = [("ours (grouped matmul)", ours)]
    for impl in ("eager", "grouped_mm"):
        config = Qwen3MoeConfig(hidden_size=args.dim, moe_intermediate_size=args.hidden, num_experts=args.experts,
                                num_experts_per_tok=args.top_k, norm_topk_prob=True)
        config._experts_implementation = impl
        theirs = Qwen3MoeSparseMoeBlock(config).float()
        with torch.no_grad():  # the same weights as ours
            theirs.gate.weight.copy_(torch.randn_like(theirs.gate.weight) * 0.05)
            ours.router.weight.copy_(theirs.gate.weight)
            theirs.experts.gate_up_proj.copy_(torch.randn_like(theirs.experts.gate_up_proj) * 0.05)
            theirs.experts.down_proj.copy_(torch.randn_like(theirs.experts.down_proj) * 0.05)
            gate, up = theirs.experts.gate_up_proj.chunk(2, dim=1)
            ours.experts.w1.copy_(gate)
            ours.experts.w3.copy_(up)
            ours.experts.w2.copy_(theirs.experts.down_proj)
        rows.append((f"transformers, {impl} experts", theirs))
    x = torch.randn(1, args.tokens, args.dim)
    print(f"one MoE layer, forward + backward on cpu: dim {args.dim}, {args.experts} experts of hidden {args.hidden}, "
          f"{args.top_k} per token, {args.tokens} tokens, fp32; median of {args.repeats}")
    print("| layer | ms |\n|---|---|")
    for name, module in rows:
        print(f"| {name} | {_time(module, x, args.repeats):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
