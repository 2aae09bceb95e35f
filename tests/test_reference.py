"""The reference definition itself against nn.Embedding modules and autograd."""

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
