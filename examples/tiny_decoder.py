"""A small decoder-only transformer that runs either with FlashCP attention (CP ranks) or unsharded.

Both variants hold the same parameters (``load_state_dict`` moves between them):

* ``TinyDecoder(config, cp=True)``: every attention layer is a
  :class:`flashcp_client.FlashCPAttention`; ``forward`` takes one CP rank's
  tokens in its dispatch order (what :func:`flashcp_client.rank_batch` yields)
  and must run inside ``with flashcp_client.cp_context(plan, group):``.
* ``TinyDecoder(config, cp=False)``: the reference; ``forward`` takes the whole
  packed micro-batch and masks attention per document with torch SDPA.

Positions come from ``position_ids`` (rotary embeddings), so a rank needs no
knowledge of where its tokens sit in the packed sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flashcp_client import FlashCPAttention


@dataclass(frozen=True, kw_only=True)
class TinyConfig:
    vocab_size: int = 512
    """Token ids are in ``[0, vocab_size)``."""
    dim: int = 64
    """Model width."""
    layers: int = 2
    """Transformer blocks."""
    heads: int = 4
    """Query heads."""
    kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    rope_base: float = 10000.0
    """Rotary embedding base."""


def rotary(x: torch.Tensor, position_ids: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding of ``x`` ``[T, heads, head_dim]`` at ``position_ids`` ``[T]``."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angles = position_ids.to(torch.float32)[:, None] * freqs[None, :]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def document_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_lengths: list[int]) -> torch.Tensor:
    """Reference attention over a whole packed sequence: causal within each document, ``[T, H, D]``."""
    doc = torch.repeat_interleave(torch.arange(len(doc_lengths)), torch.tensor(doc_lengths)).to(q.device)
    pos = torch.arange(q.shape[0], device=q.device)
    mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)


class Block(nn.Module):
    def __init__(self, config: TinyConfig, layer: int, cp: bool) -> None:
        super().__init__()
        self.config = config
        self.head_dim = config.dim // config.heads
        self.norm1 = nn.RMSNorm(config.dim)
        self.q = nn.Linear(config.dim, config.heads * self.head_dim, bias=False)
        self.kv = nn.Linear(config.dim, 2 * config.kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(config.heads * self.head_dim, config.dim, bias=False)
        self.norm2 = nn.RMSNorm(config.dim)
        self.up = nn.Linear(config.dim, 4 * config.dim, bias=False)
        self.down = nn.Linear(4 * config.dim, config.dim, bias=False)
        self.attention = FlashCPAttention(layer, backend="torch") if cp else None

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, doc_lengths: list[int] | None) -> torch.Tensor:
        c, t = self.config, x.shape[0]
        h = self.norm1(x)
        q = rotary(self.q(h).view(t, c.heads, self.head_dim), position_ids, c.rope_base)
        k, v = self.kv(h).view(t, 2 * c.kv_heads, self.head_dim).split(c.kv_heads, dim=1)
        k = rotary(k, position_ids, c.rope_base)
        if self.attention is not None:
            a = self.attention(q, k, v)
        else:
            assert doc_lengths is not None, "the unsharded model needs the packed documents' lengths"
            a = document_sdpa(q, k, v, doc_lengths)
        x = x + self.o(a.reshape(t, -1))
        return x + self.down(F.silu(self.up(self.norm2(x))))


class TinyDecoder(nn.Module):
    """Embedding, ``config.layers`` pre-norm blocks, tied output head: ``[T]`` ids -> ``[T, vocab]`` logits."""

    def __init__(self, config: TinyConfig, *, cp: bool) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, i, cp) for i in range(config.layers))
        self.norm = nn.RMSNorm(config.dim)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, doc_lengths: list[int] | None = None
    ) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, position_ids, doc_lengths)
        return self.norm(x) @ self.embed.weight.T
