"""Text from any checkpoint, in one process, with a KV cache.

    python -m trainer.generate PATH --prompt "Once upon a time" [--max-new-tokens 128] [--temperature 0.8]
        [--top-k 50] [--top-p 0.95] [--seed 0] [--chat] [--tokenizer PATH] [--device cpu|cuda]

PATH is a run directory (its latest checkpoint; an adapter run's adapters over its base), one of its
checkpoints/step-N directories, a Hugging Face directory (an export: hf, base), a PEFT adapter directory
(export/peft: merged into its base) or a llama2.c .bin. The tokenizer is the run's (its config.yaml), the
export's own, or --tokenizer (a file, a directory, or `byte`).
Greedy decoding is temperature 0 (the default).
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from models.common.kv_cache import KVCache
from trainer.cli import Parser, run_command
from trainer.errors import UserError


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
    """(model in eval mode, tokenizer) from any checkpoint this project reads or writes."""
    from trainer.adapters.peft_merge import is_peft_dir, merge_peft, peft_base
    from trainer.build import load_run, load_run_model
    from trainer.config import load_config
    from trainer.config.schema import TokenizerConfig
    from trainer.tokenizer import build_tokenizer
    from trainer.weights.load import load_model

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory; give a run directory, one of its checkpoints/step-N, "
                        f"a Hugging Face directory (an export) or a llama2.c .bin")
    step_of_run = path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file()
    run_dir = path if (path / "config.yaml").is_file() else path.parent.parent if step_of_run else None
    if run_dir is not None:
        model = load_run(run_dir, device=device) if path == run_dir else load_run_model(path, device)
        tokenizer_cfg = load_config(run_dir / "config.yaml").tokenizer
    elif is_peft_dir(path):  # an adapter: sampled merged into its base
        model = load_model(peft_base(path), device)
        merge_peft(model, path)
        tokenizer_cfg = TokenizerConfig(kind="auto", path=str(path if _has_tokenizer(path) else peft_base(path)))
    else:
        model = load_model(path, device)
        if tokenizer_path is None and not _has_tokenizer(path):
            raise UserError(f"{path} holds no tokenizer: give --tokenizer PATH (--tokenizer byte for the byte "
                            f"tokenizer, which has no file)")
        tokenizer_cfg = TokenizerConfig(kind="auto", path=str(path))
    if tokenizer_path == "byte":
        tokenizer_cfg = TokenizerConfig(kind="byte")
    elif tokenizer_path is not None:
        tokenizer_cfg = TokenizerConfig(kind="auto", path=tokenizer_path)
    return model.eval(), build_tokenizer(tokenizer_cfg)


def _has_tokenizer(path: Path) -> bool:
    """A tokenizer the tokenizer builder would find in this directory."""
    from trainer.errors import ConfigError
    from trainer.tokenizer import detect_kind

    try:
        return path.is_dir() and bool(detect_kind(path))
    except ConfigError:
        return False


def _device(name: str) -> str:
    """--device checked before anything loads: a CUDA device this machine has, or the CPU."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: give cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise UserError(f"--device {name}: this machine has no CUDA device; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: generation runs on cpu or cuda")
    return name


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
    parser = Parser(prog="python -m trainer.generate", description=__doc__.split("\n")[0])
    parser.add_argument("path", help="run dir, checkpoints/step-N, Hugging Face dir (an export: hf, base, peft) or llama2.c .bin")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokenizer", default=None, help="a tokenizer file or directory, or `byte`")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if there is one)")
    args = parser.parse_args(argv)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    sampling.check()
    device = _device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_for_generation(args.path, args.tokenizer, device)
    ids = prompt_ids(tokenizer, args.prompt, args.chat)
    stop = tuple(i for i in (tokenizer.eos_id,) if i is not None)
    out = generate(model, ids, sampling, stop_ids=stop)
    print(args.prompt + tokenizer.decode(out) if not args.chat else tokenizer.decode(out))
    return 0


if __name__ == "__main__":
    from parallel.library_patches import quiet_import_noise

    quiet_import_noise()
    sys.exit(run_command(main, sys.argv[1:]))
