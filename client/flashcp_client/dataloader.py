"""PyTorch dataloader integration: pack documents, plan each micro-batch, yield per-rank batches.

::

    dataset = PackedCPDataset(documents, context_size=32768, cp_size=8, rank=cp_rank)
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    for batch in loader:      # one micro-batch, this rank's share
        batch["input_ids"], batch["labels"], batch["position_ids"], batch["segments"], batch["plan"]

Packing: documents are appended to a micro-batch until its ``context_size``
tokens are full; the document that does not fit is truncated (its remainder is
dropped). Labels are the next token *within the document*; the last token of
every document gets ``ignore_index``. Position ids restart at 0 at every
document.

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
from itertools import accumulate
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from flashcp_client.dispatch import dispatch
from flashcp_client.errors import PlanMismatchError
from flashcp_client.plan_client import PlannerClient
from flashcp_planner import Plan

__all__ = [
    "PackedCPDataset",
    "cp_collate",
    "pack_documents",
    "packed_labels",
    "packed_position_ids",
    "rank_batch",
]

Documents = Sequence[Sequence[int]] | Callable[[], Iterable[Sequence[int]]]
"""A sequence of documents (token id sequences or 1-D tensors), or a factory returning a fresh iterable of them."""


def pack_documents(documents: Iterable[Sequence[int]], *, context_size: int) -> Iterator[list[list[int]]]:
    """Greedy packing: fill micro-batches of ``context_size`` tokens, truncating the document that overflows.

    Empty documents are skipped. The last micro-batch may be shorter than ``context_size``.

    Yields:
        Per micro-batch, its documents' token ids (lists of ints), in order.
    """
    if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 1:
        raise ValueError(f"context_size: must be a positive integer, got {context_size!r}")
    current: list[list[int]] = []
    used = 0
    for doc in documents:
        tokens = doc.tolist() if isinstance(doc, torch.Tensor) else list(doc)
        if not tokens:
            continue
        tokens = tokens[: context_size - used]
        current.append(tokens)
        used += len(tokens)
        if used == context_size:
            yield current
            current, used = [], 0
    if current:
        yield current


def packed_position_ids(doc_lengths: Sequence[int]) -> torch.Tensor:
    """Position of every packed token within its document: ``[T]`` int64, restarting at 0 per document."""
    return torch.cat([torch.arange(length, dtype=torch.long) for length in doc_lengths])


def packed_labels(tokens: torch.Tensor, doc_lengths: Sequence[int], *, ignore_index: int = -100) -> torch.Tensor:
    """Next-token labels of a packed sequence: ``[T]`` int64; the last token of every document gets ``ignore_index``."""
    labels = torch.full_like(tokens, ignore_index)
    labels[:-1] = tokens[1:]
    ends = torch.tensor(list(accumulate(doc_lengths)), dtype=torch.long) - 1
    labels[ends] = ignore_index
    return labels


def rank_batch(
    tokens: torch.Tensor, plan: Plan, rank: int, *, ignore_index: int = -100, micro_batch: int = 0
) -> dict[str, Any]:
    """One rank's share of a packed micro-batch.

    Args:
        tokens: ``[T]`` packed token ids of the micro-batch the plan was made for.
        plan: its plan.
        rank: the CP rank.
        ignore_index: label of the last token of every document.
        micro_batch: index of the micro-batch in the stream (recorded in the batch).

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
    labels = packed_labels(tokens, plan.doc_lengths, ignore_index=ignore_index)
    positions = packed_position_ids(plan.doc_lengths)
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
        drop_last: drop a final micro-batch shorter than ``context_size``.

    Items (one per micro-batch): with ``rank`` set, :func:`rank_batch`'s dict; with ``rank=None``, a dict
    with ``plan``, ``plan_fingerprint``, ``micro_batch``, ``input_ids`` (the packed ``[T]`` tokens) and
    ``ranks`` (one :func:`rank_batch` dict per rank).

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
    ) -> None:
        super().__init__()
        if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 1:
            raise ValueError(f"context_size: must be a positive integer, got {context_size!r}")
        if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
            raise ValueError(f"cp_size: must be a positive integer, got {cp_size!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < cp_size):
            raise ValueError(f"rank: must be None or an integer in [0, {cp_size}), got {rank!r}")
        steps = micro_batches_per_step
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"micro_batches_per_step: must be a positive integer, got {steps!r}")
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

    def _steps(self) -> Iterator[list[list[list[int]]]]:
        docs = self.documents() if callable(self.documents) else self.documents
        step: list[list[list[int]]] = []
        for micro_batch in pack_documents(docs, context_size=self.context_size):
            if self.drop_last and sum(map(len, micro_batch)) < self.context_size:
                continue
            step.append(micro_batch)
            if len(step) == self.micro_batches_per_step:
                yield step
                step = []
        if step:
            yield step

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        for step_index, step in enumerate(self._steps()):
            if step_index % num_workers != worker:
                continue
            lengths = [[len(doc) for doc in micro_batch] for micro_batch in step]
            plans = self.client().plan(lengths, cp_size=self.cp_size, **self.plan_kwargs)
            items = [
                self._item(micro_batch, plan, step_index * self.micro_batches_per_step + i)
                for i, (micro_batch, plan) in enumerate(zip(step, plans, strict=True))
            ]
            yield items if self.micro_batches_per_step > 1 else items[0]

    def _item(self, micro_batch: list[list[int]], plan: Plan, index: int) -> dict[str, Any]:
        tokens = torch.tensor([t for doc in micro_batch for t in doc], dtype=torch.long)
        if self.rank is not None:
            return rank_batch(tokens, plan, self.rank, ignore_index=self.ignore_index, micro_batch=index)
        return {
            "plan": plan,
            "plan_fingerprint": plan.fingerprint(),
            "micro_batch": index,
            "input_ids": tokens,
            "ranks": [rank_batch(tokens, plan, r, ignore_index=self.ignore_index, micro_batch=index)
                      for r in range(plan.cp_size)],
        }


def _copy(client: PlannerClient) -> PlannerClient:
    fresh = PlannerClient.__new__(PlannerClient)
    fresh.__setstate__(client.__getstate__())
    return fresh
