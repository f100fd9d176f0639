"""The chunked loss (the model stops at its final norm; the loss projects a chunk of label tokens at a
time) against the plain path (whole logits, then cross-entropy): same loss and gradients within 1e-6."""

import pytest
import torch

from trainer.loss import IGNORE_INDEX, TokenLoss
from models.llama.args import LlamaArgs
from models.llama.model import LlamaTransformer


def _model(tied: bool) -> LlamaTransformer:
    torch.manual_seed(0)
    args = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=64, tie_embeddings=tied)
    model = LlamaTransformer(args)
    model.init_buffers()
    with torch.no_grad():  # Llama's scale of weights (nn's default embedding init gives logits of ~60)
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(std=0.02)
    return model


def _loss_and_grads(model: LlamaTransformer, loss_fn: TokenLoss, inputs, labels):
    model.zero_grad()
    loss_fn.start(scale=1.0 / int(TokenLoss.count(labels)), device=torch.device("cpu"))
    loss = loss_fn(model(inputs), labels)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_the_plain_path_with_sft_masks(tied):
    model = _model(tied)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, 300, (3, 40), generator=generator)
    labels = torch.randint(0, 300, (3, 40), generator=generator)
    labels[0, :25] = IGNORE_INDEX  # SFT: a prompt, then the answer
    labels[2, 10:30] = IGNORE_INDEX
    plain_loss, plain_grads = _loss_and_grads(model, TokenLoss(), inputs, labels)
    model.project = False
    chunked_loss, chunked_grads = _loss_and_grads(model, TokenLoss(head=model.head_weight, chunk_tokens=7), inputs, labels)
    assert abs(chunked_loss - plain_loss) < 1e-6
    worst = max((chunked_grads[n] - plain_grads[n]).abs().max().item() for n in plain_grads)
    print(f"\nCHUNKED tied={tied}: |loss difference| {abs(chunked_loss - plain_loss):.1e}, max |gradient difference| {worst:.1e}")
    assert worst < 1e-6


def test_a_microbatch_without_label_tokens_still_gives_gradients():
    model = _model(False)
    model.project = False
    labels = torch.full((1, 16), IGNORE_INDEX)
    loss = TokenLoss(head=model.head_weight)(model(torch.zeros(1, 16, dtype=torch.long)), labels)
    loss.backward()
    assert loss.item() == 0 and model.output.weight.grad is not None and model.layers["0"].attention.wq.weight.grad is not None
