"""The bytes each pass must move through memory: the numerator of achieved GB/s.

The fused embedding does no arithmetic worth counting; its speed limit is memory bandwidth. So
every pass is scored by the fewest bytes any implementation must move, divided by its time, and
compared with the device's copy bandwidth. With N = B*T tokens, width D, element size e, id size
s, vocabulary V, position-table rows P, and T distinct positions per sequence:

    forward   N*s            read the ids
            + N*D*e          read one token row per token
            + T*D*e          read the position rows; default positions are the same T rows for
                             every sequence, so they are read once and then served from cache
            + N*D*e          write the output
            ~ 2*N*D*e

    backward  N*s + N*D*e    read the ids and the output gradient
            + V*D*e          write the dense token-table gradient (zero rows included)
            + P*D*e          write the position-table gradient

    forward+backward = forward + backward

This is a floor, not what a given implementation moves: eager PyTorch also writes and re-reads
an N*D intermediate (the gathered token rows) in the forward, and its backward reads the output
gradient twice. Scoring
all of them against the same floor is what makes their GB/s comparable.
"""

from __future__ import annotations

PASSES = ("forward", "backward", "forward+backward")


def forward_bytes(*, tokens: int, seq: int, dim: int, element_size: int, id_size: int) -> int:
    return tokens * id_size + (2 * tokens + seq) * dim * element_size


def backward_bytes(
    *, tokens: int, vocab: int, positions: int, dim: int, element_size: int, id_size: int
) -> int:
    return tokens * id_size + (tokens + vocab + positions) * dim * element_size


def pass_bytes(
    pass_name: str,
    *,
    tokens: int,
    seq: int,
    vocab: int,
    positions: int,
    dim: int,
    element_size: int,
    id_size: int,
) -> int:
    """Bytes moved by one of PASSES; ``positions`` is P, the position table's row count."""
    forward = forward_bytes(tokens=tokens, seq=seq, dim=dim, element_size=element_size, id_size=id_size)
    backward = backward_bytes(
        tokens=tokens, vocab=vocab, positions=positions, dim=dim, element_size=element_size, id_size=id_size
    )
    totals = {"forward": forward, "backward": backward, "forward+backward": forward + backward}
    if pass_name not in totals:
        raise ValueError(f"unknown pass {pass_name!r}; expected one of {PASSES}")
    return totals[pass_name]
