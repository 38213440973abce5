"""Segment metadata: which query rows attend to which key rows.

Shape legend used across this package: ``Tq`` query rows, ``Tk`` key rows,
``H`` query heads, ``Hkv`` key/value heads, ``D`` head dim, ``S`` segments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import torch

__all__ = ["SegmentMeta"]

_FIELDS = ("q_start", "q_len", "q_pos", "k_start")


@dataclass(frozen=True, kw_only=True, eq=False)
class SegmentMeta:
    """Variable-length causal segments of a rank's local tokens.

    Segment ``s`` holds query rows ``q_start[s] .. q_start[s] + q_len[s] - 1``
    at document positions ``q_pos[s] ..``; its document's key position 0 is
    key row ``k_start[s]``. Query row ``q_start[s] + i`` attends to key rows
    ``k_start[s] .. k_start[s] + q_pos[s] + i`` (inclusive). Several segments
    may read the same key rows (two chunks of one document on one rank).
    Build with :meth:`from_lists`.
    """

    q_start: torch.Tensor
    """int32 [S]: first query row of each segment."""
    q_len: torch.Tensor
    """int32 [S]: number of queries of each segment (>= 0)."""
    q_pos: torch.Tensor
    """int32 [S]: document position of each segment's first query."""
    k_start: torch.Tensor
    """int32 [S]: key row of document position 0 of each segment's document."""
    max_q_len: int
    """max(q_len), 0 when there are no segments."""
    max_k_len: int
    """max(q_pos + q_len): the most key rows one segment reads."""
    host: tuple[tuple[int, int, int, int], ...] = field(default=(), init=False, compare=False, repr=False)
    """The same four columns as python ints, one tuple per segment (filled on construction)."""
    cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)
    """Launch tables derived from the segments (see :mod:`flashcp_kernels.blocks`), keyed by their kind."""

    def __post_init__(self) -> None:
        tensors = [getattr(self, name) for name in _FIELDS]
        for name, t in zip(_FIELDS, tensors, strict=True):
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int32:
                raise ValueError(f"SegmentMeta.{name} must be a 1-D int32 tensor")
            if t.device != tensors[0].device or t.numel() != tensors[0].numel():
                raise ValueError(f"SegmentMeta.{name} must have the length and device of q_start")
        rows = tuple(zip(*(t.tolist() for t in tensors), strict=True)) if tensors[0].numel() else ()
        for i, (qs, ql, qp, ks) in enumerate(rows):
            if min(qs, ql, qp, ks) < 0:
                raise ValueError(f"SegmentMeta segment {i}: q_start, q_len, q_pos, k_start must be >= 0")
        spans = sorted((qs, qs + ql, i) for i, (qs, ql, _, _) in enumerate(rows) if ql > 0)
        for (_, end, i), (start, _, j) in pairwise(spans):
            if start < end:
                raise ValueError(f"SegmentMeta segments {i} and {j}: query rows overlap (each row has one segment)")
        object.__setattr__(self, "host", rows)
        max_q = max((r[1] for r in rows), default=0)
        max_k = max((r[1] + r[2] for r in rows), default=0)
        if self.max_q_len != max_q or self.max_k_len != max_k:
            raise ValueError(f"SegmentMeta max_q_len/max_k_len must be {max_q}/{max_k}, "
                             f"got {self.max_q_len}/{self.max_k_len}")

    @classmethod
    def from_lists(
        cls,
        q_start: Sequence[int],
        q_len: Sequence[int],
        q_pos: Sequence[int],
        k_start: Sequence[int],
        *,
        device: torch.device | str | None = None,
    ) -> SegmentMeta:
        """Build from python sequences of equal length.

        Raises:
            ValueError: lengths differ or a value is negative.
        """
        columns = [list(map(int, c)) for c in (q_start, q_len, q_pos, k_start)]
        if len({len(c) for c in columns}) != 1:
            raise ValueError("SegmentMeta.from_lists: q_start, q_len, q_pos, k_start must have equal lengths")
        tensors = [torch.tensor(c, dtype=torch.int32, device=device) for c in columns]
        return cls(
            q_start=tensors[0], q_len=tensors[1], q_pos=tensors[2], k_start=tensors[3],
            max_q_len=max(columns[1], default=0),
            max_k_len=max((ql + qp for ql, qp in zip(columns[1], columns[2], strict=True)), default=0),
        )

    @property
    def num_segments(self) -> int:
        return len(self.host)

    @property
    def device(self) -> torch.device:
        return self.q_start.device

    def to(self, device: torch.device | str) -> SegmentMeta:
        """The same metadata with its tensors on ``device``."""
        return SegmentMeta(
            q_start=self.q_start.to(device), q_len=self.q_len.to(device), q_pos=self.q_pos.to(device),
            k_start=self.k_start.to(device), max_q_len=self.max_q_len, max_k_len=self.max_k_len,
        )

    def num_pairs(self) -> int:
        """Causal (query, key) pairs over all segments (per head): the FLOP count basis."""
        return sum((ql * (ql + 1)) // 2 + ql * qp for _, ql, qp, _ in self.host)

    def check_shapes(self, num_q_rows: int, num_k_rows: int) -> None:
        """Raise ValueError if a segment reads outside ``[0, num_q_rows)`` / ``[0, num_k_rows)``."""
        for i, (qs, ql, qp, ks) in enumerate(self.host):
            if qs + ql > num_q_rows:
                raise ValueError(f"SegmentMeta segment {i}: query rows [{qs}, {qs + ql}) exceed q rows {num_q_rows}")
            if ql and ks + qp + ql > num_k_rows:
                raise ValueError(f"SegmentMeta segment {i}: key rows [{ks}, {ks + qp + ql}) exceed k rows {num_k_rows}")
