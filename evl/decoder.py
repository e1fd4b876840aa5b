"""The EVL decoder: one learnable query token that attends, layer by layer, to the frame features of the last N
backbone blocks, after local temporal modules have mixed information between neighbouring frames.

Shapes: B clips, T frames, L = 1 + h*w tokens per frame (CLS first), P = h*w patch tokens, C backbone width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from evl.backbone import BlockFeatures


class QuickGELU(nn.Module):
    """CLIP's GELU approximation, used in the decoder MLP as in the reference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CrossAttention(nn.Module):
    """Multi-head attention of queries over a memory, with separate q/k/v/out projections."""

    def __init__(self, width: int, qkv_dim: int, num_heads: int):
        super().__init__()
        if qkv_dim % num_heads:
            raise ValueError(f"decoder_qkv_dim {qkv_dim} is not divisible by decoder_num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(width, qkv_dim)
        self.k_proj = nn.Linear(width, qkv_dim)
        self.v_proj = nn.Linear(width, qkv_dim)
        self.out_proj = nn.Linear(qkv_dim, width)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, memory_k: torch.Tensor, memory_v: torch.Tensor) -> torch.Tensor:
        # query [B, Q, C], memory [B, M, C] -> [B, Q, C]
        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, heads, S, D / heads]
            return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(query)), heads(self.k_proj(memory_k)),
                                             heads(self.v_proj(memory_v)))
        return self.out_proj(out.transpose(1, 2).flatten(2))


class DecoderLayer(nn.Module):
    """x = x + attn(norm1(x), norm3(mem), norm3(mem)); x = x + mlp(norm2(x)). No self-attention."""

    def __init__(self, width: int, qkv_dim: int, num_heads: int, mlp_factor: float, mlp_dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)  # query
        self.norm2 = nn.LayerNorm(width)  # MLP input
        self.norm3 = nn.LayerNorm(width)  # memory (frame features)
        self.attn = CrossAttention(width, qkv_dim, num_heads)
        hidden = round(width * mlp_factor)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(width, hidden))
        self.mlp.add_module("act", QuickGELU())
        self.mlp.add_module("dropout", nn.Dropout(mlp_dropout))
        self.mlp.add_module("fc2", nn.Linear(hidden, width))
        for fc in (self.mlp.fc1, self.mlp.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        # x [B, 1, C], memory [B, T*L, C]
        memory = self.norm3(memory)
        x = x + self.attn(self.norm1(x), memory, memory)
        return x + self.mlp(self.norm2(x))


def relative_offset_index(h: int, w: int) -> torch.Tensor:
    """[P, P] index into a (2h-1)(2w-1)-row table: the row for query patch q and key patch k on an h x w grid is
    (qi - ki + h - 1) * (2w - 1) + (qj - kj + w - 1)."""
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    i, j = i.flatten(), j.flatten()  # [P] grid coordinates of each patch
    di = i[:, None] - i[None, :] + h - 1  # [P, P]
    dj = j[:, None] - j[None, :] + w - 1
    return di * (2 * w - 1) + dj


class TemporalCrossAttention(nn.Module):
    """Adds to each frame's patch tokens a learned function of where its patches attend in the previous and the
    next frame: sum_k A[q, k] * w_prev[offset(q, k)] (and likewise w_next), with A the head-averaged softmax
    attention of this frame's queries over the neighbour's keys, taken from the frozen backbone.

    The attention A has no gradient (q and k come from the frozen backbone), so it is scattered once into
    offset space ([P, (2h-1)(2w-1)]) and the tables are applied as one matrix product per neighbour.
    """

    def __init__(self, width: int, grid: tuple[int, int]):
        super().__init__()
        h, w = grid
        rows = (2 * h - 1) * (2 * w - 1)
        self.w_prev = nn.Parameter(torch.zeros(rows, width))
        self.w_next = nn.Parameter(torch.zeros(rows, width))
        self.register_buffer("offset_index", relative_offset_index(h, w), persistent=False)  # [P, P]

    def _offset_attention(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # q, k [B, T', P, heads, d] -> head-averaged attention scattered by offset: [B, T', P, rows]
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = torch.einsum("btqhd,btkhd->bthqk", q, k) * scale
        attn = scores.float().softmax(dim=-1).mean(dim=2)  # [B, T', P, P]
        index = self.offset_index.expand(attn.shape)
        out = attn.new_zeros(*attn.shape[:-1], self.w_prev.shape[0])
        return out.scatter_(-1, index, attn)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q, k: [B, T, P, heads, d] patch queries and keys (CLS removed). Returns [B, T, P, C]."""
        with torch.no_grad():
            a_prev = self._offset_attention(q[:, 1:], k[:, :-1])  # frame t against t-1, t = 1..T-1
            a_next = self._offset_attention(q[:, :-1], k[:, 1:])  # frame t against t+1, t = 0..T-2
        prev = a_prev.to(self.w_prev.dtype) @ self.w_prev  # [B, T-1, P, C]
        next_ = a_next.to(self.w_next.dtype) @ self.w_next
        # The first frame has no previous one and the last no next one.
        return F.pad(prev, (0, 0, 0, 0, 1, 0)) + F.pad(next_, (0, 0, 0, 0, 0, 1))


class LocalTemporal(nn.Module):
    """The local temporal modules applied to one block's frame features before a decoder layer reads them:
    temporal convolution, temporal position embedding, temporal cross-attention; each added, each optional."""

    def __init__(self, width: int, num_frames: int, grid: tuple[int, int], conv: bool = True,
                 pos_embed: bool = True, cross_attention: bool = True):
        super().__init__()
        # Depthwise over frames, every token position (CLS included); PyTorch's default init, as the reference.
        self.conv = nn.Conv1d(width, width, kernel_size=3, padding=1, groups=width) if conv else None
        self.pos_embed = nn.Parameter(torch.zeros(num_frames, width)) if pos_embed else None
        self.cross_attention = TemporalCrossAttention(width, grid) if cross_attention else None

    def forward(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # x [B, T, L, C]; q, k [B, T, L, heads, d] -> [B, T, L, C]
        b, t, length, c = x.shape
        if self.conv is not None:
            y = x.permute(0, 2, 3, 1).reshape(b * length, c, t)  # [B*L, C, T]
            y = self.conv(y).view(b, length, c, t).permute(0, 3, 1, 2)
            x = x + y
        if self.pos_embed is not None:
            x = x + self.pos_embed[:, None, :]  # [T, 1, C] broadcast over tokens
        if self.cross_attention is not None:
            patches = x[:, :, 1:] + self.cross_attention(q[:, :, 1:], k[:, :, 1:])
            x = torch.cat([x[:, :, :1], patches], dim=2)
        return x


class EVLDecoder(nn.Module):
    """N decoder layers; layer i reads backbone block (depth - N + i). Returns the query token: [B, C]."""

    def __init__(self, width: int, num_frames: int, grid: tuple[int, int], num_layers: int = 4,
                 qkv_dim: int | None = None, num_heads: int | None = None, mlp_factor: float = 4.0,
                 mlp_dropout: float = 0.5, temporal_conv: bool = True, temporal_pos_embed: bool = True,
                 temporal_cross_attention: bool = True):
        super().__init__()
        self.num_frames = num_frames
        self.query_token = nn.Parameter(torch.zeros(width))
        self.layers = nn.ModuleList(
            DecoderLayer(width, qkv_dim or width, num_heads or width // 64, mlp_factor, mlp_dropout)
            for _ in range(num_layers))
        self.temporal = nn.ModuleList(
            LocalTemporal(width, num_frames, grid, temporal_conv, temporal_pos_embed, temporal_cross_attention)
            for _ in range(num_layers))

    def forward(self, features: list[BlockFeatures]) -> torch.Tensor:
        """features: one BlockFeatures per layer, each with N = B*T images in clip-major order."""
        if len(features) != len(self.layers):
            raise ValueError(f"decoder has {len(self.layers)} layers but got features of {len(features)} blocks")
        dtype = self.query_token.dtype  # features enter the decoder in its own precision (fp32 unless bf16 engine)
        n, length, c = features[0].tokens.shape
        b, t = n // self.num_frames, self.num_frames
        x = self.query_token.view(1, 1, c).expand(b, 1, c)  # [B, 1, C]
        for layer, temporal, f in zip(self.layers, self.temporal, features):
            tokens = f.tokens.to(dtype).view(b, t, length, c)
            q, k = (y.to(dtype).view(b, t, length, *y.shape[2:]) for y in (f.q, f.k))
            memory = temporal(tokens, q, k).flatten(1, 2)  # [B, T*L, C]
            x = layer(x, memory)
        return x[:, 0]
