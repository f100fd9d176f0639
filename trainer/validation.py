"""Validation during training: the loss and perplexity of held-out documents every eval.every steps, and
after the last, under the run's own layout (the trainer runs the forward: FSDP, TP with loss parallel,
pipeline stages, adapters, float8), and greedy samples of eval.sample_prompts.

The batches are drawn once, from a loader of their own, so every validation sees the same ones and the
training data's order and random state are never touched (a resume stays exact with validation on).
Each data-parallel rank takes eval.steps batches; together they are the first windows of the held-out
stream, whatever the layout."""

from trainer.config.schema import EvalConfig
from trainer.data import PackedLoader
from trainer.generate import Sampling, generate


class Validation:
    def __init__(self, cfg: EvalConfig, loaders: dict[str, PackedLoader], tokenizer, *, total_steps: int):
        """`loaders`: over each set of held-out documents, packed as the training data is, by label ("": eval.source
        or the split; a mixture source's name: its eval_source)."""
        self.cfg, self.tokenizer, self.total_steps = cfg, tokenizer, total_steps
        self.sets = {label: [loader.next_batch() for _ in range(self.cfg.steps)] for label, loader in loaders.items()}
        # What the quantized variants are measured on: the main set, or every set together.
        self.main_batches = self.sets.get("") or [b for batches in self.sets.values() for b in batches]

    def due(self, step: int) -> bool:
        every = self.cfg.every
        return every > 0 and (step % every == 0 or step == self.total_steps)

    def samples(self, model) -> list[tuple[str, str]]:
        """(prompt, greedy continuation) for each eval.sample_prompts entry; every rank runs the same
        forwards (FSDP gathers for all), and greedy decoding makes the same choices on each."""
        out = []
        stop = tuple(i for i in (self.tokenizer.eos_id,) if i is not None)
        # A model trained with the chunked loss stops at its final norm: generation needs the logits.
        projected, model.project = model.project, True
        for prompt in self.cfg.sample_prompts:
            bos = [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []
            ids = bos + self.tokenizer.encode(prompt)
            new = generate(model, ids, Sampling(max_new_tokens=self.cfg.sample_tokens), stop_ids=stop)
            out.append((prompt, self.tokenizer.decode(new)))
        model.project = projected
        return out
