"""Text from any checkpoint, in one process, with a KV cache.

    python -m trainer.generate PATH --prompt "Once upon a time" [--max-new-tokens 128] [--temperature 0.8]
        [--top-k 50] [--top-p 0.95] [--seed 0] [--chat] [--tokenizer PATH] [--device cpu|cuda]

PATH is a run directory (its latest checkpoint; an adapter run's adapters over its base), one of its
checkpoints/step-N directories, a Hugging Face directory (an export, merged or not) or a llama2.c .bin.
The tokenizer is the run's (its config.yaml), the Hugging Face directory's own, or --tokenizer.
Greedy decoding is temperature 0 (the default).
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.errors import UserError
from models.common.kv_cache import KVCache


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy (the most likely token)
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens} must be at least 1")
        if not self.temperature >= 0:
            raise UserError(f"--temperature {self.temperature} must be 0 (greedy) or more")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k} must be 0 (no limit) or more")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p} must lie in (0, 1]")


def pick(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    """The next token from one position's logits (vocab,)."""
    if s.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        # Drop a token when the ones before it already reach top_p (the first always stays).
        drop = cumulative - ordered.softmax(-1) >= s.top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate(model, prompt: list[int], sampling: Sampling = Sampling(), stop_ids: tuple[int, ...] = (),
             use_cache: bool = True) -> list[int]:
    """New token ids after `prompt`, until a stop id (not returned), max_new_tokens, or the model's
    maximum length. Without the cache every step re-runs the whole sequence (the check of the cache)."""
    if not prompt:
        raise UserError("the prompt is empty: give at least one token (a BOS or some text)")
    limit = model.args.max_seq_len
    if len(prompt) >= limit:
        raise UserError(f"the prompt has {len(prompt)} tokens, the model's maximum sequence length is {limit}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(sampling.seed)
    cache = KVCache(model.layers.keys()) if use_cache else None
    tokens = list(prompt)
    logits = model(torch.tensor([tokens], device=device), cache=cache)[0, -1]
    out: list[int] = []
    while len(out) < sampling.max_new_tokens:
        token = pick(logits, sampling, generator)
        if token in stop_ids:
            break
        out.append(token)
        tokens.append(token)
        if len(tokens) >= limit:
            break
        step_input = [token] if use_cache else tokens
        logits = model(torch.tensor([step_input], device=device), cache=cache)[0, -1]
    return out


def load_for_generation(path: str | Path, tokenizer_path: str | None = None, device: str = "cpu"):
    """(model in eval mode, tokenizer) from any checkpoint this project reads."""
    from trainer.build import load_run, load_run_model
    from trainer.config import load_config
    from trainer.config.schema import TokenizerConfig
    from trainer.tokenizer import build_tokenizer
    from trainer.weights.load import load_model

    path = Path(path)
    run_dir = path if (path / "config.yaml").is_file() else path.parent.parent if (path.parent.parent / "config.yaml").is_file() else None
    tokenizer_cfg = TokenizerConfig(kind="auto", path=tokenizer_path)
    if run_dir is not None:
        if tokenizer_path is None:
            tokenizer_cfg = load_config(run_dir / "config.yaml").tokenizer
        model = load_run(run_dir, device=device) if path == run_dir else load_run_model(path, device)
    else:
        if tokenizer_path is None:
            if not path.is_dir():
                raise UserError(f"{path} holds no tokenizer: give --tokenizer PATH")
            tokenizer_cfg = TokenizerConfig(kind="auto", path=str(path))
        model = load_model(path, device)
    return model.eval(), build_tokenizer(tokenizer_cfg)


def prompt_ids(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise UserError("--chat needs a tokenizer with a chat template (a Hugging Face tokenizer directory)")
        rendered = tokenizer.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                           add_generation_prompt=True)
        return tokenizer.encode(rendered)
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return bos + tokenizer.encode(text)


def main(argv: list[str]) -> int:
    from parallel.library_patches import quiet_import_noise

    quiet_import_noise()
    parser = argparse.ArgumentParser(prog="python -m trainer.generate", description=__doc__.split("\n")[0])
    parser.add_argument("path", help="run dir, checkpoints/step-N, Hugging Face dir or llama2.c .bin")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
        sampling.check()
        model, tokenizer = load_for_generation(args.path, args.tokenizer, args.device)
        ids = prompt_ids(tokenizer, args.prompt, args.chat)
        stop = tuple(i for i in (tokenizer.eos_id,) if i is not None)
        out = generate(model, ids, sampling, stop_ids=stop)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + tokenizer.decode(out) if not args.chat else tokenizer.decode(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
