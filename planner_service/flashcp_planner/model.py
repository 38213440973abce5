"""Plan data model: segments, document shardings, KV transfers, per-rank costs.

Vocabulary (see BACKGROUND.md section 2):

* A *segment* ``(doc, start, end)`` is the query tokens ``[start, end)`` of one
  document, owned by one rank. Its queries attend to keys ``[0, end)`` of the
  same document (causal, document-masked).
* A *plan* lists, for every rank, its segments in local order (sorted by
  ``(doc, start)``), how every document is sharded, the KV ranges every rank
  receives and the predicted per-rank cost of one layer, forward + backward.

Every value here is immutable (frozen dataclasses; named tuples for the
per-segment records) so that plans can be shared between threads and
processes, hashed and compared. ``Plan.to_dict`` gives the JSON form used by
the CLI, the HTTP API and the client fingerprint.
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, pairwise, repeat
from typing import Any, NamedTuple, overload

import numpy as np

from flashcp_planner.errors import InvalidRequest

__all__ = [
    "PLAN_FORMAT_VERSION",
    "CommMode",
    "ShardingKind",
    "Segment",
    "Segments",
    "RankColumns",
    "int64_array",
    "DocSharding",
    "Shardings",
    "KVTransfer",
    "RankCost",
    "RankPlan",
    "Optimality",
    "Plan",
    "causal_pairs",
]

PLAN_FORMAT_VERSION = 1
"""Bumped whenever the meaning of a plan's fields changes; checked by the client."""


class CommMode(str, enum.Enum):
    """How the KV of remote tokens reaches the ranks that read it."""

    ALL_GATHER = "all_gather"
    """Every rank receives the KV of every remote token, read or not (ring / all-gather)."""
    SHARDING_AWARE = "sharding_aware"
    """Only split documents move: every rank holding part of a document receives all of it."""
    EXACT_NEED = "exact_need"
    """Each rank receives exactly the remote KV tokens its queries read."""
    NODE_DEDUP = "node_dedup"
    """Exact need, routed per node: every remote key range a node's ranks read crosses the
    inter-node links once for the node, striped over its ranks, and is forwarded inside the node
    to the ranks that read it (:func:`flashcp_planner.comm.node_routes`). Backward mirrors it."""


class ShardingKind(str, enum.Enum):
    """How one document is spread over the ranks."""

    WHOLE = "whole"
    """All tokens on one rank; no KV traffic."""
    PER_DOC = "per_doc"
    """Head-tail over all N ranks: 2N chunks, rank r owns chunks r and 2N-1-r."""
    SUB_GROUP = "sub_group"
    """Head-tail over a subset of 1 < k < N ranks."""
    PACKED = "packed"
    """Cut by a document-oblivious split of the packed sequence (baselines)."""


def causal_pairs(start: int, end: int) -> int:
    """Number of (query, key) pairs of queries ``[start, end)`` under a causal mask from key 0."""
    return (end * (end + 1) - start * (start + 1)) // 2


class Segment(NamedTuple):
    """Query tokens ``[start, end)`` of document ``doc`` owned by one rank.

    Plans hold one per owned piece (tens of thousands per plan), so the plan records created in bulk
    (:class:`Segment`, :class:`DocSharding`, :class:`KVTransfer`) are immutable named tuples, built
    with keywords like the other records (``_replace`` makes modified copies).
    """

    doc: int
    """Index of the document in packed order."""
    start: int
    """First query token, 0-based within the document."""
    end: int
    """One past the last query token; the segment reads keys ``[0, end)``."""

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def pairs(self) -> int:
        """Causal (query, key) pairs of this segment."""
        return causal_pairs(self.start, self.end)

    def as_list(self) -> list[int]:
        return [self.doc, self.start, self.end]


class Segments(Sequence[Segment]):
    """The segments of one rank, stored as three integer columns; :class:`Segment` records on access.

    A plan over tens of thousands of documents would otherwise hold one tuple per segment: building
    them (and the garbage collector walking them) dominated planning time. Iterating, indexing,
    ``len`` and ``==`` against any sequence of segments behave as for a tuple of records; the columns
    ``docs``, ``starts`` and ``ends`` serve bulk consumers (cost evaluation, wire encoding).

    Segments made by :meth:`of_arrays` keep int64 arrays and build the tuple columns on first use
    (planners build them in bulk; many plans are evaluated and compared without reading them).
    """

    __slots__ = ("_docs", "_starts", "_ends", "_arrays", "_hash")

    def __init__(self, docs: Sequence[int] = (), starts: Sequence[int] = (), ends: Sequence[int] = ()) -> None:
        if not len(docs) == len(starts) == len(ends):
            raise ValueError(f"columns differ in length: {len(docs)}, {len(starts)}, {len(ends)}")
        self._docs: tuple[int, ...] | None = tuple(docs)
        self._starts: tuple[int, ...] | None = tuple(starts)
        self._ends: tuple[int, ...] | None = tuple(ends)
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._hash: int | None = None

    @classmethod
    def of_arrays(cls, docs: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> Segments:
        """Segments over three int64 arrays of equal length (not copied: the caller must not modify them)."""
        if not len(docs) == len(starts) == len(ends):
            raise ValueError(f"columns differ in length: {len(docs)}, {len(starts)}, {len(ends)}")
        self = cls.__new__(cls)
        self._docs = self._starts = self._ends = None
        self._arrays = (docs, starts, ends)
        self._hash = None
        return self

    @property
    def docs(self) -> tuple[int, ...]:
        """Document of every segment."""
        return self._docs if self._docs is not None else self._columns()[0]

    @property
    def starts(self) -> tuple[int, ...]:
        """First query token of every segment."""
        return self._starts if self._starts is not None else self._columns()[1]

    @property
    def ends(self) -> tuple[int, ...]:
        """One past the last query token of every segment."""
        return self._ends if self._ends is not None else self._columns()[2]

    def _columns(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        assert self._arrays is not None
        docs, starts, ends = (tuple(column.tolist()) for column in self._arrays)
        self._docs, self._starts, self._ends = docs, starts, ends  # (a racing thread builds equal ones)
        return docs, starts, ends

    def lists(self) -> list[list[int]]:
        """The records as ``[[doc, start, end], ...]`` (the JSON form)."""
        if self._arrays is not None:
            return np.stack(self._arrays, axis=1).tolist()
        return list(map(list, zip(self.docs, self.starts, self.ends, strict=True)))

    def flat(self) -> list[int]:
        """The records flattened into ``[doc_0, start_0, end_0, doc_1, ...]`` (the wire form)."""
        if self._arrays is not None:
            return np.stack(self._arrays, axis=1).ravel().tolist()
        return list(chain.from_iterable(zip(self.docs, self.starts, self.ends, strict=True)))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The columns ``(docs, starts, ends)`` as int64 arrays (shared, not to be modified)."""
        if self._arrays is None:
            self._arrays = tuple(np.array(column, dtype=np.int64) for column in (self.docs, self.starts, self.ends))
        return self._arrays

    @classmethod
    def of(cls, segments: Iterable[Segment | Sequence[int]]) -> Segments:
        """Columns of any iterable of ``(doc, start, end)`` records (a :class:`Segments` is returned as is)."""
        if isinstance(segments, Segments):
            return segments
        rows = list(segments)
        if not rows:
            return cls()
        docs, starts, ends = zip(*rows, strict=True)
        return cls(docs, starts, ends)

    @property
    def num_tokens(self) -> int:
        return sum(self.ends) - sum(self.starts)

    def __len__(self) -> int:
        return len(self._docs) if self._docs is not None else len(self._arrays[0])  # type: ignore[index]

    def __iter__(self) -> Iterator[Segment]:
        return map(tuple.__new__, repeat(Segment), zip(self.docs, self.starts, self.ends, strict=True))

    @overload
    def __getitem__(self, index: int) -> Segment: ...
    @overload
    def __getitem__(self, index: slice) -> Segments: ...
    def __getitem__(self, index: int | slice) -> Segment | Segments:
        if isinstance(index, slice):
            return Segments(self.docs[index], self.starts[index], self.ends[index])
        return Segment(self.docs[index], self.starts[index], self.ends[index])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Segments):
            return (self.docs, self.starts, self.ends) == (other.docs, other.starts, other.ends)
        if isinstance(other, (tuple, list)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(tuple(self))  # equal to the hash of the equal tuple of records
        return self._hash

    def __repr__(self) -> str:
        return f"Segments({list(self)!r})"

    def __reduce__(self) -> tuple[type[Segments], tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        return (Segments, (self.docs, self.starts, self.ends))


@dataclass(frozen=True, slots=True, kw_only=True)
class RankColumns:
    """Every rank's segments in three flat int64 arrays: rank 0's rows, then rank 1's, ..., each rank's
    in local order ``(doc, start)``. The form plans are evaluated in (bulk array passes, no per-segment
    Python work); :meth:`segments` gives the per-rank :class:`Segments`."""

    docs: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    bounds: tuple[int, ...]
    """Rank r's rows are ``bounds[r]:bounds[r + 1]`` (N + 1 entries)."""

    @classmethod
    def of(cls, rank_segments: Sequence[Segments]) -> RankColumns:
        """Columns of per-rank segments already in local order."""
        bounds = [0]
        for segments in rank_segments:
            bounds.append(bounds[-1] + len(segments))
        arrays = [segments.arrays() for segments in rank_segments]
        docs, starts, ends = (np.concatenate([np.empty(0, dtype=np.int64)] + [a[i] for a in arrays]) for i in range(3))
        return cls(docs=docs, starts=starts, ends=ends, bounds=tuple(bounds))

    @property
    def num_ranks(self) -> int:
        return len(self.bounds) - 1

    def rank_of_rows(self) -> np.ndarray:
        """The rank of every row."""
        return np.repeat(np.arange(self.num_ranks), np.diff(self.bounds))

    def tokens(self) -> list[int]:
        """Query tokens of every rank."""
        held = np.concatenate([[0], np.cumsum(self.ends - self.starts)])
        return np.diff(held[list(self.bounds)]).tolist()

    def segments(self) -> tuple[Segments, ...]:
        """Every rank's :class:`Segments` (over views of the columns)."""
        docs, starts, ends = self.docs, self.starts, self.ends
        return tuple(Segments.of_arrays(docs[a:b], starts[a:b], ends[a:b]) for a, b in pairwise(self.bounds))


def int64_array(values: Sequence[int]) -> np.ndarray:
    """``values`` (Python integers) as a read-only int64 array.

    ``struct`` unpacks a sequence of integers about twice as fast as :func:`numpy.fromiter`; values
    it rejects (out of range, not integers) take the numpy path, which converts or raises.
    """
    try:
        return np.frombuffer(struct.pack(f"{len(values)}q", *values), dtype=np.int64)
    except struct.error:
        return np.fromiter(values, dtype=np.int64, count=len(values))


class DocSharding(NamedTuple):
    """How one document is sharded and over which ranks."""

    doc: int
    """Index of the document in packed order."""
    kind: ShardingKind
    """Whole, per-doc, sub-group or packed (baselines)."""
    ranks: tuple[int, ...]
    """Ranks owning tokens of the document: one rank for whole, the head-tail
    group in chunk order for per-doc/sub-group, sorted for packed."""


class Shardings(Sequence[DocSharding]):
    """Every document's :class:`DocSharding`, stored compactly: one rank per whole document, records
    only for the split ones. Behaves like the tuple of records it stands for (``len``, indexing,
    iteration, ``==`` against any sequence); built by strategies that keep most documents whole."""

    __slots__ = ("whole_rank", "split", "_hash")

    def __init__(self, whole_rank: Sequence[int], split: Mapping[int, DocSharding], *, check: bool = True) -> None:
        """``check=False`` skips the consistency check, for builders that mark split documents -1 by
        construction (it is a pass over every document)."""
        self.whole_rank: tuple[int, ...] = tuple(whole_rank)
        """Per document, the rank holding it whole, or -1 when it is split (then in ``split``)."""
        self.split: dict[int, DocSharding] = dict(split)
        self._hash: int | None = None
        if check and not self._consistent():
            raise ValueError("every document needs a whole rank or a split record, not both")

    def _consistent(self) -> bool:
        """Whether exactly the documents with a negative whole rank have a split record.

        In C-speed passes when split documents are marked -1 (the usual form): every -1 is split iff
        the -1 count equals the split records in range, and every such record sits on a -1.
        """
        whole_rank, split = self.whole_rank, self.split
        if whole_rank and min(whole_rank) < -1:  # other negative marks: the per-document check
            return not any((rank < 0) != (doc in split) for doc, rank in enumerate(whole_rank))
        docs = range(len(whole_rank))
        marked = [doc for doc in split if doc in docs]
        return whole_rank.count(-1) == len(marked) and all(whole_rank[doc] == -1 for doc in marked)

    def __len__(self) -> int:
        return len(self.whole_rank)

    def __iter__(self) -> Iterator[DocSharding]:
        return map(self._record, range(len(self.whole_rank)))

    def _record(self, doc: int) -> DocSharding:
        rank = self.whole_rank[doc]
        if rank < 0:
            return self.split[doc]
        return tuple.__new__(DocSharding, (doc, ShardingKind.WHOLE, (rank,)))

    @overload
    def __getitem__(self, index: int) -> DocSharding: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[DocSharding, ...]: ...
    def __getitem__(self, index: int | slice) -> DocSharding | tuple[DocSharding, ...]:
        if isinstance(index, slice):
            return tuple(map(self._record, range(len(self.whole_rank))[index]))
        return self._record(range(len(self.whole_rank))[index])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Shardings):
            return self.whole_rank == other.whole_rank and self.split == other.split
        if isinstance(other, (tuple, list)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(tuple(self))
        return self._hash

    def __repr__(self) -> str:
        return f"Shardings({list(self)!r})"

    def __reduce__(self) -> tuple[type[Shardings], tuple[tuple[int, ...], dict[int, DocSharding]]]:
        return (Shardings, (self.whole_rank, self.split))


class KVTransfer(NamedTuple):
    """KV of tokens ``[start, end)`` of ``doc`` sent from ``src`` to ``dst`` in forward.

    Backward sends dK/dV of the same tokens from ``dst`` back to ``src``.
    """

    src: int
    dst: int
    doc: int
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True, kw_only=True)
class RankCost:
    """Predicted cost of one transformer layer (forward + backward) on one rank."""

    tokens: int
    """Query tokens owned by the rank."""
    linear_ms: float
    """QKV/output projections and MLP GEMMs."""
    attention_ms: float
    """Attention kernels of all the rank's segments."""
    comm_ms: float
    """KV gather (forward) plus dK/dV return (backward), alpha-beta model."""
    exposed_comm_ms: float
    """Part of ``comm_ms`` not hidden behind attention that needs no remote KV."""
    recv_bytes: int
    """KV bytes received in forward (equal to dK/dV bytes sent in backward)."""
    send_bytes: int
    """KV bytes sent in forward (equal to dK/dV bytes received in backward)."""

    @property
    def total_ms(self) -> float:
        return self.linear_ms + self.attention_ms + self.exposed_comm_ms


@dataclass(frozen=True, slots=True, kw_only=True)
class RankPlan:
    """One rank's share of a plan."""

    rank: int
    segments: Segments
    """Owned query segments in local order (sorted by ``(doc, start)``); any sequence of segments
    given here is stored as :class:`Segments`."""
    cost: RankCost

    def __post_init__(self) -> None:
        if not isinstance(self.segments, Segments):
            object.__setattr__(self, "segments", Segments.of(self.segments))

    @property
    def num_tokens(self) -> int:
        return self.segments.num_tokens


def _document_dicts(documents: Sequence[DocSharding]) -> list[dict[str, Any]]:
    """The JSON form of a plan's document records; whole documents of the compact form without records."""
    if not isinstance(documents, Shardings):
        return [{"doc": d.doc, "sharding": d.kind.value, "ranks": list(d.ranks)} for d in documents]
    whole, split = ShardingKind.WHOLE.value, documents.split
    return [
        {"doc": doc, "sharding": whole, "ranks": [rank]} if rank >= 0
        else {"doc": doc, "sharding": split[doc].kind.value, "ranks": list(split[doc].ranks)}
        for doc, rank in enumerate(documents.whole_rank)
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class Optimality:
    """Solver report attached to plans produced by an exact strategy."""

    status: str
    """``"optimal"`` or ``"feasible"`` (time limit reached before proof)."""
    objective_ms: float
    """Makespan of the returned plan under the cost model."""
    bound_ms: float
    """Best proven lower bound on the makespan found by the solver."""
    heuristic_ms: float
    """Makespan of the FlashCP heuristic on the same micro-batch."""
    heuristic_gap: float
    """``heuristic_ms / objective_ms - 1``."""
    solve_time_s: float
    """Wall-clock solver time (not part of the byte-identical plan guarantee)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A complete, validated sharding plan for one micro-batch."""

    strategy: str
    """Name of the strategy that produced the plan."""
    cp_size: int
    """Number of ranks N in the CP group."""
    doc_lengths: tuple[int, ...]
    """Document lengths in packed order."""
    capacity: int
    """Maximum tokens per rank the plan had to respect."""
    comm: CommMode
    """Communication mechanism the transfers were derived with."""
    cost_model: str
    """Name of the cost model the costs were predicted with."""
    ranks: tuple[RankPlan, ...]
    documents: Sequence[DocSharding]
    """One record per document, in document order (a tuple, or the compact :class:`Shardings`)."""
    makespan_ms: float
    """``max(rank.cost.total_ms)``: predicted step time of one layer."""
    lower_bound_ms: float
    """Perfect balance, full kernel efficiency, no exposed communication."""
    optimality: Optimality | None = None
    """Filled by exact strategies only."""
    transfers: tuple[KVTransfer, ...] | None = field(default=None, compare=False)
    """Forward KV transfers, sorted by ``(dst, doc, start, src)``, when listed; ``None``: not listed yet.

    They are a pure function of the segments and ``comm`` (an exact-need plan over k ranks per document
    implies O(k^2) of them), so planners leave them out and :func:`flashcp_planner.kv_transfers` derives
    them on first use. A listed tuple is checked against the derivation by validation. Never listed for
    ``ALL_GATHER`` (every remote token to every rank: O(N x segments)). Not part of equality: derived data."""
    version: int = field(default=PLAN_FORMAT_VERSION)
    gpus_per_node: int | None = None
    """Ranks per node the routes of a ``NODE_DEDUP`` plan were derived with (ranks r and s share a
    node iff ``r // gpus_per_node == s // gpus_per_node``); None for every other mode."""

    @property
    def num_tokens(self) -> int:
        return sum(self.doc_lengths)

    def to_dict(self, *, include_timing: bool = True) -> dict[str, Any]:
        """JSON-ready form. ``include_timing=False`` drops the solver wall time,
        the only field that is not a pure function of the request."""
        from flashcp_planner.comm import kv_transfer_rows

        out: dict[str, Any] = {
            "version": self.version,
            "strategy": self.strategy,
            "cp_size": self.cp_size,
            "doc_lengths": list(self.doc_lengths),
            "capacity": self.capacity,
            "comm": self.comm.value,
            "cost_model": self.cost_model,
            "makespan_ms": self.makespan_ms,
            "lower_bound_ms": self.lower_bound_ms,
            "ranks": [
                {
                    "rank": rp.rank,
                    "segments": rp.segments.lists(),
                    "tokens": rp.cost.tokens,
                    "linear_ms": rp.cost.linear_ms,
                    "attention_ms": rp.cost.attention_ms,
                    "comm_ms": rp.cost.comm_ms,
                    "exposed_comm_ms": rp.cost.exposed_comm_ms,
                    "total_ms": rp.cost.total_ms,
                    "recv_bytes": rp.cost.recv_bytes,
                    "send_bytes": rp.cost.send_bytes,
                }
                for rp in self.ranks
            ],
            "documents": _document_dicts(self.documents),
            "transfers": [] if self.comm is CommMode.ALL_GATHER else kv_transfer_rows(self).tolist(),
        }
        if self.gpus_per_node is not None:
            out["gpus_per_node"] = self.gpus_per_node
        if self.optimality is not None:
            opt = {
                "status": self.optimality.status,
                "objective_ms": self.optimality.objective_ms,
                "bound_ms": self.optimality.bound_ms,
                "heuristic_ms": self.optimality.heuristic_ms,
                "heuristic_gap": self.optimality.heuristic_gap,
            }
            if include_timing:
                opt["solve_time_s"] = self.optimality.solve_time_s
            out["optimality"] = opt
        return out

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON without solver timing: equal plans, equal prints."""
        canonical = json.dumps(self.to_dict(include_timing=False), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Rebuild a plan from :meth:`to_dict` output, validating it.

        Raises:
            InvalidRequest: a field is missing or malformed, the version is unknown,
                or the plan does not cover every token exactly once.
        """
        from flashcp_planner.validation import validate_plan

        try:
            version = int(data.get("version", -1))
            if version != PLAN_FORMAT_VERSION:
                raise InvalidRequest("version",
                                     f"unknown plan format version {version}, expected {PLAN_FORMAT_VERSION}")
            ranks = tuple(
                RankPlan(
                    rank=int(r["rank"]),
                    segments=Segments.of((int(d), int(s), int(e)) for d, s, e in r["segments"]),
                    cost=RankCost(
                        tokens=int(r["tokens"]),
                        linear_ms=float(r["linear_ms"]),
                        attention_ms=float(r["attention_ms"]),
                        comm_ms=float(r["comm_ms"]),
                        exposed_comm_ms=float(r["exposed_comm_ms"]),
                        recv_bytes=int(r["recv_bytes"]),
                        send_bytes=int(r["send_bytes"]),
                    ),
                )
                for r in data["ranks"]
            )
            documents = tuple(
                DocSharding(doc=int(d["doc"]), kind=ShardingKind(d["sharding"]),
                            ranks=tuple(int(x) for x in d["ranks"]))
                for d in data["documents"]
            )
            transfers = tuple(
                KVTransfer(src=int(a), dst=int(b), doc=int(c), start=int(s), end=int(e))
                for a, b, c, s, e in data.get("transfers") or ()
            ) or None
            opt_data = data.get("optimality")
            optimality = None
            if opt_data is not None:
                optimality = Optimality(
                    status=str(opt_data["status"]),
                    objective_ms=float(opt_data["objective_ms"]),
                    bound_ms=float(opt_data["bound_ms"]),
                    heuristic_ms=float(opt_data["heuristic_ms"]),
                    heuristic_gap=float(opt_data["heuristic_gap"]),
                    solve_time_s=float(opt_data.get("solve_time_s", 0.0)),
                )
            plan = cls(
                strategy=str(data["strategy"]),
                cp_size=int(data["cp_size"]),
                doc_lengths=tuple(int(x) for x in data["doc_lengths"]),
                capacity=int(data["capacity"]),
                comm=CommMode(data["comm"]),
                cost_model=str(data["cost_model"]),
                ranks=ranks,
                documents=documents,
                transfers=transfers,
                makespan_ms=float(data["makespan_ms"]),
                lower_bound_ms=float(data["lower_bound_ms"]),
                optimality=optimality,
                version=version,
                gpus_per_node=None if data.get("gpus_per_node") is None else int(data["gpus_per_node"]),
            )
        except InvalidRequest:
            raise
        except KeyError as exc:
            raise InvalidRequest(f"plan.{exc.args[0]}", "missing field") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise InvalidRequest("plan", f"malformed plan: {exc}") from None
        validate_plan(plan)
        return plan


def segments_by_rank(segments: Sequence[Sequence[Segment]]) -> tuple[Segments, ...]:
    """Every rank's segments in canonical local order ``(doc, start)`` (tuple order: segments of one
    rank never share a ``(doc, start)``)."""
    return tuple(Segments.of(sorted(rank_segments)) for rank_segments in segments)
