"""The last plans the service returned, as small summaries for the plan explorer's Live view (``GET /v1/recent``).

Off by default (``Settings.recent_plans = 0``). When on, every ``sample_every``-th plan is kept in a
ring buffer of ``capacity`` summaries: strategy, sizes, makespan and lower bound, and the document
lengths of plans of at most :attr:`RecentPlans.max_lengths` documents. No request content beyond
lengths is kept; all kept lengths together take at most :data:`LENGTHS_BUDGET` 4-byte integers.
"""

from __future__ import annotations

import itertools
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Any

from flashcp_planner.model import Plan

__all__ = ["LENGTHS_BUDGET", "MAX_KEPT_LENGTHS", "RecentPlan", "RecentPlans"]

MAX_KEPT_LENGTHS = 16384
"""Plans of more documents are summarised without their lengths."""
LENGTHS_BUDGET = 1 << 22
"""Most document lengths kept over the whole buffer (16 MiB): large buffers keep shorter plans' lengths only."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RecentPlan:
    """Summary of one returned plan."""

    seq: int
    """1, 2, ... in the order the plans were recorded (sampled-out plans count too)."""
    unix_time_s: float
    """When the plan was recorded."""
    strategy: str
    cp_size: int
    cost_model: str
    num_documents: int
    tokens: int
    makespan_ms: float
    lower_bound_ms: float
    lengths: array | None
    """The document lengths in packed order; None over :attr:`RecentPlans.max_lengths` documents."""

    def to_dict(self, *, with_lengths: bool) -> dict[str, Any]:
        """JSON form; ``lengths`` only ``with_lengths`` (null when not kept)."""
        out = {
            "seq": self.seq,
            "unix_time_s": self.unix_time_s,
            "strategy": self.strategy,
            "cp_size": self.cp_size,
            "cost_model": self.cost_model,
            "num_documents": self.num_documents,
            "tokens": self.tokens,
            "makespan_ms": self.makespan_ms,
            "lower_bound_ms": self.lower_bound_ms,
        }
        if with_lengths:
            out["lengths"] = None if self.lengths is None else self.lengths.tolist()
        return out


class RecentPlans:
    """A bounded, thread-safe ring buffer of :class:`RecentPlan` summaries.

    Args:
        capacity: summaries kept (0: off; :meth:`record` returns at once).
        sample_every: keep one plan in this many (1: every plan).

    Raises:
        ValueError: a negative capacity or a sample_every below 1.
    """

    def __init__(self, *, capacity: int, sample_every: int = 1) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if sample_every < 1:
            raise ValueError(f"sample_every must be >= 1, got {sample_every}")
        self.capacity = capacity
        self.sample_every = sample_every
        self.max_lengths = min(MAX_KEPT_LENGTHS, LENGTHS_BUDGET // max(capacity, 1))
        """Plans of more documents are kept without their lengths."""
        self._plans: deque[RecentPlan] = deque(maxlen=capacity)
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def record(self, plan: Plan) -> None:
        """Keep a summary of ``plan`` if recording is on and the sample falls on it."""
        if not self.capacity:
            return
        seq = next(self._counter)
        if seq % self.sample_every:
            return
        lengths = plan.doc_lengths
        summary = RecentPlan(
            seq=seq,
            unix_time_s=time.time(),
            strategy=plan.strategy,
            cp_size=plan.cp_size,
            cost_model=plan.cost_model,
            num_documents=len(lengths),
            tokens=sum(lengths),
            makespan_ms=plan.makespan_ms,
            lower_bound_ms=plan.lower_bound_ms,
            lengths=array("i", lengths) if len(lengths) <= self.max_lengths else None,
        )
        with self._lock:
            self._plans.append(summary)

    def after(self, seq: int = 0) -> list[RecentPlan]:
        """The kept summaries recorded after ``seq``, oldest first."""
        with self._lock:
            return [p for p in self._plans if p.seq > seq]
