"""Derive the KV transfers a set of per-rank segments needs under each communication mode."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain, compress
from typing import NamedTuple

import numpy as np

from flashcp_planner.model import CommMode, KVTransfer, Plan, RankColumns, Segment, Segments

_new = tuple.__new__
"""Builds a named-tuple record from a tuple without the keyword constructor (hot loops only)."""

__all__ = [
    "NodeRoutes",
    "derive_transfers",
    "node_dedup_traffic",
    "node_kv_needs",
    "node_routes",
    "rank_kv_needs",
    "kv_transfer_rows",
    "kv_transfers",
    "traffic_of_columns",
    "transfer_rows",
    "transfers_and_traffic",
]


Traffic = list[list[int]]
"""Per rank ``[intra-node, inter-node]`` KV tokens (received, or sent, in forward)."""


def derive_transfers(rank_segments: Sequence[Sequence[Segment]], comm: CommMode) -> tuple[KVTransfer, ...]:
    """Forward KV transfers implied by ``rank_segments`` under ``comm``.

    ``ALL_GATHER`` moves every remote token to every rank; ``SHARDING_AWARE``
    moves every piece of a split document to every other holder of that
    document; ``EXACT_NEED`` moves to rank r only keys ``[0, max end)`` of the
    documents its segments read. Whole documents never move except under
    ``ALL_GATHER``. ``NODE_DEDUP`` delivers the same keys as ``EXACT_NEED`` (these transfers: what
    reaches each rank, from whom), routed through the nodes' stripes (:func:`node_routes`).
    Result sorted by ``(dst, doc, start, src)``.
    """
    return transfers_and_traffic(rank_segments, comm, 1)[0]


def transfer_rows(columns: RankColumns, comm: CommMode) -> np.ndarray:
    """The transfers of :func:`derive_transfers` as rows ``(src, dst, doc, start, end)`` of an int64
    array, in the same order, from columns in array passes (``EXACT_NEED`` and ``SHARDING_AWARE``).

    Holder h of a split document (a rank with pieces of it) reads the document's pieces ``0..need[h]``
    in ``(start, end, rank)`` order; every one it does not hold is a transfer to it. Holders are
    expanded in ``(dst, doc)`` order, so the rows come out sorted.
    """
    assert comm is not CommMode.ALL_GATHER, "all-gather transfers are implied, not listed in arrays"
    split_rows = _split_rows(columns)
    if split_rows is None:
        return np.empty((0, 5), dtype=np.int64)
    rows, rank = split_rows
    pieces = _Pieces.of(columns, rows, rank, 1)
    holder_last = pieces.holder_last()
    if comm in _EXACT:  # up to the holder's own last piece
        need = pieces.index[holder_last]
    else:  # the whole document
        need = (np.append(pieces.doc_first[1:], len(pieces.rows)) - 1 - pieces.doc_first)[pieces.doc[holder_last]]
    by_dst = np.lexsort((pieces.doc[holder_last], pieces.rank[holder_last]))
    holder_last, need = holder_last[by_dst], need[by_dst]
    counts = need + 1
    before = np.cumsum(counts) - counts
    piece = np.arange(int(counts.sum())) + np.repeat(pieces.doc_first[pieces.doc[holder_last]] - before, counts)
    dst = np.repeat(pieces.rank[holder_last], counts)
    src = pieces.rank[piece]
    keep = src != dst
    row = pieces.rows[piece[keep]]
    return np.stack([src[keep], dst[keep], columns.docs[row], columns.starts[row], columns.ends[row]], axis=1)


def _split_rows(columns: RankColumns) -> tuple[np.ndarray, np.ndarray] | None:
    """The rows of every piece of a split document (one with a piece not starting at token 0) and
    their ranks; None when no document is split."""
    docs, later = columns.docs, np.flatnonzero(columns.starts)
    if not len(later):
        return None
    split = np.zeros(int(docs.max()) + 1, dtype=bool)
    split[docs[later]] = True
    rows = np.flatnonzero(split[docs])
    return rows, np.searchsorted(columns.bounds, rows, side="right") - 1


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
        return (tuple(transfers), *_all_gather_traffic(held, gpn))
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
    exact = comm in _EXACT
    by_dst: list[list[KVTransfer]] = [[] for _ in range(n)]
    for doc, owned in owners.items():  # docs ascending, so every dst list ends up sorted by (doc, start)
        owned.sort()
        need, own = _holders(owned, exact)
        for dst, upto in need.items() if list_transfers else ():
            # Pieces are disjoint and cover the document, so every piece before dst's last one lies
            # entirely below dst's need: exact-need transfers never cut a piece.
            by_dst[dst] += [_new(KVTransfer, (src, dst, doc, start, end))
                            for start, end, src in owned[:upto + 1] if src != dst]
        if comm is not CommMode.NODE_DEDUP:
            _doc_traffic(owned, need, own, gpn, recv, send)
    if comm is CommMode.NODE_DEDUP:
        recv, send = node_dedup_traffic(owners, n, gpn)
    return tuple(t for out in by_dst for t in out), recv, send


_EXACT = (CommMode.EXACT_NEED, CommMode.NODE_DEDUP)
"""Modes under which a holder reads its document up to its own last piece."""


def _all_gather_traffic(held: Sequence[int], gpn: int) -> tuple[Traffic, Traffic]:
    """``ALL_GATHER`` traffic in closed form from the tokens every rank holds."""
    n = len(held)
    node_tokens: dict[int, int] = {}
    node_size: dict[int, int] = {}
    for r, tokens in enumerate(held):
        node_tokens[r // gpn] = node_tokens.get(r // gpn, 0) + tokens
        node_size[r // gpn] = node_size.get(r // gpn, 0) + 1
    total = sum(held)
    recv, send = [], []
    for r, tokens in enumerate(held):
        node = r // gpn
        recv.append([node_tokens[node] - tokens, total - node_tokens[node]])
        send.append([tokens * (node_size[node] - 1), tokens * (n - node_size[node])])
    return recv, send


def _holders(owned: list[tuple[int, int, int]], exact: bool) -> tuple[dict[int, int], dict[int, int]]:
    """Per holder of a document's sorted pieces ``(start, end, rank)``: the index of the last piece it
    reads (its own last one under ``EXACT_NEED``, else the document's last), and its tokens."""
    last = len(owned) - 1
    need: dict[int, int] = {}
    own: dict[int, int] = {}
    for index, (start, end, rank) in enumerate(owned):
        need[rank] = index if exact else last
        own[rank] = own.get(rank, 0) + end - start
    return need, own


def traffic_of_columns(columns: RankColumns, comm: CommMode, gpus_per_node: int) -> tuple[Traffic, Traffic]:
    """The ``recv`` and ``send`` of :func:`transfers_and_traffic` (the same integers) from columns.

    A few pieces of split documents are summed piece by piece as there (:func:`_doc_traffic`); many
    in array passes (:meth:`_Pieces.add_traffic`, the closed form of the same sums).
    """
    n = columns.num_ranks
    if comm is CommMode.ALL_GATHER:
        return _all_gather_traffic(columns.tokens(), gpus_per_node)
    recv = [[0, 0] for _ in range(n)]
    send = [[0, 0] for _ in range(n)]
    split_rows = _split_rows(columns)
    if split_rows is None:
        return recv, send
    rows, rank = split_rows
    if len(rows) <= _FEW_PIECES:
        owners = _owners_of_rows(columns, rows, rank)
        if comm is CommMode.NODE_DEDUP:
            return node_dedup_traffic(owners, n, gpus_per_node)
        for owned in owners.values():
            _doc_traffic(owned, *_holders(owned, comm in _EXACT), gpus_per_node, recv, send)
        return recv, send
    pieces = _Pieces.of(columns, rows, rank, gpus_per_node)
    num_nodes = (n - 1) // gpus_per_node + 1
    if pieces.span * num_nodes * pieces.num_docs >= 2**62 or pieces.tokens * n >= 2**62:  # int64 keys, sums
        _, recv, send = transfers_and_traffic(columns.segments(), comm, gpus_per_node, list_transfers=False)
        return recv, send
    if comm is CommMode.NODE_DEDUP:
        return pieces.node_dedup_traffic(n, gpus_per_node)
    recv_send = np.zeros((2, n, 2), dtype=np.int64)
    pieces.add_traffic(recv_send, exact=comm in _EXACT, num_nodes=num_nodes)
    return recv_send[0].tolist(), recv_send[1].tolist()


def _owners_of_rows(columns: RankColumns, rows: np.ndarray, rank: np.ndarray) -> dict[int, list[tuple[int, int, int]]]:
    """The pieces ``(start, end, rank)`` of ``rows`` by document ascending, each in token order."""
    docs, starts, ends = columns.docs[rows], columns.starts[rows], columns.ends[rows]
    order = np.lexsort((rank, ends, starts, docs))
    owners: dict[int, list[tuple[int, int, int]]] = {}
    for doc, start, end, r in zip(docs[order].tolist(), starts[order].tolist(), ends[order].tolist(),
                                  rank[order].tolist(), strict=True):
        owners.setdefault(doc, []).append((start, end, r))
    return owners


_FEW_PIECES = 256
"""Split-document pieces up to which :func:`traffic_of_columns` sums piece by piece (array passes
cost more below)."""


class _Pieces:
    """The pieces of split documents as arrays, by document then ``(start, end, rank)``, as
    :func:`transfers_and_traffic` orders them; ``index`` is a piece's position in its document."""

    def __init__(self, rows: np.ndarray, doc: np.ndarray, length: np.ndarray, rank: np.ndarray, gpn: int) -> None:
        self.rows = rows
        """Every piece's row in the columns it came from."""
        self.rank, self.length, self.node = rank, length, rank // gpn
        first = np.ones(len(doc), dtype=bool)
        first[1:] = doc[1:] != doc[:-1]
        self.doc = np.cumsum(first) - 1  # documents renumbered 0, 1, ...
        self.doc_first = np.flatnonzero(first)
        self.num_docs = len(self.doc_first)
        self.index = np.arange(len(doc)) - self.doc_first[self.doc]
        self.span = int(self.index.max()) + 1  # more than any index
        self.tokens = int(length.sum())

    @classmethod
    def of(cls, columns: RankColumns, rows: np.ndarray, rank: np.ndarray, gpn: int) -> _Pieces:
        """The pieces in ``rows`` of ``columns``, held by ``rank``."""
        doc, start, end = columns.docs[rows], columns.starts[rows], columns.ends[rows]
        order = np.lexsort((rank, end, start, doc))
        return cls(rows[order], doc[order], (end - start)[order], rank[order], gpn)

    def _holders(self) -> tuple[np.ndarray, np.ndarray]:
        """The pieces by holder, a (document, rank) group, then index, and a mask of each group's last."""
        doc, rank = self.doc, self.rank
        by_holder = np.lexsort((self.index, rank, doc))
        last = np.ones(len(doc), dtype=bool)
        last[:-1] = (doc[by_holder][1:] != doc[by_holder][:-1]) | (rank[by_holder][1:] != rank[by_holder][:-1])
        return by_holder, last

    def holder_last(self) -> np.ndarray:
        """Every holder's last piece, by (document, rank)."""
        by_holder, last = self._holders()
        return by_holder[last]

    def add_traffic(self, recv_send: np.ndarray, *, exact: bool, num_nodes: int) -> None:
        """Add every holder's received and every piece's sent tokens to ``recv_send[0 / 1][rank]``."""
        doc, rank, node, length, index = self.doc, self.rank, self.node, self.length, self.index
        # Holders: (document, rank) groups, by (document, rank); each one's last piece and its tokens.
        by_holder, last = self._holders()
        holder_last = by_holder[last]
        own = np.diff(np.concatenate([[0], np.cumsum(length[by_holder])[last]]))
        # Keys read up to each piece: in its document, and in its document on its node.
        upto_doc, _ = _group_sums(length, doc)
        by_node = np.lexsort((index, node, doc))
        upto_node, node_total = np.empty_like(length), np.empty_like(length)
        upto_node[by_node], node_total[by_node] = _group_sums(length[by_node], doc[by_node] * num_nodes + node[by_node])
        if exact:  # the holder reads up to its own last piece, which lies on its own node
            read_at, same = holder_last, upto_node[holder_last]
        else:  # every holder reads its whole document
            read_at, same = (np.append(self.doc_first[1:], len(doc)) - 1)[doc[holder_last]], node_total[holder_last]
        np.add.at(recv_send[0], (rank[holder_last], 0), same - own)
        np.add.at(recv_send[0], (rank[holder_last], 1), upto_doc[read_at] - same)
        self._add_sent(recv_send[1], holder_last, index[read_at], num_nodes)

    def node_dedup_traffic(self, n: int, gpn: int) -> tuple[Traffic, Traffic]:
        """:func:`node_dedup_traffic` in array passes (the same integers), in O(pieces log pieces).

        Holders group by (document, node); group (d, m) reads pieces ``0..top`` and lacks those not
        on m: its part of m's stream, placed after the groups of earlier documents on m. Every
        crossing count is a prefix of the document less the node's own pieces up to an index.
        """
        num_nodes = (n - 1) // gpn + 1
        doc, rank, node, length, index, span = self.doc, self.rank, self.node, self.length, self.index, self.span
        recv, send = np.zeros((n, 2), dtype=np.int64), np.zeros((n, 2), dtype=np.int64)
        by_holder, last = self._holders()
        h_piece = by_holder[last]  # holders by (document, rank), hence by (document, node)
        own = np.diff(np.concatenate([[0], np.cumsum(length[by_holder])[last]]))
        h_rank, h_need, h_node, h_doc = rank[h_piece], index[h_piece], node[h_piece], doc[h_piece]
        h_key = h_doc * num_nodes + h_node
        new_group = np.ones(len(h_key), dtype=bool)
        new_group[1:] = h_key[1:] != h_key[:-1]
        g_first = np.flatnonzero(new_group)
        h_group = np.cumsum(new_group) - 1
        g_top, g_doc, g_node = np.maximum.reduceat(h_need, g_first), h_doc[g_first], h_node[g_first]
        # Tokens of document d held on node m among its pieces 0..i, and those crossing to m.
        piece_key = doc * num_nodes + node
        by_node = np.lexsort((index, piece_key))
        node_keys = (piece_key * span + index)[by_node]
        node_upto, _ = _group_sums(length[by_node], piece_key[by_node])
        doc_upto, _ = _group_sums(length, doc)

        def held(d: np.ndarray, m: np.ndarray, i: np.ndarray) -> np.ndarray:
            at = np.searchsorted(node_keys, (d * num_nodes + m) * span + i, side="right") - 1
            hit = (at >= 0) & (node_keys[np.maximum(at, 0)] // span == d * num_nodes + m)
            return np.where(hit, node_upto[np.maximum(at, 0)], 0)

        def crossing(d: np.ndarray, m: np.ndarray, i: np.ndarray) -> np.ndarray:
            return doc_upto[self.doc_first[d] + i] - held(d, m, i)

        # Stage 1: the streams (groups by node, then document), striped over each node's ranks.
        g_len = crossing(g_doc, g_node, g_top)
        g_order = np.lexsort((g_doc, g_node))
        g_base = np.empty_like(g_len)
        g_base[g_order] = _group_sums(g_len[g_order], g_node[g_order])[0] - g_len[g_order]
        node_total = np.zeros(num_nodes, dtype=np.int64)
        np.add.at(node_total, g_node, g_len)
        node_size = np.minimum(gpn, n - np.arange(num_nodes) * gpn)
        j, total_r, size_r = np.arange(n) % gpn, node_total[np.arange(n) // gpn], node_size[np.arange(n) // gpn]
        recv[:, 1] = total_r * (j + 1) // size_r - total_r * j // size_r
        # Each piece crosses once to every other node whose group reaches it.
        reaching = _count_at_least(g_doc * span + g_top, doc * span + index, doc * span + span)
        reaching_own = _count_at_least((g_doc * num_nodes + g_node) * span + g_top, piece_key * span + index,
                                       piece_key * span + span)
        np.add.at(send[:, 1], rank, length * (reaching - reaching_own))
        # Stage 2: reader h lacks its stream interval [lo, hi) less its own stripe, plus the node's
        # pieces of others it reads; stripe j forwards its overlap with the other readers' intervals.
        lo = g_base[h_group]
        hi = lo + crossing(h_doc, h_node, h_need)
        total_h, size_h = node_total[h_node], node_size[h_node]
        stripes = np.arange(gpn)
        a = total_h[:, None] * stripes // size_h[:, None]
        b = total_h[:, None] * (stripes + 1) // size_h[:, None]
        overlap = np.clip(np.minimum(hi[:, None], b) - np.maximum(lo[:, None], a), 0, None)
        overlap[stripes[None, :] >= size_h[:, None]] = 0
        mine = overlap[np.arange(len(h_rank)), h_rank % gpn]
        np.add.at(recv[:, 0], h_rank, hi - lo - mine + held(h_doc, h_node, h_need) - own)
        forwarded = np.zeros((num_nodes, gpn), dtype=np.int64)
        np.add.at(forwarded, h_node, overlap)
        send[:, 0] += forwarded.ravel()[:n]
        np.add.at(send[:, 0], h_rank, -mine)
        # Direct: a piece goes from its owner to the other readers of its node reaching it.
        readers = _count_at_least(h_key * span + h_need, piece_key * span + index, piece_key * span + span)
        np.add.at(send[:, 0], rank, length * (readers - 1))
        return recv.tolist(), send.tolist()

    def _add_sent(self, send: np.ndarray, holder_last: np.ndarray, need: np.ndarray, num_nodes: int) -> None:
        """Add every piece's sent tokens: its length times its readers other than its owner, the
        holders of its document (on its node, off it) whose ``need`` reaches its index."""
        doc, node, span = self.doc, self.node, self.span
        holder_doc, holder_node = doc[holder_last], node[holder_last]
        readers = _count_at_least(holder_doc * span + need, doc * span + self.index, doc * span + span)
        node_key = (holder_doc * num_nodes + holder_node) * span
        piece_key = (doc * num_nodes + node) * span
        same_readers = _count_at_least(node_key + need, piece_key + self.index, piece_key + span)
        np.add.at(send, (self.rank, 0), self.length * (same_readers - 1))  # the owner reads its own piece
        np.add.at(send, (self.rank, 1), self.length * (readers - same_readers))


def _group_sums(values: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the inclusive running sum of ``values`` within its run of equal ``group`` keys, and
    the run's total (rows grouped already)."""
    total = np.cumsum(values)
    first = np.ones(len(group), dtype=bool)
    first[1:] = group[1:] != group[:-1]
    run = np.cumsum(first) - 1
    before = (total - values)[first]  # running sum before each run
    run_end = np.append(before[1:], total[-1])
    return total - before[run], (run_end - before)[run]


def _count_at_least(keys: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """For every query, how many ``keys`` lie in ``[low, high)``."""
    ordered = np.sort(keys)
    return np.searchsorted(ordered, high) - np.searchsorted(ordered, low)


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


def kv_transfer_rows(plan: Plan) -> np.ndarray:
    """:func:`kv_transfers` as rows ``(src, dst, doc, start, end)`` of an ``(m, 5)`` int64 array.

    For bulk consumers (wire encodings): a plan of many segments that does not list its transfers
    gets them derived in array passes (:func:`transfer_rows`), without a Python record per transfer
    (a plan over many ranks implies hundreds of thousands); those are not remembered on the plan.
    """
    few = sum(len(rp.segments) for rp in plan.ranks) <= _FEW_PIECES
    if few or plan.transfers is not None or plan.comm is CommMode.ALL_GATHER:
        return np.array(kv_transfers(plan), dtype=np.int64).reshape(-1, 5)
    return transfer_rows(RankColumns.of([rp.segments for rp in plan.ranks]), plan.comm)


# ---------------------------------------------------------------- node_dedup: needs, routes, traffic


def rank_kv_needs(rank_segments: Sequence[Sequence[Segment]]) -> list[dict[int, int]]:
    """Per rank, per split document it holds a piece of: the end of the keys it reads, ``[0, end)``.

    Under exact need a holder reads its document up to the end of its own last piece (a document is
    split when one of its pieces does not start at token 0). Whole documents need nothing.
    """
    columns = [Segments.of(segments) for segments in rank_segments]
    split_docs = set(chain.from_iterable(compress(c.docs, c.starts) for c in columns))
    needs: list[dict[int, int]] = []
    for c in columns:
        need: dict[int, int] = {}
        for doc, end in zip(c.docs, c.ends, strict=True):
            if doc in split_docs and end > need.get(doc, 0):
                need[doc] = end
        needs.append(need)
    return needs


def node_kv_needs(rank_needs: Sequence[Mapping[int, int]], gpus_per_node: int) -> list[dict[int, int]]:
    """Per node, per document: the end of the keys its ranks read, the union of their ``[0, end)``.

    ``rank_needs[r]`` maps a document to the end of the keys rank ``r`` reads (:func:`rank_kv_needs`);
    node ``m`` holds ranks ``m * gpus_per_node ..``. Under ``NODE_DEDUP`` the keys of ``[0, end)``
    that node ``m`` does not hold cross the inter-node links once, for the whole node.
    """
    num_nodes = (len(rank_needs) - 1) // gpus_per_node + 1 if rank_needs else 0
    out: list[dict[int, int]] = [{} for _ in range(num_nodes)]
    for rank, need in enumerate(rank_needs):
        node = out[rank // gpus_per_node]
        for doc, end in need.items():
            if end > node.get(doc, 0):
                node[doc] = end
    return out


class NodeRoutes(NamedTuple):
    """The forward KV moves of a ``NODE_DEDUP`` plan, in two stages (backward runs them in reverse).

    Node ``m``'s *stream* is every piece its ranks read but no rank of ``m`` holds, documents
    ascending, pieces in token order; rank ``j`` of the node (its ``j``-th rank) holds *stripe*
    ``[T * j // size, T * (j + 1) // size)`` of the stream (``T`` tokens, ``size`` ranks).
    """

    inter: tuple[KVTransfer, ...]
    """Stage 1, across nodes: every stream token from its owner to its stripe's rank, once per node."""
    intra: tuple[KVTransfer, ...]
    """Stage 2, inside nodes: to every reader, the stream tokens of other stripes it reads (from their
    stripe's rank) and the pieces it reads of other ranks of its node (from their owner)."""


def node_routes(
    rank_segments: Sequence[Sequence[Segment]], gpus_per_node: int,
    rank_needs: Sequence[Mapping[int, int]] | None = None,
) -> NodeRoutes:
    """Both stages of ``NODE_DEDUP`` as transfers, each sorted by ``(dst, doc, start, src)``.

    Every rank ends up with exactly the keys :func:`derive_transfers` delivers to it under
    ``EXACT_NEED``; a token crosses to a node at most once. ``rank_needs``: the per-rank needs of
    :func:`rank_kv_needs` when the caller has them (a plan that states them); the node-level needs
    are their union (:func:`node_kv_needs`).
    """
    owners = _split_owners(rank_segments)
    n, gpn = len(rank_segments), gpus_per_node
    inter: list[KVTransfer] = []
    intra: list[KVTransfer] = []
    needs = rank_kv_needs(rank_segments) if rank_needs is None else rank_needs
    streams, stream_len = _node_streams(owners, n, gpn, needs)
    for node, entries in enumerate(streams):
        first, size, total = node * gpn, min(gpn, n - node * gpn), stream_len[node]
        for doc, owned, base, crossing, readers, _ in entries:
            for index, at in crossing:  # stage 1: each crossing piece, cut at stripe bounds
                start, end, src = owned[index]
                for stripe, lo, hi in _stripes(base + at, base + at + end - start, total, size):
                    offset = start - base - at
                    inter.append(_new(KVTransfer, (src, first + stripe, doc, lo + offset, hi + offset)))
            for reader, upto in readers:  # stage 2: what each reader lacks
                for index in range(upto + 1):
                    start, end, src = owned[index]
                    if src == reader:
                        continue
                    if src // gpn == node:
                        intra.append(_new(KVTransfer, (src, reader, doc, start, end)))
                        continue
                    at = _crossing_at(crossing, index)
                    offset = start - base - at
                    for stripe, lo, hi in _stripes(base + at, base + at + end - start, total, size):
                        if first + stripe != reader:
                            intra.append(_new(KVTransfer, (first + stripe, reader, doc, lo + offset, hi + offset)))
    inter.sort(key=_dst_doc_start_src)
    intra.sort(key=_dst_doc_start_src)
    return NodeRoutes(inter=tuple(inter), intra=tuple(intra))


def _crossing_at(crossing: list[tuple[int, int]], index: int) -> int:
    """Stream offset (within its document's entry) of crossing piece ``index``."""
    return crossing[bisect_left(crossing, (index, -1))][1]


def _dst_doc_start_src(t: KVTransfer) -> tuple[int, int, int, int]:
    return (t[1], t[2], t[3], t[0])


class _NodeEntry(NamedTuple):
    """One document's part of a node's stream."""

    doc: int
    owned: list[tuple[int, int, int]]
    """The document's pieces ``(start, end, rank)`` in token order."""
    base: int
    """Stream offset of the document's first crossing token."""
    crossing: list[tuple[int, int]]
    """``(piece index, offset from base)`` of every piece that crosses to the node, in token order."""
    readers: list[tuple[int, int]]
    """The node's holders of the document: ``(rank, index of the last piece it reads)``."""
    own: dict[int, int]
    """Tokens of the document each holder holds."""


def _split_owners(rank_segments: Sequence[Sequence[Segment]]) -> dict[int, list[tuple[int, int, int]]]:
    """Every split document's pieces ``(start, end, rank)`` in token order, documents ascending."""
    columns = [Segments.of(segments) for segments in rank_segments]
    split_docs = set(chain.from_iterable(compress(c.docs, c.starts) for c in columns))
    owners: dict[int, list[tuple[int, int, int]]] = {doc: [] for doc in sorted(split_docs)}
    for rank, c in enumerate(columns):
        for doc, start, end in zip(c.docs, c.starts, c.ends, strict=True):
            if doc in owners:
                owners[doc].append((start, end, rank))
    for owned in owners.values():
        owned.sort()
    return owners


def _node_streams(
    owners: Mapping[int, list[tuple[int, int, int]]], n: int, gpn: int,
    rank_needs: Sequence[Mapping[int, int]] | None = None,
) -> tuple[list[list[_NodeEntry]], list[int]]:
    """Every node's stream, document by document (see :class:`NodeRoutes`), and its length.

    Readers and their needs come from ``rank_needs`` (:func:`rank_kv_needs`; node tops from
    :func:`node_kv_needs`) when given, else from the pieces (each holder up to its last one).
    """
    num_nodes = (n - 1) // gpn + 1
    streams: list[list[_NodeEntry]] = [[] for _ in range(num_nodes)]
    stream_len = [0] * num_nodes
    needers: dict[int, list[tuple[int, int]]] = {}  # doc -> its (rank, key end) needs
    for rank, need in enumerate(rank_needs or ()):
        for doc, end in need.items():
            needers.setdefault(doc, []).append((rank, end))
    node_needs = node_kv_needs(rank_needs, gpn) if rank_needs is not None else None
    for doc, owned in owners.items():
        need, own = _holders(owned, True)
        ends = [end for _, end, _ in owned]  # a need ends where one of the document's pieces ends
        if node_needs is not None:
            need = {rank: bisect_left(ends, end) for rank, end in needers.get(doc, ())}
        readers: dict[int, list[tuple[int, int]]] = {}
        for rank, upto in need.items():
            readers.setdefault(rank // gpn, []).append((rank, upto))
        for node, node_readers in readers.items():
            if node_needs is None:
                top = max(upto for _, upto in node_readers)
            else:
                top = bisect_left(ends, node_needs[node][doc])
            crossing, at = [], 0
            for index in range(top + 1):
                start, end, src = owned[index]
                if src // gpn != node:
                    crossing.append((index, at))
                    at += end - start
            streams[node].append(_NodeEntry(doc, owned, stream_len[node], crossing, sorted(node_readers), own))
            stream_len[node] += at
    return streams, stream_len


def _stripes(lo: int, hi: int, total: int, size: int) -> Iterator[tuple[int, int, int]]:
    """``(stripe, lo', hi')``: the parts of stream range ``[lo, hi)`` in each stripe it meets."""
    if lo >= hi:
        return
    stripe = (lo * size) // total  # the stripe of lo: largest j with total * j // size <= lo
    while (total * (stripe + 1)) // size <= lo:
        stripe += 1
    while lo < hi:
        bound = min(hi, (total * (stripe + 1)) // size)
        if bound > lo:  # (empty stripes, when total < size, are skipped)
            yield stripe, lo, bound
            lo = bound
        stripe += 1


def node_dedup_traffic(
    owners: Mapping[int, list[tuple[int, int, int]]], n: int, gpus_per_node: int
) -> tuple[Traffic, Traffic]:
    """Per rank ``[intra, inter]`` tokens received and sent in forward under ``NODE_DEDUP``: the
    per-rank sums of :func:`node_routes` (intra = stage 2, inter = stage 1), in closed form.

    ``owners``: every split document's pieces ``(start, end, rank)`` in token order, documents
    ascending. A reader's stream tokens of one document form one stream interval, so what it lacks
    is that interval less its own stripe, and what a stripe forwards is its overlap with the other
    readers' intervals: O(pieces x nodes + readers x stripes met), no per-transfer pass.
    """
    gpn = gpus_per_node
    recv = [[0, 0] for _ in range(n)]
    send = [[0, 0] for _ in range(n)]
    streams, stream_len = _node_streams(owners, n, gpn)
    for node, entries in enumerate(streams):
        first, size, total = node * gpn, min(gpn, n - node * gpn), stream_len[node]
        for stripe, lo, hi in _stripes(0, total, total, size):
            recv[first + stripe][1] += hi - lo
        for _, owned, base, crossing, readers, own in entries:
            ends = []  # stream offset after each crossing piece, by piece index
            for index, at in crossing:
                start, end, src = owned[index]
                send[src][1] += end - start
                ends.append((index, at + end - start))
            top = max(upto for _, upto in readers)
            held, held_upto = 0, []  # tokens of pieces 0..i held on the node
            for start, end, src in owned[:top + 1]:
                if src // gpn == node:
                    held += end - start
                held_upto.append(held)
            reach = [0] * (top + 2)  # readers whose last piece is i; then, summed, readers reaching i
            for reader, upto in readers:
                reach[upto] += 1
                read = ends[bisect_left(ends, (upto + 1, -1)) - 1][1] if ends and ends[0][0] <= upto else 0
                for stripe, lo, hi in _stripes(base, base + read, total, size):
                    if first + stripe != reader:
                        recv[reader][0] += hi - lo
                        send[first + stripe][0] += hi - lo
                # direct: the pieces of other ranks of the node it reads (its own all lie below upto)
                recv[reader][0] += held_upto[upto] - own[reader]
            for index in range(top, -1, -1):
                reach[index] += reach[index + 1]
                start, end, src = owned[index]
                if src // gpn == node:  # its owner is a reader reaching it too
                    send[src][0] += (end - start) * (reach[index] - 1)
    return recv, send
