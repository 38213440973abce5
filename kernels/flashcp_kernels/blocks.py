"""Host-side launch tables of the Triton kernels, cached on the SegmentMeta.

* Query blocks (forward, dQ): one entry ``(segment, first query offset)`` per
  ``BLOCK_M`` queries of a segment, heaviest (most keys) first.
* Key blocks (dK/dV): segments whose key rows overlap form a *key group*
  (in practice: the segments of one document on a rank); one entry
  ``(group, first key row)`` per ``BLOCK_N`` rows of the group. A dK/dV
  program visits every segment of its group, so key rows shared by several
  segments are summed without atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashcp_kernels.meta import SegmentMeta

__all__ = ["KeyBlocks", "query_blocks", "key_blocks"]


def query_blocks(meta: SegmentMeta, block_m: int) -> torch.Tensor:
    """int32 [num_blocks, 2] of ``(segment, query offset)``, most keys first, on meta's device."""
    key = ("query_blocks", block_m)
    if key not in meta.cache:
        entries = []
        for seg, (_, q_len, q_pos, _) in enumerate(meta.host):
            for m0 in range(0, q_len, block_m):
                entries.append((q_pos + min(m0 + block_m, q_len), seg, m0))
        entries.sort(key=lambda e: -e[0])
        rows = [(seg, m0) for _, seg, m0 in entries]
        meta.cache[key] = torch.tensor(rows, dtype=torch.int32).reshape(-1, 2).to(meta.device)
    return meta.cache[key]


@dataclass(frozen=True, kw_only=True)
class KeyBlocks:
    """Key-block launch table of the dK/dV kernel."""

    blocks: torch.Tensor
    """int32 [num_blocks, 2]: ``(group, first key row)``, heaviest first."""
    group_ptr: torch.Tensor
    """int32 [G + 1]: segments of group g are ``group_segments[group_ptr[g]:group_ptr[g + 1]]``."""
    group_segments: torch.Tensor
    """int32 [S]: segment indices ordered by group."""
    group_end: torch.Tensor
    """int32 [G]: one past the last key row the group's segments read."""


def key_blocks(meta: SegmentMeta, block_n: int) -> KeyBlocks:
    """Group segments by overlapping key rows and cut every group into ``block_n`` rows."""
    key = ("key_blocks", block_n)
    if key not in meta.cache:
        spans = sorted(
            (k_start, k_start + q_pos + q_len, seg)
            for seg, (_, q_len, q_pos, k_start) in enumerate(meta.host)
            if q_len > 0
        )
        groups: list[list[int]] = []  # [lo, hi, seg, seg, ...]
        for lo, hi, seg in spans:
            if groups and lo < groups[-1][1]:
                groups[-1][1] = max(groups[-1][1], hi)
                groups[-1].append(seg)
            else:
                groups.append([lo, hi, seg])
        entries, ptr, segs, ends = [], [0], [], []
        for g, (lo, hi, *members) in enumerate(groups):
            segs.extend(members)
            ptr.append(len(segs))
            ends.append(hi)
            for n0 in range(lo, hi, block_n):
                # queries that read rows n0.. of each member: work estimate for ordering
                work = sum(max(0, min(ql, qp + ql - (n0 - meta.host[s][3])))
                           for s in members for _, ql, qp, _ in (meta.host[s],))
                entries.append((work, g, n0))
        entries.sort(key=lambda e: -e[0])
        device = meta.device

        def as_tensor(values):
            return torch.tensor(values, dtype=torch.int32).to(device)

        meta.cache[key] = KeyBlocks(
            blocks=as_tensor([(g, n0) for _, g, n0 in entries]).reshape(-1, 2),
            group_ptr=as_tensor(ptr),
            group_segments=as_tensor(segs),
            group_end=as_tensor(ends),
        )
    return meta.cache[key]
