"""Loads karpathy's pretrained stories260K (llama2.c format) and reports its per-token loss on real
TinyStories text, then a greedy sample from BOS.

    .venv/bin/python examples/stories260k.py [--data ../shared/data]

Fine-tuning it is the same trainer (it was trained on stories each starting with BOS and no EOS):
    train.py --config configs/debug.yaml model.flavor=null
        model.init_from=../shared/data/models/stories260K/stories260K.bin
        tokenizer.kind=auto tokenizer.path=../shared/data/tokenizers/tok512/tok512.model
        data.source=YOUR_TEXT.txt data.text_sample_by=paragraph data.add_eos=false
(one document per blank-line-separated paragraph; a whole file is one document, too few for the 8 data
streams of the config.)
"""

import argparse
from pathlib import Path

from trainer.evaluate import per_token_loss
from trainer.generate import Sampling, generate
from trainer.tokenizer.spm import SentencePieceTokenizer
from trainer.weights.load import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    checkpoint = args.data / "models/stories260K/stories260K.bin"

    model = load_model(checkpoint)
    tokenizer = SentencePieceTokenizer(args.data / "tokenizers/tok512/tok512.model")

    stories = (args.data / "text/tinystories/tinystories_sample.txt").read_text().split("<|endoftext|>")
    sequences = [[tokenizer.bos_id] + tokenizer.encode(s.strip()) for s in stories if s.strip()]
    loss = per_token_loss(model, sequences)
    print(f"stories260K: {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"per-token loss on tinystories_sample.txt ({len(sequences)} stories, BOS-prefixed): {loss:.4f} nats "
          f"(karpathy reports 1.297 on the TinyStories validation split)")
    sample = generate(model, [tokenizer.bos_id], Sampling(max_new_tokens=200), stop_ids=(tokenizer.bos_id,))
    print("greedy sample:\n" + tokenizer.decode(sample))


if __name__ == "__main__":
    main()
