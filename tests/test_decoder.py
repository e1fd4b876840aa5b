import dataclasses
import math

import pytest
import torch

from evl.backbone import BlockFeatures
from evl.decoder import DecoderLayer, QuickGELU, TemporalCrossAttention, relative_offset_index
from evl.model import EVLClassifier


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
    out = torch.zeros(b, t, p, w_prev.shape[1], dtype=w_prev.dtype)
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


# --- The decoder's arithmetic against a naive restatement of the reference's formulas -------------------------
# Everything runs in float64 with every parameter random (LayerNorm weights and biases, and the zero-initialised
# query token, position embeddings and cross-attention tables too), so that e.g. norm1 and norm3 are told apart.


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, in float64: linear weights ~ N(0, 1/fan_in), all else ~ N(0, 1/4)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p.shape[-1] if p.ndim == 2 and "cross_attention" not in name and "pos_embed" not in name else 4
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in))
    return module


def layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased variance
    return (x - mean) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias


def linear(x, fc):
    return x @ fc.weight.T + fc.bias


def quick_gelu(x):
    return x / (1 + torch.exp(-1.702 * x))


def naive_softmax(scores):
    e = torch.exp(scores - scores.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def naive_attention(query, memory, attn, heads):
    """query [B, Q, C], memory [B, M, C]: per head softmax(q k^T / sqrt(d)) v, heads concatenated, out_proj."""
    q, k, v = linear(query, attn.q_proj), linear(memory, attn.k_proj), linear(memory, attn.v_proj)
    d = q.shape[-1] // heads
    out = []
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        out.append(naive_softmax(q[..., cols] @ k[..., cols].transpose(-1, -2) / math.sqrt(d)) @ v[..., cols])
    return linear(torch.cat(out, -1), attn.out_proj)


def naive_decoder_layer(x, memory, layer, heads, dropout_mask=None):
    """x = x + attn(LN1(x), LN3(mem), LN3(mem)); x = x + fc2(dropout(QuickGELU(fc1(LN2(x)))))."""
    x = x + naive_attention(layer_norm(x, layer.norm1), layer_norm(memory, layer.norm3), layer.attn, heads)
    hidden = quick_gelu(linear(layer_norm(x, layer.norm2), layer.mlp.fc1))
    if dropout_mask is not None:
        hidden = hidden * dropout_mask
    return x + linear(hidden, layer.mlp.fc2)


def naive_local_temporal(x, q, k, temporal, grid):
    """x [B, T, L, C]; q, k [B, T, L, heads, d]. Temporal conv (kernel 3, zero padding, every token), then the
    position embedding of each frame, then the cross-attention term on patch tokens only."""
    b, t, length, c = x.shape
    conv = torch.zeros_like(x)
    for frame in range(t):
        conv[:, frame] = temporal.conv.bias
        for tap in range(3):
            if 0 <= frame + tap - 1 < t:
                conv[:, frame] += temporal.conv.weight[:, 0, tap] * x[:, frame + tap - 1]
    x = x + conv
    x = x + torch.stack([temporal.pos_embed[frame].expand(length, c) for frame in range(t)])
    h, w = grid
    index = torch.tensor([[(qi - ki + h - 1) * (2 * w - 1) + (qj - kj + w - 1) for ki in range(h) for kj in range(w)]
                          for qi in range(h) for qj in range(w)])
    cross = naive_temporal_cross_attention(q[:, :, 1:], k[:, :, 1:], temporal.cross_attention.w_prev,
                                           temporal.cross_attention.w_next, index)
    return torch.cat([x[:, :, :1], x[:, :, 1:] + cross], dim=2)


def test_quick_gelu_is_x_sigmoid_1702x():
    x = torch.linspace(-6, 6, 241, dtype=torch.float64)
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x), rtol=1e-12, atol=1e-12)
    one = torch.tensor([1.0], dtype=torch.float64)
    assert QuickGELU()(one).item() == pytest.approx(0.8457958, abs=1e-7)  # exact GELU(1) would be 0.8413


@pytest.mark.parametrize("width,qkv_dim,heads", [(16, 16, 2), (32, 16, 4)])
def test_decoder_layer_matches_the_formulas(width, qkv_dim, heads):
    layer = randomise(DecoderLayer(width, qkv_dim, heads, mlp_factor=4.0, mlp_dropout=0.5)).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, width, generator=g, dtype=torch.float64)
    memory = torch.randn(3, 10, width, generator=g, dtype=torch.float64) * 2 + 0.5
    torch.testing.assert_close(layer(x, memory), naive_decoder_layer(x, memory, layer, heads), rtol=1e-9, atol=1e-9)


def test_dropout_comes_after_quick_gelu_in_the_mlp_and_after_layernorm_in_the_head(tiny_model_config):
    """In training mode: the masks the dropouts drew, applied where the reference applies them."""
    torch.manual_seed(0)
    layer = randomise(DecoderLayer(16, 16, 2, mlp_factor=4.0, mlp_dropout=0.5)).double().train()
    seen = {}
    layer.mlp.dropout.register_forward_hook(lambda m, i, o: seen.update(mlp=o != 0))
    x, memory = torch.randn(3, 1, 16, dtype=torch.float64), torch.randn(3, 10, 16, dtype=torch.float64)
    out = layer(x, memory)
    assert 0 < seen["mlp"].double().mean() < 1
    torch.testing.assert_close(out, naive_decoder_layer(x, memory, layer, 2, seen["mlp"] / 0.5))

    classifier = randomise(EVLClassifier(dataclasses.replace(tiny_model_config, cls_dropout=0.5))).double().train()
    classifier.head.dropout.register_forward_hook(lambda m, i, o: seen.update(head=o != 0))
    query = torch.randn(4, 64, dtype=torch.float64)
    out = classifier.head(query)
    assert 0 < seen["head"].double().mean() < 1
    norm, fc = classifier.head.norm, classifier.head.fc
    torch.testing.assert_close(out, linear(layer_norm(query, norm) * seen["head"] / 0.5, fc))


def random_features(num_layers, n, length, width, heads, head_dim, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [BlockFeatures(torch.randn(n, length, width, generator=g, dtype=torch.float64),
                          torch.randn(n, length, heads, head_dim, generator=g, dtype=torch.float64),
                          torch.randn(n, length, heads, head_dim, generator=g, dtype=torch.float64))
            for _ in range(num_layers)]


def naive_classifier(features, classifier, b, t, grid, heads):
    decoder = classifier.decoder
    x = decoder.query_token.expand(b, 1, -1)
    for layer, temporal, f in zip(decoder.layers, decoder.temporal, features):
        length, c = f.tokens.shape[1:]
        tokens = f.tokens.reshape(b, t, length, c)  # clip-major: image n is clip n // t, frame n % t
        q, k = (y.reshape(b, t, length, *y.shape[2:]) for y in (f.q, f.k))
        memory = naive_local_temporal(tokens, q, k, temporal, grid).reshape(b, t * length, c)
        x = naive_decoder_layer(x, memory, layer, heads)
    return linear(layer_norm(x[:, 0], classifier.head.norm), classifier.head.fc)


def test_whole_classifier_matches_the_formulas(tiny_model_config):
    """EVL-Tiny (width 64, 4 backbone heads of 16, 4x4 patches + CLS), 3 frames so the middle frame has both
    neighbours, decoder qkv 32 in 2 heads, 2 layers, every parameter random, dropouts on but in eval mode."""
    cfg = dataclasses.replace(tiny_model_config, num_frames=3, num_classes=7, decoder_qkv_dim=32,
                              decoder_num_heads=2)
    classifier = randomise(EVLClassifier(cfg)).double().eval()
    b, t, grid = 2, 3, (4, 4)
    features = random_features(2, b * t, 17, 64, heads=4, head_dim=16)
    expected = naive_classifier(features, classifier, b, t, grid, heads=2)
    # (not 1e-9: the module takes the backbone's attention softmax in float32, as the reference does)
    torch.testing.assert_close(classifier(features), expected, rtol=1e-7, atol=1e-7)
    # Each layer reads its own block's features: swapping the two blocks' features changes the logits.
    assert not torch.allclose(classifier(features[::-1]), expected, rtol=1e-3, atol=1e-3)
