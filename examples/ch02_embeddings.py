"""The classic chapter-2 walk-through, from text to input embeddings, with fusedemb.

    TIKTOKEN_CACHE_DIR=../shared/data/tiktoken python examples/ch02_embeddings.py --text ../shared/data/the-verdict.txt

1. tokenize the text with GPT-2's byte-pair encoding (a vocabulary of 50257 token ids);
2. cut it into batches of 8 windows of 4 tokens, stride 4 (inputs and next-token targets);
3. look the inputs up in a 50257 x 256 token table and add rows of a 4 x 256 position table:
   input embeddings of shape (batch, seq, dim) = (8, 4, 256);
4. compute the same with fusedemb (the functional form on the two tables' weights, and the
   FusedEmbedding module sharing them) and check it against nn.Embedding, forward and backward.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import fusedemb
from fusedemb.bench.cli import require_gpt2_tokenizer, text_file
from fusedemb.data import create_dataloader

VOCAB_SIZE = 50257  # GPT-2's byte-pair vocabulary
EMBEDDING_DIM = 256
BATCH_SIZE = 8
CONTEXT_LENGTH = 4  # the window length, so the position table has 4 rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=text_file, required=True, metavar="FILE", help="UTF-8 text file, e.g. the-verdict.txt")
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args(argv)
    require_gpt2_tokenizer(parser)  # ../shared/data/tiktoken beside a checkout, unless TIKTOKEN_CACHE_DIR is set
    return args


def main(argv: list[str] | None = None) -> torch.Tensor:
    """Runs the walk-through and returns the fused input embeddings, shape (8, 4, 256)."""
    args = parse_args(argv)
    try:
        loader = create_dataloader(
            args.text, batch_size=BATCH_SIZE, max_length=CONTEXT_LENGTH, stride=CONTEXT_LENGTH, shuffle=False
        )
    except ValueError as error:  # too short for one batch of windows
        raise SystemExit(f"ch02_embeddings.py: {error}; use a longer text") from None
    inputs, targets = next(iter(loader))
    print(f"token ids {tuple(inputs.shape)}:\n{inputs}")
    print(f"targets (inputs shifted by one token) {tuple(targets.shape)}:\n{targets}")

    torch.manual_seed(args.seed)
    token_embedding = nn.Embedding(VOCAB_SIZE, EMBEDDING_DIM)
    position_embedding = nn.Embedding(CONTEXT_LENGTH, EMBEDDING_DIM)

    # The unfused chapter-2 code: (8, 4, 256) token rows + (4, 256) position rows, broadcast over the batch.
    token_embeddings = token_embedding(inputs)
    position_embeddings = position_embedding(torch.arange(CONTEXT_LENGTH))
    expected = token_embeddings + position_embeddings
    print(f"token embeddings {tuple(token_embeddings.shape)}, position embeddings {tuple(position_embeddings.shape)}")

    # fusedemb: one gather-and-add on the same two tables.
    fused = fusedemb.fused_embedding(inputs, token_embedding.weight, position_embedding.weight)
    module = fusedemb.FusedEmbedding.from_embeddings(token_embedding, position_embedding)
    print(f"input embeddings {tuple(fused.shape)} (batch, seq, dim)")
    torch.testing.assert_close(fused, expected, rtol=0, atol=0)  # the same single addition per element
    torch.testing.assert_close(module(inputs), expected, rtol=0, atol=0)

    # The backward: both tables' gradients of an arbitrary loss agree with nn.Embedding's.
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (token_embedding.weight, position_embedding.weight), grad_out)
    fused_grads = torch.autograd.grad(fused, (token_embedding.weight, position_embedding.weight), grad_out)
    for name, got, want in zip(("token", "position"), fused_grads, expected_grads):
        torch.testing.assert_close(got, want)  # summation order differs: float32 tolerances
        print(f"{name} table gradient {tuple(got.shape)} matches nn.Embedding")
    print("fusedemb matches nn.Embedding")
    return fused


if __name__ == "__main__":
    main()
