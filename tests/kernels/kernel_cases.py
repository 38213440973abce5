"""Packed-sequence test cases: documents split into plan-like segments on CP ranks.

Builds, for one rank, the local query rows (plan order), a KV workspace (per
document keys [0, need) contiguous, documents in a shuffled order with junk
rows between them) and the SegmentMeta; and the torch SDPA reference over the
whole packed sequence with a block-diagonal causal mask.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashcp_kernels import SegmentMeta


@dataclass(frozen=True, kw_only=True)
class RankCase:
    q_rows: torch.Tensor
    """int64 [Tq]: global packed row of each local query row."""
    kv_rows: torch.Tensor
    """int64 [Tk]: global packed row of each workspace row, -1 for a junk row."""
    meta: SegmentMeta


def head_tail_chunks(length: int, num_chunks: int) -> list[tuple[int, int]]:
    """Cut [0, length) into num_chunks pieces whose sizes differ by at most one (empty ones allowed)."""
    base, extra = divmod(length, num_chunks)
    bounds = [0]
    for i in range(num_chunks):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def rank_segments(doc_lengths: list[int], cp_size: int, rank: int, *, whole_below: int) -> list[tuple[int, int, int]]:
    """Plan-like segments of ``rank``: docs shorter than ``whole_below`` go whole to rank d % cp_size,
    longer ones are cut head-tail into 2*cp_size chunks (rank r gets r and 2N-1-r)."""
    segments = []
    for d, length in enumerate(doc_lengths):
        if length < whole_below:
            if d % cp_size == rank:
                segments.append((d, 0, length))
            continue
        chunks = head_tail_chunks(length, 2 * cp_size)
        for c in (rank, 2 * cp_size - 1 - rank):
            s, e = chunks[c]
            if e > s:
                segments.append((d, s, e))
    return sorted(segments)


def build_rank_case(
    doc_lengths: list[int], cp_size: int, rank: int, *, whole_below: int = 8, seed: int = 0, device: str = "cpu"
) -> RankCase:
    offsets = [0]
    for length in doc_lengths:
        offsets.append(offsets[-1] + length)
    segments = rank_segments(doc_lengths, cp_size, rank, whole_below=whole_below)
    need: dict[int, int] = {}
    for d, _, e in segments:
        need[d] = max(need.get(d, 0), e)
    docs = list(need)
    random.Random(seed + rank).shuffle(docs)
    kv_rows: list[int] = []
    k_start_of: dict[int, int] = {}
    for i, d in enumerate(docs):
        if i % 2:
            kv_rows.append(-1)  # junk row the kernel must never read
        k_start_of[d] = len(kv_rows)
        kv_rows.extend(range(offsets[d], offsets[d] + need[d]))
    q_rows: list[int] = []
    q_start, q_len, q_pos, k_start = [], [], [], []
    for d, s, e in segments:
        q_start.append(len(q_rows))
        q_len.append(e - s)
        q_pos.append(s)
        k_start.append(k_start_of[d])
        q_rows.extend(range(offsets[d] + s, offsets[d] + e))
    meta = SegmentMeta.from_lists(q_start, q_len, q_pos, k_start, device=device)
    return RankCase(q_rows=torch.tensor(q_rows, dtype=torch.long), kv_rows=torch.tensor(kv_rows, dtype=torch.long),
                    meta=meta)


def document_causal_mask(doc_lengths: list[int]) -> torch.Tensor:
    """bool [T, T]: True where query i may attend key j (same document, j <= i)."""
    doc_id = torch.repeat_interleave(torch.arange(len(doc_lengths)), torch.tensor(doc_lengths))
    pos = torch.arange(doc_id.numel())
    return (doc_id[:, None] == doc_id[None, :]) & (pos[None, :] <= pos[:, None])


def sdpa_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_lengths: list[int],
                softmax_scale: float | None = None) -> torch.Tensor:
    """torch SDPA over the whole packed sequence: q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]."""
    mask = document_causal_mask(doc_lengths).to(q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


def run_all_ranks(q, k, v, doc_lengths, cp_size, attention_fn, *, whole_below=8, seed=0, junk=None):
    """Run ``attention_fn(q_local, k_ws, v_ws, meta)`` on every rank and assemble the global output.

    q/k/v are the global leaf tensors; indexing them lets autograd scatter dq and
    sum dk/dv over ranks and segments. ``junk`` ([2, Hkv, D]) fills junk rows.
    """
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    if junk is None:
        junk = torch.zeros((2,) + tuple(k.shape[1:]), dtype=k.dtype, device=k.device)
    for rank in range(cp_size):
        case = build_rank_case(doc_lengths, cp_size, rank, whole_below=whole_below, seed=seed, device=str(q.device))
        if case.q_rows.numel() == 0:
            continue
        rows = case.kv_rows.clamp(min=0).to(q.device)
        is_junk = (case.kv_rows < 0).to(q.device)[:, None, None]
        k_ws = torch.where(is_junk, junk[0], k[rows])
        v_ws = torch.where(is_junk, junk[1], v[rows])
        q_rows = case.q_rows.to(q.device)
        out = out.index_put((q_rows,), attention_fn(q[q_rows], k_ws, v_ws, case.meta))
    return out


def make_qkv(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, *, dtype=torch.float32,
             device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(num_tokens, num_heads, head_dim), (num_tokens, num_kv_heads, head_dim),
              (num_tokens, num_kv_heads, head_dim)]
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_() for s in shapes]
