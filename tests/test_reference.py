"""The reference definition itself against nn.Embedding modules and autograd."""

import pytest
import torch
from torch import nn

from fusedemb.reference import fused_embedding_backward_reference, fused_embedding_reference


def test_reference_matches_two_embedding_modules_and_add():
    torch.manual_seed(0)
    tok_emb, pos_emb = nn.Embedding(50, 12, padding_idx=2), nn.Embedding(9, 12)
    ids = torch.randint(0, 50, (4, 7))
    expected = tok_emb(ids) + pos_emb(torch.arange(2, 9))
    actual = fused_embedding_reference(ids, tok_emb.weight, pos_emb.weight, position_offset=2, padding_idx=2)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_reference_backward_matches_autograd():
    torch.manual_seed(1)
    tok = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 20, (3, 8))
    ids[0, :3] = 4  # a padding row that occurs, so its zero gradient is checked
    position_ids = torch.randint(0, 8, (3, 8))
    out = fused_embedding_reference(ids, tok, pos, position_ids=position_ids, padding_idx=4)
    grad_out = torch.randn_like(out)
    expected = torch.autograd.grad(out, (tok, pos), grad_out)
    actual = fused_embedding_backward_reference(grad_out, ids, 20, 8, position_ids=position_ids, padding_idx=4)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)
    assert actual[0][4].abs().sum() == 0


def test_reference_broadcasts_position_ids_to_ids_shape_only():
    """position_ids broadcast to ids' shape, as in the backward reference and fused_embedding:
    one row (1, T) for a batch; more rows than ids have is refused, not broadcast the other way."""
    torch.manual_seed(2)
    tok, pos = torch.randn(10, 4), torch.randn(6, 4)
    ids, row = torch.randint(0, 10, (3, 5)), torch.randint(0, 6, (1, 5))
    actual = fused_embedding_reference(ids, tok, pos, position_ids=row)
    torch.testing.assert_close(actual, fused_embedding_reference(ids, tok, pos, position_ids=row.expand(3, 5)))
    refused = "expanded size|number of sizes provided"  # expand's own messages, not another error's
    with pytest.raises(RuntimeError, match=refused):
        fused_embedding_reference(ids[0], tok, pos, position_ids=ids.remainder(6))
    with pytest.raises(RuntimeError, match=refused):
        fused_embedding_backward_reference(torch.randn(5, 4), ids[0], 10, 6, position_ids=ids.remainder(6))



@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_reference_backward_adds_16_bit_gradients_in_float32(device, monkeypatch):
    """As the kernels do: a hot row of about 3500 bfloat16 gradients summed in float32, then
    rounded once. Summed in bfloat16, each addition to a sum near 3500 would round away
    everything below 8: far off. (On CUDA, where index_add_ of bfloat16 rows adds in bfloat16,
    the result shows the reference's cast to float32; on CPU PyTorch 2.13's index_add_
    accumulates 16-bit rows in float32 by itself, so the rows the scatter-adds get are checked.)"""
    from fusedemb import reference
    from fusedemb.accuracy import scatter_add_error

    summed_dtypes = []
    scatter_add_rows = reference.scatter_add_rows

    def recording(rows, *args, **kwargs):
        summed_dtypes.append(rows.dtype)
        return scatter_add_rows(rows, *args, **kwargs)

    monkeypatch.setattr(reference, "scatter_add_rows", recording)

    torch.manual_seed(2)
    ids = torch.zeros(4, 1024, dtype=torch.int64)
    ids[:, ::7] = torch.randint(1, 6, (4, 147))  # a few cooler rows beside the hot row 0
    grad_out = (torch.rand(4, 1024, 3) + 0.5).to(device, torch.bfloat16)
    grad_tok, grad_pos = fused_embedding_backward_reference(grad_out, ids.to(device), 6, 1024)
    assert grad_tok.dtype == grad_pos.dtype == torch.bfloat16
    assert summed_dtypes == [torch.float32, torch.float32]
    assert scatter_add_error(grad_tok, grad_out, ids, accumulate_in=torch.float32) <= 1
