import math

import torch

from evl.decoder import TemporalCrossAttention, relative_offset_index


def test_relative_offset_index_follows_the_reference_formula():
    h, w = 3, 5
    index = relative_offset_index(h, w)
    for q in range(h * w):
        for k in range(h * w):
            (qi, qj), (ki, kj) = divmod(q, w), divmod(k, w)
            assert index[q, k] == (qi - ki + h - 1) * (2 * w - 1) + (qj - kj + w - 1)
    assert index.min() == 0 and index.max() == (2 * h - 1) * (2 * w - 1) - 1
    # For one query, every key lands on its own row: scattering attention by offset loses nothing.
    assert all(len(set(row.tolist())) == h * w for row in index)


def naive_temporal_cross_attention(q, k, w_prev, w_next, index):
    """The method as written: per frame, per neighbour, gather w[offset(q, k)] and weight it by attention."""
    b, t, p, heads, d = q.shape
    out = torch.zeros(b, t, p, w_prev.shape[1])
    for frame in range(t):
        for other, table in ((frame - 1, w_prev), (frame + 1, w_next)):
            if not 0 <= other < t:
                continue
            scores = torch.einsum("bqhd,bkhd->bhqk", q[:, frame], k[:, other]) / math.sqrt(d)
            attn = scores.softmax(-1).mean(1)  # [b, P, P]
            out[:, frame] += torch.einsum("bqk,qkc->bqc", attn, table[index])
    return out


def test_batched_cross_attention_equals_the_naive_computation():
    torch.manual_seed(0)
    grid, width = (3, 4), 8
    module = TemporalCrossAttention(width, grid)
    with torch.no_grad():
        module.w_prev.normal_()
        module.w_next.normal_()
    q, k = torch.randn(2, 5, 12, 2, 4), torch.randn(2, 5, 12, 2, 4)
    expected = naive_temporal_cross_attention(q, k, module.w_prev, module.w_next, relative_offset_index(*grid))
    torch.testing.assert_close(module(q, k), expected, atol=1e-5, rtol=1e-5)


def test_edges_get_one_neighbour_and_only_tables_learn():
    module = TemporalCrossAttention(4, (2, 2))
    with torch.no_grad():
        module.w_prev.fill_(1.0)  # only the "previous frame" table is non-zero
    q = torch.randn(1, 3, 4, 1, 2, requires_grad=True)
    out = module(q, torch.randn(1, 3, 4, 1, 2))
    assert torch.count_nonzero(out[:, 0]) == 0  # the first frame has no previous frame
    torch.testing.assert_close(out[:, 1:], torch.ones(1, 2, 4, 4))  # attention rows sum to one
    out.sum().backward()
    assert q.grad is None and module.w_prev.grad is not None
