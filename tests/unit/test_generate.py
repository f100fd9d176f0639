"""Generation with the KV cache: token for token what re-running the whole sequence gives (karpathy's
real stories260K, a random Hugging Face Llama, a Qwen3), and greedy decoding equal to transformers'
own `generate` on the same Hugging Face checkpoint; sampling settings and the command line."""

import subprocess
import sys

import pytest
import torch

from models import build_meta_model
from tests.helpers import REPO, flavor_args, run_train
from trainer.generate import Sampling, generate, pick
from trainer.tokenizer.spm import SentencePieceTokenizer
from trainer.weights.load import load_model

GREEDY_64 = Sampling(max_new_tokens=64)


def test_kv_cache_equals_recomputation_on_stories260k(shared):
    model = load_model(shared("models/stories260K/stories260K.bin"))
    tok = SentencePieceTokenizer(shared("tokenizers/tok512/tok512.model"))
    prompt = [tok.bos_id] + tok.encode("Once upon a time, there was a little dog")
    cached = generate(model, prompt, GREEDY_64)
    assert len(cached) == 64
    assert cached == generate(model, prompt, GREEDY_64, use_cache=False)
    print(f"\nstories260K, greedy with the KV cache: {tok.decode(cached)!r}")


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A random Llama saved by transformers itself (GQA, untied head), without an EOS so that both sides
    generate all 64 tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(path)
    return model, path


def test_kv_cache_and_greedy_equal_transformers_generate(hf_llama):
    theirs_model, path = hf_llama
    ours = load_model(path)
    prompt = [1, 17, 42, 99, 7, 250, 3]
    cached = generate(ours, prompt, GREEDY_64)
    assert cached == generate(ours, prompt, GREEDY_64, use_cache=False)
    with torch.no_grad():
        theirs = theirs_model.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, use_cache=True,
                                       attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert cached == theirs[0, len(prompt):].tolist()


def test_kv_cache_with_qk_norm_and_a_long_prompt():
    """Qwen3's per-head norms, and a prompt prefilled in one forward before the cache takes over."""
    torch.manual_seed(0)
    model = build_meta_model(flavor_args("qwen3_debug", vocab_size=320, max_seq_len=128))
    model.to_empty(device="cpu")
    model.init_buffers()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    prompt = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    cached = generate(model, prompt, GREEDY_64)
    assert cached == generate(model, prompt, GREEDY_64, use_cache=False)
    assert len(cached) == 64
    # The model's maximum length ends generation: 40 + 88 = 128 positions.
    assert len(generate(model, prompt, Sampling(max_new_tokens=500))) == 88


def test_sampling_settings():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])
    generator = torch.Generator().manual_seed(0)
    assert pick(logits, Sampling(), generator) == 1
    assert pick(logits, Sampling(temperature=5.0, top_k=1), generator) == 1  # top-k 1 is greedy
    assert pick(logits, Sampling(temperature=5.0, top_p=0.01), generator) == 1  # so is a tiny nucleus
    draws = [pick(logits, Sampling(temperature=1.0, top_k=2), generator) for _ in range(200)]
    assert set(draws) == {1, 2}  # only the two most likely
    draws = [pick(logits, Sampling(temperature=1.0, top_p=0.9), generator) for _ in range(300)]
    assert set(draws) <= {1, 2, 4} and {1, 2} <= set(draws)
    again = lambda seed: [pick(logits, Sampling(temperature=1.0), torch.Generator().manual_seed(seed)) for _ in range(5)]  # noqa: E731
    assert again(3) == again(3)


def _generate_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.generate", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_command_line_on_a_run_and_on_an_hf_directory(shared, tmp_path, hf_llama):
    run = tmp_path / "run"
    trained = run_train(["--config", "configs/debug.yaml", "training.steps=2", f"job.output_dir={run}"])
    assert trained.returncode == 0, trained.stderr[-2000:]
    result = _generate_cli(str(run), "--prompt", "def main(", "--max-new-tokens", "20", "--temperature", "0.8",
                           "--top-k", "20", "--seed", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("def main(") and len(result.stdout) > len("def main(")

    stories = _generate_cli(str(shared("models/stories260K/stories260K.bin")), "--tokenizer",
                            str(shared("tokenizers/tok512/tok512.model")), "--prompt", "Once upon a time")
    assert stories.returncode == 0, stories.stderr[-2000:]
    assert stories.stdout.startswith("Once upon a time") and len(stories.stdout.split()) > 20
    # Its mistakes (bad sampling values, no tokenizer, no CUDA, ...): tests/e2e/test_bad_inputs.py's command table.


def test_chat_prompts_use_the_tokenizers_template(shared):
    """--chat: the prompt as the instruct model's own template renders it (transformers' apply_chat_template
    is the oracle), ready for the assistant's turn; a tokenizer without a template is a clear error."""
    from transformers import AutoTokenizer

    from trainer.config.schema import TokenizerConfig
    from trainer.errors import UserError
    from trainer.generate import prompt_ids
    from trainer.tokenizer import build_tokenizer

    path = shared("tokenizers/phi3-mini")
    ours = prompt_ids(build_tokenizer(TokenizerConfig(kind="auto", path=str(path))), "Name a colour.", chat=True)
    theirs = AutoTokenizer.from_pretrained(path).apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    assert ours == list(theirs)
    with pytest.raises(UserError, match="--chat needs a tokenizer with a chat template"):
        prompt_ids(build_tokenizer(TokenizerConfig(kind="byte")), "hi", chat=True)
