"""End-to-end demo: tokenize a text, embed a batch with fusedemb, check it, time it.

    python -m fusedemb (or fusedemb-demo) [--text FILE] [--batch 8] [--seq-len 256] [--dim 768]
        [--device cpu|cuda] [--repeats 10]

The text (an embedded paragraph by default) is tokenized with tiktoken's gpt2 encoding and cut
into a batch of sequences (tiled if it is short). The GPT-2-sized token table (50257 rows) and a
position table feed both fusedemb and the plain PyTorch layer it replaces, two nn.Embedding and
an add; the demo checks that the outputs and the table gradients agree and prints both
timings, of an inference forward (under torch.no_grad) and of a forward+backward. These are
wall times of single calls, host time included: at small sizes that decides, and fusedemb's
Python layers cost more of it than two nn.Embedding calls do. `python -m fusedemb.bench`
measures the layer properly.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from fusedemb.bench.cli import add_device_argument, check_device, require_gpt2_tokenizer, text_file
from fusedemb.bench.environment import warn_if_cpu_busy
from fusedemb.data import END_OF_TEXT, load_gpt2_tokenizer, tile_to_batch
from fusedemb.module import FusedEmbedding

DEFAULT_TEXT = (
    "A GPT model reads text as a sequence of token ids. Its first layer looks up one learned "
    "vector per token in a table with a row for every word piece of the vocabulary, and adds a "
    "second learned vector that says where in the sequence the token sits. Written with two "
    "embedding modules, that is two gathers and an add, each a pass over memory; fused, it is "
    "one pass that reads each row once and writes each output row once."
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fusedemb-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=text_file, metavar="FILE",
                        help="a UTF-8 text file to tokenize (default: an embedded paragraph)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch (default 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--dim", type=int, default=768, help="embedding dim (default 768, GPT-2 small)")
    add_device_argument(parser)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per implementation (default 10)")
    args = parser.parse_args(argv)
    for name in ("batch", "seq_len", "dim", "repeats"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    check_device(parser, args.device)
    require_gpt2_tokenizer(parser)
    return args


def median_ms(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of fn() in milliseconds, after one warm-up, synchronising on CUDA."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    text = args.text or DEFAULT_TEXT
    tokenizer = load_gpt2_tokenizer()
    token_ids = torch.tensor(tokenizer.encode(text, allowed_special={END_OF_TEXT}), dtype=torch.int64)
    ids = tile_to_batch(token_ids, args.batch, args.seq_len).to(device)

    torch.manual_seed(0)
    tok_emb = nn.Embedding(tokenizer.n_vocab, args.dim, device=device)
    pos_emb = nn.Embedding(args.seq_len, args.dim, device=device)
    fused = FusedEmbedding.from_embeddings(tok_emb, pos_emb)  # shares the two tables
    positions = torch.arange(args.seq_len, device=device)

    def plain():
        return tok_emb(ids) + pos_emb(positions)

    expected, actual = plain(), fused(ids)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (tok_emb.weight, pos_emb.weight), grad_out)
    actual_grads = torch.autograd.grad(actual, (tok_emb.weight, pos_emb.weight), grad_out)
    forward_error = (actual - expected).abs().max().item()
    grad_error = max((a - e).abs().max().item() for a, e in zip(actual_grads, expected_grads))
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e)

    warn_if_cpu_busy(device.type)  # a wall-clock median of a few runs, and no cache flush: a rough figure
    with torch.no_grad():
        plain_ms = median_ms(plain, args.repeats, device)
        fused_ms = median_ms(lambda: fused(ids), args.repeats, device)
    tables = (tok_emb.weight, pos_emb.weight)
    plain_step_ms = median_ms(lambda: torch.autograd.grad(plain(), tables, grad_out), args.repeats, device)
    fused_step_ms = median_ms(lambda: torch.autograd.grad(fused(ids), tables, grad_out), args.repeats, device)
    print(f"text: {len(text)} characters -> batch of {args.batch} x {args.seq_len} gpt2 token ids on {device}")
    print(f"embeddings: {tuple(actual.shape)} {actual.dtype}; token table {tuple(tok_emb.weight.shape)}")
    print(f"max |fused - nn.Embedding|: output {forward_error:.3g}, table gradients {grad_error:.3g}")
    print(f"median of {args.repeats}, nn.Embedding x2 + add / fusedemb: inference forward (no_grad) "
          f"{plain_ms:.3f} / {fused_ms:.3f} ms, forward+backward {plain_step_ms:.3f} / {fused_step_ms:.3f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
