"""Derive the KV transfers a set of per-rank segments needs under each communication mode."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain, compress

from flashcp_planner.model import CommMode, KVTransfer, Plan, Segment, Segments

_new = tuple.__new__
"""Builds a named-tuple record from a tuple without the keyword constructor (hot loops only)."""

__all__ = ["derive_transfers", "kv_transfers", "transfers_and_traffic"]


Traffic = list[list[int]]
"""Per rank ``[intra-node, inter-node]`` KV tokens (received, or sent, in forward)."""


def derive_transfers(rank_segments: Sequence[Sequence[Segment]], comm: CommMode) -> tuple[KVTransfer, ...]:
    """Forward KV transfers implied by ``rank_segments`` under ``comm``.

    ``ALL_GATHER`` moves every remote token to every rank; ``SHARDING_AWARE``
    moves every piece of a split document to every other holder of that
    document; ``EXACT_NEED`` moves to rank r only keys ``[0, max end)`` of the
    documents its segments read. Whole documents never move except under
    ``ALL_GATHER``. Result sorted by ``(dst, doc, start, src)``.
    """
    return transfers_and_traffic(rank_segments, comm, 1)[0]


def transfers_and_traffic(
    rank_segments: Sequence[Sequence[Segment]], comm: CommMode, gpus_per_node: int, *, list_transfers: bool = True
) -> tuple[tuple[KVTransfer, ...], Traffic, Traffic]:
    """:func:`derive_transfers` plus the tokens every rank receives and sends, per link class.

    The totals are summed per document in O(pieces) (prefix sums over the pieces in document
    order), not per transfer: equal to summing the transfers, without a pass over them (a plan over
    hundreds of ranks lists millions).

    Returns:
        ``(transfers, recv, send)``; ``recv[r]`` / ``send[r]`` are ``[intra, inter]`` token counts.
        With ``list_transfers=False`` no transfer is listed (``transfers`` is empty); the totals are
        computed all the same (closed-form for ``ALL_GATHER``).
    """
    n = len(rank_segments)
    gpn = gpus_per_node
    recv = [[0, 0] for _ in range(n)]
    send = [[0, 0] for _ in range(n)]
    if comm is CommMode.ALL_GATHER:
        transfers: list[KVTransfer] = []
        for dst in range(n if list_transfers else 0):
            incoming = [_new(KVTransfer, (src, dst, s[0], s[1], s[2]))
                        for src, segments in enumerate(rank_segments) if src != dst for s in segments]
            incoming.sort(key=_doc_start_src)
            transfers.extend(incoming)
        held = [sum(end - start for _, start, end in segments) for segments in rank_segments]
        node_tokens: dict[int, int] = {}
        node_size: dict[int, int] = {}
        for r, tokens in enumerate(held):
            node_tokens[r // gpn] = node_tokens.get(r // gpn, 0) + tokens
            node_size[r // gpn] = node_size.get(r // gpn, 0) + 1
        total = sum(held)
        for r, tokens in enumerate(held):
            node = r // gpn
            recv[r] = [node_tokens[node] - tokens, total - node_tokens[node]]
            send[r] = [tokens * (node_size[node] - 1), tokens * (n - node_size[node])]
        return tuple(transfers), recv, send
    # Documents with a segment not starting at token 0 (found in C): in a layout covering every
    # document once, exactly those held in several pieces. Pieces on one rank only yield no transfer.
    columns = [Segments.of(segments) for segments in rank_segments]
    split_docs = set(chain.from_iterable(compress(c.docs, c.starts) for c in columns))
    if not split_docs:
        return (), recv, send
    owners: dict[int, list[tuple[int, int, int]]] = {doc: [] for doc in sorted(split_docs)}
    held = split_docs.__contains__
    for rank, c in enumerate(columns):
        for doc, start, end in compress(zip(c.docs, c.starts, c.ends, strict=True), map(held, c.docs)):
            owners[doc].append((start, end, rank))
    exact = comm is CommMode.EXACT_NEED
    by_dst: list[list[KVTransfer]] = [[] for _ in range(n)]
    for doc, owned in owners.items():  # docs ascending, so every dst list ends up sorted by (doc, start)
        owned.sort()
        last = len(owned) - 1
        need: dict[int, int] = {}  # holder -> index of the last piece it reads
        own: dict[int, int] = {}  # holder -> its tokens of the document
        for index, (start, end, rank) in enumerate(owned):
            need[rank] = index if exact else last
            own[rank] = own.get(rank, 0) + end - start
        for dst, upto in need.items() if list_transfers else ():
            # Pieces are disjoint and cover the document, so every piece before dst's last one lies
            # entirely below dst's need: exact-need transfers never cut a piece.
            by_dst[dst] += [_new(KVTransfer, (src, dst, doc, start, end))
                            for start, end, src in owned[:upto + 1] if src != dst]
        _doc_traffic(owned, need, own, gpn, recv, send)
    return tuple(t for out in by_dst for t in out), recv, send


def _doc_traffic(owned: list[tuple[int, int, int]], need: dict[int, int], own: dict[int, int], gpn: int,
                 recv: Traffic, send: Traffic) -> None:
    """Add one split document's traffic: holder h reads pieces ``0..need[h]`` (its own among them)."""
    readers_at: dict[int, list[int]] = {}
    for holder, upto in need.items():
        readers_at.setdefault(upto, []).append(holder)
    node_sum: dict[int, int] = {}
    total = 0
    for index, (start, end, rank) in enumerate(owned):  # forward: what each holder receives
        node_sum[rank // gpn] = node_sum.get(rank // gpn, 0) + end - start
        total += end - start
        for holder in readers_at.get(index, ()):
            same = node_sum.get(holder // gpn, 0)
            recv[holder][0] += same - own[holder]
            recv[holder][1] += total - same
    readers_in_node: dict[int, int] = {}
    readers = 0
    for index in range(len(owned) - 1, -1, -1):  # backward: how many holders read each piece
        for holder in readers_at.get(index, ()):
            readers_in_node[holder // gpn] = readers_in_node.get(holder // gpn, 0) + 1
            readers += 1
        start, end, rank = owned[index]
        same = readers_in_node[rank // gpn] - 1  # the owner reads its own piece
        send[rank][0] += (end - start) * same
        send[rank][1] += (end - start) * (readers - 1 - same)


def _doc_start_src(t: KVTransfer) -> tuple[int, int, int]:
    return (t[2], t[3], t[0])


def kv_transfers(plan: Plan) -> tuple[KVTransfer, ...]:
    """Every forward transfer of ``plan``, sorted by ``(dst, doc, start, src)``, for every mode.

    Returns ``plan.transfers`` when the plan lists them; otherwise derives them from the segments
    (planners do not list them: see :attr:`Plan.transfers`) and remembers them on the plan.
    """
    if plan.transfers is not None:
        return plan.transfers
    transfers = derive_transfers([rp.segments for rp in plan.ranks], plan.comm)
    if plan.comm is not CommMode.ALL_GATHER:  # all-gather lists stay implied: O(N x segments) to keep
        object.__setattr__(plan, "transfers", transfers)
    return transfers
