"""PyTorch dataloader integration: pack documents, plan each micro-batch, yield per-rank batches.

::

    dataset = PackedCPDataset(documents, context_size=32768, cp_size=8, rank=cp_rank)
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    for batch in loader:      # one micro-batch, this rank's share
        batch["input_ids"], batch["labels"], batch["position_ids"], batch["segments"], batch["plan"]

Packing: documents are appended to a micro-batch until its ``context_size``
tokens are full. A document longer than the room left is split: its head fills
the micro-batch and the remainder is carried to the next one (``overflow="split"``,
the default; a document longer than the context spans several micro-batches).
``overflow="truncate"`` drops the remainder instead. Nothing is lost silently:
every item carries its micro-batch's :class:`PackingStats` (``item["packing"]``:
tokens packed, pieces carried over, tokens dropped by truncation or
``drop_last``), and summing them over the items a ``DataLoader`` returns gives the
totals over every worker. Labels are the next token *of the source document*
(across a split too); the last token of every document gets ``ignore_index``.
Position ids are positions in the source document (a carried remainder
continues where its head stopped).

A rank's tokens are its plan segments in plan order (the execution contract of
:mod:`flashcp_client`): the token of document ``d`` at position ``p`` has global
index ``sum(doc_lengths[:d]) + p`` in the packed micro-batch.

Workers: with ``num_workers > 0`` every worker packs the same document stream
and plans and yields only its own steps (step ``i`` belongs to worker
``i % num_workers``), so a ``DataLoader`` with ``batch_size=None`` returns the
steps in order. Each worker creates its own planner (embedded by default; a
network client opens its connection lazily inside the worker). The
``DataLoader``'s own ``prefetch_factor`` keeps plans ahead of the trainer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from itertools import accumulate
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from flashcp_client.dispatch import dispatch
from flashcp_client.errors import PlanMismatchError
from flashcp_client.plan_client import PlannerClient
from flashcp_planner import Plan

__all__ = [
    "OVERFLOW_MODES",
    "PackedCPDataset",
    "PackingStats",
    "cp_collate",
    "pack_documents",
    "packed_labels",
    "packed_position_ids",
    "rank_batch",
]

Documents = Sequence[Sequence[int]] | Callable[[], Iterable[Sequence[int]]]
"""A sequence of documents (token id sequences or 1-D tensors), or a factory returning a fresh iterable of them."""


OVERFLOW_MODES = ("split", "truncate")


@dataclass(kw_only=True)
class PackingStats:
    """Token accounting of packing; one per micro-batch (``item["packing"]``), summed with ``+`` or :meth:`add`.

    ``tokens_in == tokens_packed + tokens_dropped`` over a whole epoch.
    """

    micro_batches: int = 0
    """Micro-batches yielded."""
    documents: int = 0
    """Source documents whose first token is in these micro-batches (empty documents are not counted)."""
    tokens_in: int = 0
    """Tokens of those documents."""
    tokens_packed: int = 0
    """Tokens placed in the micro-batches."""
    pieces_carried: int = 0
    """Pieces that continue a document split at the end of an earlier micro-batch (``overflow="split"``)."""
    documents_truncated: int = 0
    """Documents whose remainder was dropped (``overflow="truncate"``)."""
    tokens_dropped: int = 0
    """Tokens dropped by truncation or ``drop_last`` (counted in the last micro-batch yielded before them)."""

    def add(self, other: PackingStats | dict[str, Any] | None) -> PackingStats:
        """Add ``other`` (stats, their dict, or an item holding ``"packing"``) in place; returns self."""
        if isinstance(other, dict):
            other = other.get("packing", other)
            if isinstance(other, dict):
                other = PackingStats(**other)
        if other is not None:
            for f in fields(self):
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def __add__(self, other: PackingStats) -> PackingStats:
        return PackingStats().add(self).add(other)


@dataclass(slots=True)
class Piece:
    """A document, or a part of one, in a micro-batch."""

    tokens: list[int]
    start: int = 0
    """Position of ``tokens[0]`` in its source document."""
    next_token: int | None = None
    """The source document's token after this piece (the label of its last token); ``None`` at the end."""


@dataclass(slots=True)
class PackedMicroBatch:
    pieces: list[Piece]
    stats: PackingStats = field(default_factory=PackingStats)

    @property
    def num_tokens(self) -> int:
        return sum(len(p.tokens) for p in self.pieces)


def _check_context_size(context_size: object) -> None:
    if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 1:
        raise ValueError(f"context_size: must be a positive integer, got {context_size!r}")


def _check_overflow(overflow: object) -> None:
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow: expected one of {list(OVERFLOW_MODES)}, got {overflow!r}")


def pack(
    documents: Iterable[Sequence[int]], *, context_size: int, overflow: str = "split", drop_last: bool = False
) -> Iterator[PackedMicroBatch]:
    """Greedy packing into micro-batches of ``context_size`` tokens, with pieces and per-micro-batch stats.

    See :func:`pack_documents`. With ``drop_last``, a final micro-batch shorter than
    ``context_size`` is not yielded; its tokens are counted as dropped in the last one yielded.
    """
    _check_context_size(context_size)
    _check_overflow(overflow)
    current = PackedMicroBatch([])
    used = 0
    pending: PackedMicroBatch | None = None  # one micro-batch of lookahead, for drop_last's accounting

    def emit(done: PackedMicroBatch) -> Iterator[PackedMicroBatch]:
        nonlocal pending
        done.stats.micro_batches = 1
        done.stats.tokens_packed = done.num_tokens
        if pending is not None:
            yield pending
        pending = done

    for doc in documents:
        tokens = doc.tolist() if isinstance(doc, torch.Tensor) else list(doc)
        if not tokens:
            continue
        current.stats.documents += 1
        current.stats.tokens_in += len(tokens)
        start = 0
        while start < len(tokens):
            take = tokens[start: start + context_size - used]
            end = start + len(take)
            current.pieces.append(Piece(take, start, tokens[end] if end < len(tokens) else None))
            current.stats.pieces_carried += int(start > 0)
            used += len(take)
            if end < len(tokens) and overflow == "truncate":
                current.stats.documents_truncated += 1
                current.stats.tokens_dropped += len(tokens) - end
                end = len(tokens)
            start = end
            if used == context_size:
                yield from emit(current)
                current, used = PackedMicroBatch([]), 0
    if current.pieces:
        if drop_last:
            if pending is not None:
                pending.stats.tokens_dropped += current.num_tokens
                for name in ("documents", "tokens_in", "pieces_carried", "documents_truncated", "tokens_dropped"):
                    setattr(pending.stats, name, getattr(pending.stats, name) + getattr(current.stats, name))
        else:
            yield from emit(current)
    if pending is not None:
        yield pending


def pack_documents(
    documents: Iterable[Sequence[int]], *, context_size: int, overflow: str = "split"
) -> Iterator[list[list[int]]]:
    """Greedy packing: fill micro-batches of ``context_size`` tokens.

    A document longer than the room left is split and its remainder carried to
    the next micro-batch (``overflow="split"``), or truncated
    (``overflow="truncate"``, the remainder is dropped). Empty documents are
    skipped. The last micro-batch may be shorter than ``context_size``.

    Yields:
        Per micro-batch, its documents' (or pieces') token ids, in order.
    """
    for micro_batch in pack(documents, context_size=context_size, overflow=overflow):
        yield [p.tokens for p in micro_batch.pieces]


def packed_position_ids(doc_lengths: Sequence[int], starts: Sequence[int] | None = None) -> torch.Tensor:
    """Position of every packed token within its source document: ``[T]`` int64, from ``starts[d]`` (default 0)."""
    starts = starts if starts is not None else [0] * len(doc_lengths)
    return torch.cat([torch.arange(s, s + length, dtype=torch.long)
                      for s, length in zip(starts, doc_lengths, strict=True)])


def packed_labels(
    tokens: torch.Tensor,
    doc_lengths: Sequence[int],
    *,
    ignore_index: int = -100,
    next_tokens: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Next-token labels of a packed sequence: ``[T]`` int64.

    The last token of document ``d`` gets ``next_tokens[d]`` (the token after a
    split piece) or, when that is ``None`` or not given, ``ignore_index``.
    """
    labels = torch.full_like(tokens, ignore_index)
    labels[:-1] = tokens[1:]
    ends = torch.tensor(list(accumulate(doc_lengths)), dtype=torch.long) - 1
    labels[ends] = ignore_index
    for end, token in zip(ends.tolist(), next_tokens or (), strict=False):
        if token is not None:
            labels[end] = token
    return labels


def rank_batch(
    tokens: torch.Tensor,
    plan: Plan,
    rank: int,
    *,
    ignore_index: int = -100,
    micro_batch: int = 0,
    starts: Sequence[int] | None = None,
    next_tokens: Sequence[int | None] | None = None,
) -> dict[str, Any]:
    """One rank's share of a packed micro-batch.

    Args:
        tokens: ``[T]`` packed token ids of the micro-batch the plan was made for.
        plan: its plan.
        rank: the CP rank.
        ignore_index: label of the last token of every document.
        micro_batch: index of the micro-batch in the stream (recorded in the batch).
        starts: per document (piece), the position of its first token in the source document.
        next_tokens: per document (piece), the label of its last token (``None``: ``ignore_index``).

    Returns:
        A dict with ``input_ids``, ``labels``, ``position_ids`` (``[tokens_r]`` int64, local order);
        ``segments`` (``[S, 3]`` int64 rows ``(doc, start, end)``, the rank's plan segments);
        ``segment_offsets`` (``[S + 1]`` int64: segment ``i`` is local rows
        ``segment_offsets[i]:segment_offsets[i + 1]``); ``doc_lengths`` (``[D]`` int64);
        ``plan``, ``plan_fingerprint``, ``rank``, ``micro_batch``.

    Raises:
        PlanMismatchError: ``tokens`` is not ``[T]`` for this plan, or ``rank`` is outside its group.
    """
    if tokens.dim() != 1 or tokens.numel() != plan.num_tokens:
        raise PlanMismatchError("tokens", f"expected shape [{plan.num_tokens}] for this plan, got {list(tokens.shape)}")
    input_ids = dispatch(tokens, plan, rank)  # checks the rank first
    segments = plan.ranks[rank].segments
    labels = packed_labels(tokens, plan.doc_lengths, ignore_index=ignore_index, next_tokens=next_tokens)
    positions = packed_position_ids(plan.doc_lengths, starts)
    return {
        "input_ids": input_ids,
        "labels": dispatch(labels, plan, rank),
        "position_ids": dispatch(positions, plan, rank),
        "segments": torch.tensor([s.as_list() for s in segments], dtype=torch.long).reshape(-1, 3),
        "segment_offsets": torch.tensor([0, *accumulate(s.num_tokens for s in segments)], dtype=torch.long),
        "doc_lengths": torch.tensor(plan.doc_lengths, dtype=torch.long),
        "plan": plan,
        "plan_fingerprint": plan.fingerprint(),
        "rank": rank,
        "micro_batch": micro_batch,
    }


def cp_collate(items: list[Any]) -> list[Any]:
    """Collate for ``DataLoader(batch_size=k)``: keep the micro-batches as a list (they differ in length)."""
    return list(items)


class PackedCPDataset(IterableDataset):
    """Documents -> packed micro-batches -> plans -> per-rank batches.

    Args:
        documents: a sequence of documents (token id sequences or 1-D tensors) or a zero-argument
            factory returning a fresh iterable of them (re-called on every epoch and in every worker).
        context_size: tokens per packed micro-batch.
        cp_size: ranks in the CP group.
        rank: yield only this rank's batch; ``None``: yield every rank's (see below).
        micro_batches_per_step: micro-batches planned together in one request; with more than one,
            every item is a list of that many micro-batch items (the last step may be shorter).
        planner: ``None`` (embedded planner), a service address, or a :class:`PlannerClient` (each
            worker gets its own copy with its own connections).
        plan_kwargs: per-call options for ``planner.plan`` (``strategy``, ``cost_model``, ...).
        ignore_index: label of the last token of every document.
        drop_last: drop a final micro-batch shorter than ``context_size`` (its tokens are counted as dropped).
        overflow: ``"split"`` (default: carry the remainder of a document that does not fit to the next
            micro-batch) or ``"truncate"`` (drop it, counted in ``item["packing"]``).
        plan_on_rank: plan only in the dataset of this CP rank (the others yield unplanned items):
            the trainer then calls :func:`flashcp_client.share_plan` on every rank, which broadcasts
            that rank's plan. ``None`` (default): every rank's dataset plans.

    Items (one per micro-batch): with ``rank`` set, :func:`rank_batch`'s dict; with ``rank=None``, a dict
    with ``plan``, ``plan_fingerprint``, ``micro_batch``, ``input_ids`` (the packed ``[T]`` tokens) and
    ``ranks`` (one :func:`rank_batch` dict per rank). Every item also holds ``packing`` (its
    micro-batch's :class:`PackingStats`; add them up across the items of every worker) and ``packed``
    (what :func:`flashcp_client.share_plan` needs: packed tokens, piece starts and next tokens).
    The dataset's own :attr:`stats` totals what this process packed (all of it without workers).

    Raises:
        ValueError: a malformed argument, named.
    """

    def __init__(
        self,
        documents: Documents,
        *,
        context_size: int,
        cp_size: int,
        rank: int | None = None,
        micro_batches_per_step: int = 1,
        planner: PlannerClient | str | None = None,
        plan_kwargs: dict[str, Any] | None = None,
        ignore_index: int = -100,
        drop_last: bool = False,
        overflow: str = "split",
        plan_on_rank: int | None = None,
    ) -> None:
        super().__init__()
        _check_context_size(context_size)
        _check_overflow(overflow)
        if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
            raise ValueError(f"cp_size: must be a positive integer, got {cp_size!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < cp_size):
            raise ValueError(f"rank: must be None or an integer in [0, {cp_size}), got {rank!r}")
        steps = micro_batches_per_step
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"micro_batches_per_step: must be a positive integer, got {steps!r}")
        if plan_on_rank is not None and (isinstance(plan_on_rank, bool) or not isinstance(plan_on_rank, int)
                                         or not 0 <= plan_on_rank < cp_size):
            raise ValueError(f"plan_on_rank: must be None or an integer in [0, {cp_size}), got {plan_on_rank!r}")
        if plan_on_rank is not None and rank is None:
            raise ValueError("plan_on_rank: needs rank (each CP rank's dataset yields its own share)")
        if not (callable(documents) or isinstance(documents, Sequence)):
            raise ValueError("documents: must be a sequence of documents or a factory returning an iterable of them")
        if planner is not None and not isinstance(planner, (str, PlannerClient)):
            raise ValueError(f"planner: must be None, an address or a PlannerClient, got {type(planner).__name__}")
        self.documents = documents
        self.context_size = context_size
        self.cp_size = cp_size
        self.rank = rank
        self.micro_batches_per_step = steps
        self.planner = planner
        self.plan_kwargs = dict(plan_kwargs or {})
        self.ignore_index = ignore_index
        self.drop_last = drop_last
        self.overflow = overflow
        self.plan_on_rank = plan_on_rank
        self.stats = PackingStats()
        """Totals of what this process packed and yielded."""
        self._client: tuple[int, PlannerClient] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    def client(self) -> PlannerClient:
        """This process's planner client (created on first use, recreated after a fork)."""
        if self._client is None or self._client[0] != os.getpid():
            if isinstance(self.planner, PlannerClient):
                client = self.planner if self._client is None and get_worker_info() is None else _copy(self.planner)
            else:
                client = PlannerClient(self.planner)
            self._client = (os.getpid(), client)
        return self._client[1]

    def _steps(self) -> Iterator[list[PackedMicroBatch]]:
        docs = self.documents() if callable(self.documents) else self.documents
        step: list[PackedMicroBatch] = []
        for micro_batch in pack(docs, context_size=self.context_size, overflow=self.overflow,
                                drop_last=self.drop_last):
            step.append(micro_batch)
            if len(step) == self.micro_batches_per_step:
                yield step
                step = []
        if step:
            yield step

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        plans_here = self.plan_on_rank is None or self.plan_on_rank == self.rank
        for step_index, step in enumerate(self._steps()):
            if step_index % num_workers != worker:
                continue
            lengths = [[len(p.tokens) for p in micro_batch.pieces] for micro_batch in step]
            plans: Sequence[Plan | None] = (self.client().plan(lengths, cp_size=self.cp_size, **self.plan_kwargs)
                                            if plans_here else [None] * len(step))
            items = [
                self._item(micro_batch, plan, step_index * self.micro_batches_per_step + i)
                for i, (micro_batch, plan) in enumerate(zip(step, plans, strict=True))
            ]
            for micro_batch in step:
                self.stats.add(micro_batch.stats)
            yield items if self.micro_batches_per_step > 1 else items[0]

    def _item(self, micro_batch: PackedMicroBatch, plan: Plan | None, index: int) -> dict[str, Any]:
        pieces = micro_batch.pieces
        tokens = torch.tensor([t for p in pieces for t in p.tokens], dtype=torch.long)
        packed = {"tokens": tokens, "starts": [p.start for p in pieces], "next_tokens": [p.next_token for p in pieces],
                  "doc_lengths": [len(p.tokens) for p in pieces], "ignore_index": self.ignore_index}
        common = {"micro_batch": index, "packing": micro_batch.stats, "packed": packed,
                  "plan_on_rank": self.plan_on_rank}
        if plan is None:
            return {"plan": None, "rank": self.rank, **common}
        per_rank = dict(ignore_index=self.ignore_index, micro_batch=index, starts=packed["starts"],
                        next_tokens=packed["next_tokens"])
        if self.rank is not None:
            return {**rank_batch(tokens, plan, self.rank, **per_rank), **common}
        return {
            "plan": plan,
            "plan_fingerprint": plan.fingerprint(),
            "input_ids": tokens,
            "ranks": [rank_batch(tokens, plan, r, **per_rank) for r in range(plan.cp_size)],
            **common,
        }


def _copy(client: PlannerClient) -> PlannerClient:
    fresh = PlannerClient.__new__(PlannerClient)
    fresh.__setstate__(client.__getstate__())
    return fresh
