"""PackedCPDataset: packing, labels, positions and per-rank batches, in-process and with DataLoader workers.

References are written here from the documents themselves (plain Python loops), not from the library.
"""

from __future__ import annotations

import random
import socket
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

import flashcp_planner as fp
from flashcp_client import PackedCPDataset, PackingStats, PlannerClient, cp_collate, pack_documents, rank_batch
from flashcp_client.dataloader import packed_labels, packed_position_ids
from flashcp_client.errors import PlanMismatchError

CONTEXT = 96
CP = 4


def make_documents(seed: int = 0, count: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        length = rng.choice([1, 2, 5, 13, 30, 61, 120])  # some longer than the context
        docs.append([1000 * i + j for j in range(length)])  # token ids name (doc, position)
    return docs


def reference_packing(docs: list[list[int]], context: int, *, truncate: bool = False) -> list[list[list[int]]]:
    """Token by token: fill micro-batches; a document cut at a boundary continues (or, truncating, stops)."""
    out, current, piece = [], [], []
    used = 0
    for doc in docs:
        for tok in doc:
            piece.append(tok)
            used += 1
            if used == context:
                current.append(piece)
                out.append(current)
                current, piece, used = [], [], 0
                if truncate:
                    break
        if piece:
            current.append(piece)
            piece = []
    if current:
        out.append(current)
    return out


def reference_rows(micro_batch: list[list[int]], all_docs: list[list[int]]) -> tuple[list[int], list[int], list[int]]:
    """Packed tokens, next-token labels of the source document (-100 at its end), positions in it.

    Token ids are ``1000 * document + position``, so the source comes from the id itself.
    """
    tokens, labels, positions = [], [], []
    for piece in micro_batch:
        for tok in piece:
            doc, pos = divmod(tok, 1000)
            tokens.append(tok)
            labels.append(tok + 1 if pos + 1 < len(all_docs[doc]) else -100)
            positions.append(pos)
    return tokens, labels, positions


def reassemble(rank_batches: list[dict[str, Any]], key: str, doc_lengths: tuple[int, ...]) -> list[int]:
    """Put every rank's rows back at their packed positions, using the rank's plan segments."""
    offsets = [0]
    for length in doc_lengths:
        offsets.append(offsets[-1] + length)
    out: list[int | None] = [None] * offsets[-1]
    for batch in rank_batches:
        values = batch[key].tolist()
        row = 0
        for doc, start, end in batch["segments"].tolist():
            for p in range(start, end):
                assert out[offsets[doc] + p] is None, "token owned twice"
                out[offsets[doc] + p] = values[row]
                row += 1
        assert row == len(values)
    assert None not in out, "token owned by no rank"
    return out  # type: ignore[return-value]


def check_item(item: dict[str, Any], micro_batch: list[list[int]], all_docs: list[list[int]]) -> None:
    tokens, labels, positions = reference_rows(micro_batch, all_docs)
    plan = item["plan"]
    assert plan.doc_lengths == tuple(len(d) for d in micro_batch)
    assert item["input_ids"].tolist() == tokens
    assert item["plan_fingerprint"] == plan.fingerprint()
    ranks = item["ranks"]
    assert [b["rank"] for b in ranks] == list(range(CP))
    assert reassemble(ranks, "input_ids", plan.doc_lengths) == tokens
    assert reassemble(ranks, "labels", plan.doc_lengths) == labels
    assert reassemble(ranks, "position_ids", plan.doc_lengths) == positions
    for r, batch in enumerate(ranks):
        assert batch["segments"].tolist() == [s.as_list() for s in plan.ranks[r].segments]
        offsets = batch["segment_offsets"].tolist()
        assert offsets[0] == 0 and offsets[-1] == batch["input_ids"].numel()
        for (_doc, start, end), lo, hi in zip(batch["segments"].tolist(), offsets, offsets[1:], strict=False):
            first = batch["position_ids"][lo].item() - start  # the piece's start in its source document
            assert batch["position_ids"][lo:hi].tolist() == list(range(first + start, first + end))
            source_docs = {t // 1000 for t in batch["input_ids"][lo:hi].tolist()}
            assert len(source_docs) == 1, "a segment mixes documents"
        # Token ids are 1000 * source document + position in it: positions must agree row by row.
        assert (batch["input_ids"] % 1000).tolist() == batch["position_ids"].tolist()
        assert batch["input_ids"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.long


def test_pack_documents_splits_and_carries_by_default_or_truncates_on_request() -> None:
    docs = [[1] * 5, [2] * 3, [3] * 10, [], [4] * 2]
    packed = list(pack_documents(docs, context_size=8))
    assert [[len(d) for d in mb] for mb in packed] == [[5, 3], [8], [2, 2]]
    assert packed[1] == [[3] * 8] and packed[2] == [[3] * 2, [4] * 2]
    truncated = list(pack_documents(docs, context_size=8, overflow="truncate"))
    assert [[len(d) for d in mb] for mb in truncated] == [[5, 3], [8], [2]]
    assert list(pack_documents([torch.arange(7)], context_size=3)) == [[[0, 1, 2]], [[3, 4, 5]], [[6]]]
    with pytest.raises(ValueError, match="context_size"):
        list(pack_documents(docs, context_size=0))
    with pytest.raises(ValueError, match="overflow"):
        list(pack_documents(docs, context_size=8, overflow="drop"))


def test_labels_and_positions_of_a_packed_sequence() -> None:
    micro_batch = [[11, 12, 13], [21], [31, 32]]
    tokens = [t for d in micro_batch for t in d]
    lengths = [len(d) for d in micro_batch]
    assert packed_labels(torch.tensor(tokens), lengths).tolist() == [12, 13, -100, -100, 32, -100]
    assert packed_position_ids(lengths).tolist() == [0, 1, 2, 0, 0, 1]
    assert packed_labels(torch.tensor(tokens), lengths, ignore_index=-1).tolist()[2] == -1
    # A piece cut before its document's end: its last label is the document's next token, positions continue.
    assert packed_labels(torch.tensor(tokens), lengths, next_tokens=[None, 22, None]).tolist()[3] == 22
    assert packed_position_ids(lengths, [0, 7, 0]).tolist() == [0, 1, 2, 7, 0, 1]


@pytest.mark.parametrize("strategy", ["flashcp", "per_doc", "zigzag", "contiguous"])
def test_every_rank_batch_reassembles_the_packed_micro_batch(strategy: str) -> None:
    docs = make_documents()
    expected = reference_packing(docs, CONTEXT)
    dataset = PackedCPDataset(docs, context_size=CONTEXT, cp_size=CP, plan_kwargs={"strategy": strategy})
    items = list(dataset)
    assert len(items) == len(expected)
    for index, (item, micro_batch) in enumerate(zip(items, expected, strict=True)):
        assert item["micro_batch"] == index
        check_item(item, micro_batch, docs)
        lengths = [[len(d) for d in micro_batch]]
        assert item["plan"] == fp.plan(fp.PlanRequest(micro_batches=lengths, cp_size=CP, strategy=strategy))[0]


def test_rank_dataset_yields_that_ranks_share_only() -> None:
    docs = make_documents(seed=1)
    full = list(PackedCPDataset(docs, context_size=CONTEXT, cp_size=CP))
    for rank in (0, CP - 1):
        mine = list(PackedCPDataset(docs, context_size=CONTEXT, cp_size=CP, rank=rank))
        assert len(mine) == len(full)
        for got, item in zip(mine, full, strict=True):
            want = item["ranks"][rank]
            assert got["rank"] == rank and got["plan_fingerprint"] == item["plan_fingerprint"]
            for key in ("input_ids", "labels", "position_ids", "segments", "segment_offsets", "doc_lengths"):
                assert torch.equal(got[key], want[key]), key


def test_dataloader_with_two_workers_keeps_order_and_content() -> None:
    docs = make_documents(seed=2, count=60)
    expected = reference_packing(docs, CONTEXT)
    dataset = PackedCPDataset(docs, context_size=CONTEXT, cp_size=CP)
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    items = list(loader)
    assert [item["micro_batch"] for item in items] == list(range(len(expected)))
    for item, micro_batch in zip(items, expected, strict=True):
        check_item(item, micro_batch, docs)
    # Two epochs give the same plans.
    assert [i["plan_fingerprint"] for i in loader] == [i["plan_fingerprint"] for i in items]


def test_dataloader_workers_with_a_dead_service_fall_back_per_worker() -> None:
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = PlannerClient(f"http://127.0.0.1:{port}", retries=0, timeout_s=2.0)
    docs = make_documents(seed=3, count=30)
    expected = reference_packing(docs, CONTEXT)
    dataset = PackedCPDataset(lambda: iter(docs), context_size=CONTEXT, cp_size=CP, planner=client,
                              micro_batches_per_step=2)
    steps = list(DataLoader(dataset, batch_size=None, num_workers=2))
    items = [item for step in steps for item in step]
    assert [len(step) for step in steps[:-1]] == [2] * (len(steps) - 1)
    assert [item["micro_batch"] for item in items] == list(range(len(expected)))
    for item, micro_batch in zip(items, expected, strict=True):
        check_item(item, micro_batch, docs)
    assert client.stats.requests == 0  # the workers used their own copies


def test_drop_last_and_collate_for_step_batches() -> None:
    docs = make_documents(seed=4, count=25)
    packed = reference_packing(docs, CONTEXT)
    expected = [mb for mb in packed if sum(map(len, mb)) == CONTEXT]
    assert len(expected) == len(packed) - 1, "the last micro-batch should be short in this case"
    dataset = PackedCPDataset(docs, context_size=CONTEXT, cp_size=2, rank=1, drop_last=True)
    batches = list(DataLoader(dataset, batch_size=3, collate_fn=cp_collate))
    flat = [item for batch in batches for item in batch]
    assert len(flat) == len(expected)
    for item, micro_batch in zip(flat, expected, strict=True):
        assert item["doc_lengths"].tolist() == [len(d) for d in micro_batch]
        assert item["plan"].num_tokens == CONTEXT
    totals = PackingStats()
    for item in flat:
        totals.add(item["packing"])
    assert totals.tokens_dropped == sum(map(len, packed[-1])) > 0  # counted, not silent
    assert totals.tokens_in == sum(map(len, docs)) == totals.tokens_packed + totals.tokens_dropped


def _epoch_tokens(items: list[dict[str, Any]]) -> tuple[list[int], dict[int, int]]:
    """Every input token of every rank over an epoch, and the label each one got."""
    seen, labels = [], {}
    for item in items:
        for batch in item["ranks"]:
            seen += batch["input_ids"].tolist()
            labels.update(zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True))
    return seen, labels


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_input_token_appears_exactly_once_over_an_epoch(num_workers: int) -> None:
    rng = random.Random(7)
    docs = [[1000 * i + j for j in range(rng.randint(1, 400))] for i in range(50)]  # up to 4x the context
    all_tokens = sorted(t for d in docs for t in d)
    dataset = PackedCPDataset(docs, context_size=CONTEXT, cp_size=CP)
    items = list(DataLoader(dataset, batch_size=None, num_workers=num_workers))
    seen, labels = _epoch_tokens(items)
    assert sorted(seen) == all_tokens  # each exactly once: nothing dropped, nothing duplicated
    for tok, label in labels.items():  # labels follow the source document across splits
        doc, pos = divmod(tok, 1000)
        assert label == (tok + 1 if pos + 1 < len(docs[doc]) else -100)
    totals = PackingStats()
    for item in items:
        totals.add(item)
    assert totals.tokens_dropped == 0 and totals.documents_truncated == 0
    assert totals.tokens_packed == totals.tokens_in == len(all_tokens)
    assert totals.documents == len(docs) and totals.micro_batches == len(items)
    assert totals.pieces_carried > 0
    if num_workers == 0:
        assert dataset.stats == totals


def test_truncation_is_explicit_and_counted() -> None:
    docs = make_documents(seed=5, count=40)
    dataset = PackedCPDataset(docs, context_size=CONTEXT, cp_size=CP, overflow="truncate")
    items = list(dataset)
    seen, _ = _epoch_tokens(items)
    assert len(seen) == len(set(seen))
    missing = sum(map(len, docs)) - len(seen)
    assert missing > 0 and dataset.stats.tokens_dropped == missing
    assert dataset.stats.documents_truncated == sum(
        1 for d in docs if any(t not in set(seen) for t in d[-1:]))
    for item, micro_batch in zip(items, reference_packing(docs, CONTEXT, truncate=True), strict=True):
        assert item["input_ids"].tolist() == [t for piece in micro_batch for t in piece]


def test_bad_arguments_are_named() -> None:
    docs = make_documents()
    for kwargs, field in [({"context_size": 0}, "context_size"), ({"cp_size": 0}, "cp_size"),
                          ({"rank": CP}, "rank"), ({"micro_batches_per_step": 0}, "micro_batches_per_step"),
                          ({"planner": 3}, "planner"), ({"overflow": "drop"}, "overflow"),
                          ({"plan_on_rank": 0}, "plan_on_rank"), ({"rank": 0, "plan_on_rank": CP}, "plan_on_rank")]:
        args = {"context_size": CONTEXT, "cp_size": CP, **kwargs}
        with pytest.raises(ValueError, match=field):
            PackedCPDataset(docs, **args)
    with pytest.raises(ValueError, match="documents"):
        PackedCPDataset(iter(docs), context_size=CONTEXT, cp_size=CP)
    plan = fp.plan(fp.PlanRequest(micro_batches=[[3, 4]], cp_size=2))[0]
    with pytest.raises(PlanMismatchError, match="tokens"):
        rank_batch(torch.arange(6), plan, 0)
    with pytest.raises(PlanMismatchError, match="rank"):
        rank_batch(torch.arange(7), plan, 2)
