"""Planning requests: what callers send, validated once at construction."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from flashcp_planner.cost import CostModel
from flashcp_planner.errors import Infeasible, InvalidRequest
from flashcp_planner.model import CommMode

__all__ = ["MAX_CP_SIZE", "MAX_DOC_LENGTH", "PlanOptions", "PlanRequest", "PlanContext"]

MAX_CP_SIZE = 4096
"""Largest CP group accepted; larger values are almost certainly a unit mistake."""
MAX_DOC_LENGTH = 1 << 31
"""Longest document accepted (tokens)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanOptions:
    """Knobs that do not change what a valid plan is, only how it is searched."""

    comm: CommMode | None = None
    """Override the strategy's default communication mechanism."""
    allow_sub_group: bool = True
    """Let the FlashCP heuristic and the optimum shard a document over k < N ranks."""
    time_limit_s: float = 10.0
    """Wall-clock limit of exact solvers (CP-SAT)."""
    num_workers: int = 8
    """CP-SAT search workers."""
    random_seed: int = 0
    """CP-SAT random seed."""

    def __post_init__(self) -> None:
        if self.comm is not None and not isinstance(self.comm, CommMode):
            try:
                object.__setattr__(self, "comm", CommMode(self.comm))
            except ValueError:
                raise InvalidRequest(
                    "options.comm", f"unknown mode {self.comm!r}; expected one of {[m.value for m in CommMode]}"
                ) from None
        t = self.time_limit_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise InvalidRequest("options.time_limit_s", f"must be a positive number of seconds, got {t!r}")
        for name in ("num_workers", "random_seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "num_workers" else 0):
                raise InvalidRequest(
                    f"options.{name}",
                    f"must be a {'positive' if name == 'num_workers' else 'non-negative'} integer, got {v!r}",
                )


def _default_cost_model() -> CostModel:
    from flashcp_planner.presets import get_preset

    return get_preset("h100-llama8b")


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanRequest:
    """One or more micro-batches to plan with the same CP size, cost model and strategy."""

    micro_batches: tuple[tuple[int, ...], ...]
    """Per micro-batch, the document lengths in packed order."""
    cp_size: int
    """Ranks in the CP group (N)."""
    cost_model: CostModel = field(default_factory=_default_cost_model)
    """Hardware and model constants."""
    strategy: str = "flashcp"
    """Name of a registered strategy (see ``flashcp_planner.strategies.STRATEGIES``)."""
    capacity_slack: float = 0.25
    """Per-rank capacity is ``ceil(T / N) * (1 + capacity_slack)`` tokens."""
    capacity: int | None = None
    """Absolute per-rank token capacity; overrides ``capacity_slack`` when set."""
    options: PlanOptions = field(default_factory=PlanOptions)

    def __post_init__(self) -> None:
        mbs = self.micro_batches
        if isinstance(mbs, (str, bytes)) or not isinstance(mbs, Sequence):
            raise InvalidRequest("micro_batches", "must be a list of lists of document lengths")
        if not mbs:
            raise InvalidRequest("micro_batches", "must contain at least one micro-batch")
        normalised = []
        for i, lengths in enumerate(mbs):
            if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence):
                raise InvalidRequest(f"micro_batches[{i}]", "must be a list of document lengths")
            if not lengths:
                raise InvalidRequest(f"micro_batches[{i}]", "must contain at least one document")
            if set(map(type, lengths)) == {int} and min(lengths) >= 1 and max(lengths) <= MAX_DOC_LENGTH:
                normalised.append(tuple(lengths))  # the common case, checked in C; else find the culprit
                continue
            for j, length in enumerate(lengths):
                if isinstance(length, bool) or not isinstance(length, int):
                    raise InvalidRequest(
                        f"micro_batches[{i}][{j}]", f"document length must be an integer, got {length!r}"
                    )
                if length < 1:
                    raise InvalidRequest(f"micro_batches[{i}][{j}]", f"document length must be >= 1, got {length}")
                if length > MAX_DOC_LENGTH:
                    raise InvalidRequest(
                        f"micro_batches[{i}][{j}]", f"document length must be <= {MAX_DOC_LENGTH}, got {length}"
                    )
            normalised.append(tuple(int(x) for x in lengths))
        object.__setattr__(self, "micro_batches", tuple(normalised))
        n = self.cp_size
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CP_SIZE:
            raise InvalidRequest("cp_size", f"must be an integer in [1, {MAX_CP_SIZE}], got {n!r}")
        if not isinstance(self.cost_model, CostModel):
            raise InvalidRequest("cost_model", "must be a CostModel")
        s = self.capacity_slack
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            raise InvalidRequest("capacity_slack", f"must be a finite number >= 0, got {s!r}")
        c = self.capacity
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise InvalidRequest("capacity", f"must be a positive integer, got {c!r}")
        from flashcp_planner.strategies import STRATEGIES

        if self.strategy not in STRATEGIES:
            raise InvalidRequest(
                "strategy", f"unknown strategy {self.strategy!r}; expected one of {sorted(STRATEGIES)}"
            )
        if not isinstance(self.options, PlanOptions):
            raise InvalidRequest("options", "must be PlanOptions")

    def contexts(self) -> list[PlanContext]:
        """One planning context per micro-batch.

        Raises:
            Infeasible: a micro-batch has more tokens than ``cp_size * capacity``.
        """
        out = []
        for i, lengths in enumerate(self.micro_batches):
            total = sum(lengths)
            if self.capacity is not None:
                capacity = self.capacity
            else:
                capacity = int(math.ceil(total / self.cp_size) * (1.0 + self.capacity_slack))
            if capacity * self.cp_size < total:
                raise Infeasible(
                    f"micro_batches[{i}]: {total} tokens do not fit in {self.cp_size} ranks x capacity {capacity}"
                )
            out.append(
                PlanContext(
                    doc_lengths=lengths,
                    cp_size=self.cp_size,
                    capacity=capacity,
                    cost_model=self.cost_model,
                    options=self.options,
                    index=i,
                )
            )
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanContext:
    """Everything a strategy needs to plan one micro-batch."""

    doc_lengths: tuple[int, ...]
    cp_size: int
    capacity: int
    """Maximum query tokens per rank."""
    cost_model: CostModel
    options: PlanOptions
    index: int = 0
    """Position of the micro-batch in its request (for error messages)."""
