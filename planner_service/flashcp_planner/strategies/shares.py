"""Per-rank contributions ("shares") of one document placement, and a load state that sums them.

A placement of document d (whole on rank r, head-tail over a group of ranks,
or arbitrary pieces) adds to every rank it touches: query tokens, attention
time, attention time that needs no remote KV (``local``), and KV tokens
received / sent over intra-node and inter-node links. These quantities are
additive over documents, so a rank's predicted time is a function of the sums
and a search can move one document by subtracting its old shares and adding
new ones. :meth:`LoadState.total` is the formula of
:func:`flashcp_planner.cost.rank_costs`; both heuristic and exact solver use
these shares, so they optimise exactly what the evaluator scores.

A share is a tuple ``(rank, tokens, attention_ms, local_ms, recv_intra,
recv_inter, send_intra, send_inter)``; the four traffic fields count KV
*tokens* (bytes = tokens * ``kv_bytes_per_token``).
"""

from __future__ import annotations

from collections.abc import Sequence

from flashcp_planner.cost import CostModel
from flashcp_planner.layout import head_tail_segments, head_tail_sizes
from flashcp_planner.model import CommMode, Segment

__all__ = ["Share", "LoadState", "head_tail_shares", "pieces_shares", "whole_share"]

Share = tuple[int, int, float, float, int, int, int, int]


def whole_share(rank: int, length: int, attention_ms: float) -> tuple[Share, ...]:
    """A document kept whole on ``rank``: all its attention is local, nothing moves."""
    return ((rank, length, attention_ms, attention_ms, 0, 0, 0, 0),)


def pieces_shares(
    pieces: Sequence[tuple[int, Segment]], cost_model: CostModel, comm: CommMode
) -> tuple[Share, ...]:
    """Shares of one document cut into ``pieces`` (``(rank, segment)`` in document order).

    Traffic follows :func:`flashcp_planner.comm.derive_transfers` for
    ``SHARDING_AWARE`` and ``EXACT_NEED``. For ``ALL_GATHER`` the traffic depends
    on the whole layout, not on one document; it is left at zero here and added
    by :class:`LoadState` from the token counts.

    Returns:
        One share per rank holding tokens of the document, in order of first piece.
    """
    gpn = cost_model.gpus_per_node
    acc: dict[int, list] = {}
    prefix: dict[int, int] = {}
    last_index: dict[int, int] = {}
    for index, (rank, seg) in enumerate(pieces):
        ms = cost_model.attention_ms(seg.start, seg.end)
        entry = acc.get(rank)
        if entry is None:
            entry = acc[rank] = [rank, 0, 0.0, 0.0, 0, 0, 0, 0]
            prefix[rank] = 0
        entry[1] += seg.end - seg.start
        entry[2] += ms
        if seg.start == prefix[rank]:  # keys [0, end) all owned by this rank
            prefix[rank] = seg.end
            entry[3] += ms
        last_index[rank] = index
    if len(acc) > 1 and comm is not CommMode.ALL_GATHER:
        if comm is CommMode.SHARDING_AWARE:
            node_tokens: dict[int, int] = {}
            node_holders: dict[int, int] = {}
            for rank, entry in acc.items():
                node = rank // gpn
                node_tokens[node] = node_tokens.get(node, 0) + entry[1]
                node_holders[node] = node_holders.get(node, 0) + 1
            total = sum(node_tokens.values())
            holders = len(acc)
            for rank, entry in acc.items():
                node = rank // gpn
                own = entry[1]
                entry[4] = node_tokens[node] - own
                entry[5] = total - node_tokens[node]
                entry[6] = own * (node_holders[node] - 1)
                entry[7] = own * (holders - node_holders[node])
        else:
            _exact_need_traffic(pieces, acc, last_index, gpn)
    return tuple(tuple(entry) for entry in acc.values())  # type: ignore[misc]


def head_tail_shares(
    doc: int, length: int, first_rank: int, k: int, cost_model: CostModel, comm: CommMode
) -> tuple[Share, ...]:
    """``pieces_shares(head_tail_segments(doc, length, range(first_rank, first_rank + k)), ...)``, the same
    tuples, in O(k) closed form when every one of the 2k chunks is non-empty (``length >= 2k``).

    Position p (rank ``first_rank + p``) owns head chunk p and tail chunk p (piece 2k-1-p). Pieces
    run heads by position, then tails by descending position, so under exact need holder p reads every
    head and the tails of positions q >= p: the head of p has k readers, the tail of p the p + 1
    positions q <= p.
    """
    if length < 2 * k or k < 4:  # (tiny groups: the generic path is as fast)
        return pieces_shares(head_tail_segments(doc, length, range(first_rank, first_rank + k)), cost_model, comm)
    head, tail = head_tail_sizes(doc, length, k)
    bounds = []
    start = 0
    for size in head:
        bounds.append((start, start + size))
        start += size
    tail_bounds = []
    for size in reversed(tail):
        tail_bounds.append((start, start + size))
        start += size
    bounds += reversed(tail_bounds)  # position order
    ms = cost_model.attention_ms_of(bounds)
    head_ms, tail_ms = ms[:k], ms[k:]
    tokens = [h + t for h, t in zip(head, tail, strict=True)]
    gpn = cost_model.gpus_per_node
    node = [(first_rank + p) // gpn for p in range(k)]
    traffic = [(0, 0, 0, 0)] * k
    if comm is CommMode.EXACT_NEED:
        node_heads: dict[int, int] = {}
        node_size: dict[int, int] = {}
        for p in range(k):
            node_heads[node[p]] = node_heads.get(node[p], 0) + head[p]
            node_size[node[p]] = node_size.get(node[p], 0) + 1
        heads_total = sum(head)
        tails_from: list[int] = [0] * (k + 1)  # tails of positions >= p, overall and in p's node
        node_tails_from: list[int] = [0] * k
        running: dict[int, int] = {}
        for p in range(k - 1, -1, -1):
            tails_from[p] = tails_from[p + 1] + tail[p]
            running[node[p]] = running.get(node[p], 0) + tail[p]
            node_tails_from[p] = running[node[p]]
        seen: dict[int, int] = {}  # positions q <= p in p's node
        out = []
        for p in range(k):
            nd = node[p]
            seen[nd] = seen.get(nd, 0) + 1
            same = node_heads[nd] + node_tails_from[p]
            m = node_size[nd]
            out.append((same - tokens[p], heads_total + tails_from[p] - same,
                        head[p] * (m - 1) + tail[p] * (seen[nd] - 1),
                        head[p] * (k - m) + tail[p] * (p + 1 - seen[nd])))
        traffic = out
    elif comm is CommMode.SHARDING_AWARE:
        node_tokens: dict[int, int] = {}
        node_size = {}
        for p in range(k):
            node_tokens[node[p]] = node_tokens.get(node[p], 0) + tokens[p]
            node_size[node[p]] = node_size.get(node[p], 0) + 1
        total = sum(tokens)
        traffic = [(node_tokens[node[p]] - tokens[p], total - node_tokens[node[p]],
                    tokens[p] * (node_size[node[p]] - 1), tokens[p] * (k - node_size[node[p]])) for p in range(k)]
    shares = [(first_rank + p, tokens[p], 0.0 + head_ms[p] + tail_ms[p], 0.0, *traffic[p]) for p in range(k)]
    shares[0] = (*shares[0][:3], 0.0 + head_ms[0], *shares[0][4:])  # only head chunk 0 reads no remote key
    return tuple(shares)  # type: ignore[return-value]


def _exact_need_traffic(
    pieces: Sequence[tuple[int, Segment]], acc: dict[int, list], last_index: dict[int, int], gpn: int
) -> None:
    """Rank j reads keys ``[0, end of its last piece)``: it receives every other piece below that point.

    Pieces are disjoint and in document order, so "below the need of j" is
    "index <= last_index[j]". A forward sweep gives the received tokens per
    node class, a backward sweep counts, for each piece, the holders that read it.
    """
    ends_at: dict[int, list[int]] = {}
    for rank, index in last_index.items():
        ends_at.setdefault(index, []).append(rank)
    node_sum: dict[int, int] = {}
    total = 0
    for index, (rank, seg) in enumerate(pieces):
        node = rank // gpn
        node_sum[node] = node_sum.get(node, 0) + seg.end - seg.start
        total += seg.end - seg.start
        for holder in ends_at.get(index, ()):
            entry = acc[holder]
            same = node_sum.get(holder // gpn, 0)
            entry[4] = same - entry[1]
            entry[5] = total - same
    readers_in_node: dict[int, int] = {}
    readers = 0
    for index in range(len(pieces) - 1, -1, -1):
        for holder in ends_at.get(index, ()):
            node = holder // gpn
            readers_in_node[node] = readers_in_node.get(node, 0) + 1
            readers += 1
        rank, seg = pieces[index]
        size = seg.end - seg.start
        same = readers_in_node.get(rank // gpn, 0) - 1  # the owner reads its own piece
        entry = acc[rank]
        entry[6] += size * same
        entry[7] += size * (readers - 1 - same)


class LoadState:
    """Summed shares of every rank, and the predicted per-rank time they imply.

    Args:
        cost_model: constants of the evaluator.
        cp_size: number of ranks N.
        comm: communication mode the totals are predicted for.
        capacity: per-rank token capacity.
    """

    __slots__ = ("cm", "n", "comm", "tok", "attn", "local", "ri", "rx", "si", "sx", "_lin", "_kv",
                 "_lat_i", "_lat_x", "_bw_i", "_bw_x", "_ov", "_node_tok", "_node_size", "_total_tokens",
                 "capacity", "dirty", "_totals")

    def __init__(self, cost_model: CostModel, cp_size: int, comm: CommMode, capacity: int) -> None:
        self.cm = cost_model
        self.capacity = capacity
        self.n = cp_size
        self.comm = comm
        self.tok = [0] * cp_size
        self.attn = [0.0] * cp_size
        self.local = [0.0] * cp_size
        self.ri = [0] * cp_size
        self.rx = [0] * cp_size
        self.si = [0] * cp_size
        self.sx = [0] * cp_size
        self._lin = cost_model.linear_ms_per_token
        self._kv = cost_model.kv_bytes_per_token
        self._lat_i = cost_model.intra_node_latency_ms
        self._lat_x = cost_model.inter_node_latency_ms
        self._bw_i = cost_model.intra_node_gbps * 1e6
        self._bw_x = cost_model.inter_node_gbps * 1e6
        self._ov = cost_model.overlap_fraction
        gpn = cost_model.gpus_per_node
        num_nodes = (cp_size + gpn - 1) // gpn
        self._node_tok = [0] * num_nodes
        self._node_size = [min(gpn, cp_size - node * gpn) for node in range(num_nodes)]
        self._total_tokens = 0
        self._totals = [0.0] * cp_size
        self.dirty: set[int] = set(range(cp_size))
        """Ranks whose cached :meth:`total` is stale; callers that update the sums directly add to it."""

    def add(self, shares: Sequence[Share], sign: int = 1) -> None:
        """Add (``sign=1``) or remove (``sign=-1``) the shares of one placement."""
        gpn = self.cm.gpus_per_node
        dirty = self.dirty.add
        for r, tok, attn, local, ri, rx, si, sx in shares:
            dirty(r)
            self.tok[r] += sign * tok
            self.attn[r] += sign * attn
            self.local[r] += sign * local
            self.ri[r] += sign * ri
            self.rx[r] += sign * rx
            self.si[r] += sign * si
            self.sx[r] += sign * sx
            self._node_tok[r // gpn] += sign * tok
            self._total_tokens += sign * tok

    def sync_tokens(self) -> None:
        """Recompute the node and total token sums from ``tok``, for callers that updated ``tok`` directly."""
        gpn = self.cm.gpus_per_node
        self._node_tok = [sum(self.tok[node * gpn:(node + 1) * gpn]) for node in range(len(self._node_tok))]
        self._total_tokens = sum(self.tok)

    def time(self, tok: int, attn: float, local: float, ri: int, rx: int, si: int, sx: int, r: int) -> float:
        """Predicted time of rank ``r`` if its sums were these values."""
        if self.comm is CommMode.ALL_GATHER:
            node = r // self.cm.gpus_per_node
            ri = self._node_tok[node] - self.tok[r]
            rx = self._total_tokens - self._node_tok[node]
            si = tok * (self._node_size[node] - 1)
            sx = tok * (self.n - self._node_size[node])
        kv = self._kv
        comm = 0.0
        if ri:
            comm += self._lat_i + ri * kv / self._bw_i
        if rx:
            comm += self._lat_x + rx * kv / self._bw_x
        recv = comm
        comm = 0.0
        if si:
            comm += self._lat_i + si * kv / self._bw_i
        if sx:
            comm += self._lat_x + sx * kv / self._bw_x
        exposed = recv + comm - self._ov * local
        if exposed < 0.0:
            exposed = 0.0
        return tok * self._lin + attn + exposed

    def total(self, r: int) -> float:
        """Predicted time of rank ``r`` now (cached between changes of its sums, except under
        ``ALL_GATHER``, where every rank's traffic depends on every rank's tokens)."""
        if r in self.dirty or self.comm is CommMode.ALL_GATHER:
            self._totals[r] = self.time(self.tok[r], self.attn[r], self.local[r], self.ri[r], self.rx[r],
                                        self.si[r], self.sx[r], r)
            self.dirty.discard(r)
        return self._totals[r]

    def totals(self) -> list[float]:
        """:meth:`total` of every rank (a new list)."""
        stale = range(self.n) if self.comm is CommMode.ALL_GATHER else self.dirty
        for r in stale:
            self._totals[r] = self.time(self.tok[r], self.attn[r], self.local[r], self.ri[r], self.rx[r],
                                        self.si[r], self.sx[r], r)
        self.dirty.clear()
        return list(self._totals)

    def peek(self, remove: Sequence[Share], add: Sequence[Share]) -> tuple[float, bool]:
        """Max new time over the ranks touched by moving a document from ``remove`` to ``add``.

        Returns:
            ``(max time of the touched ranks, whether every touched rank stays within capacity)``.
            Under ``ALL_GATHER`` the coupling through node totals is ignored (search only).
        """
        if not remove:
            worst, _, fits = self._peek_add(add, False, None)
            return worst, fits
        # remove and add are the shares of one placement each (one share per rank): net them per rank,
        # with the same floats as the netting of peek_sum
        removed = {share[0]: share for share in remove}
        worst = 0.0
        fits = True
        capacity, time = self.capacity, self.time
        for r, tok, attn, local, ri, rx, si, sx in add:
            old = removed.pop(r, None)
            if old is not None:
                _, o_tok, o_attn, o_local, o_ri, o_rx, o_si, o_sx = old
                tok -= o_tok
                attn -= o_attn
                local -= o_local
                ri -= o_ri
                rx -= o_rx
                si -= o_si
                sx -= o_sx
            tok += self.tok[r]
            if tok > capacity:
                fits = False
            t = time(tok, self.attn[r] + attn, self.local[r] + local, self.ri[r] + ri, self.rx[r] + rx,
                     self.si[r] + si, self.sx[r] + sx, r)
            if t > worst:
                worst = t
        for r, o_tok, o_attn, o_local, o_ri, o_rx, o_si, o_sx in removed.values():
            t = time(self.tok[r] - o_tok, self.attn[r] - o_attn, self.local[r] - o_local, self.ri[r] - o_ri,
                     self.rx[r] - o_rx, self.si[r] - o_si, self.sx[r] - o_sx, r)
            if t > worst:
                worst = t
        return worst, fits

    def peek_shift(self, r: int, s: int, tokens: int, ms: float) -> tuple[float, bool]:
        """:meth:`peek` of moves between whole documents only: ``tokens`` and ``ms`` of attention (all
        local) leave rank ``r`` for rank ``s`` (one document moved, or the net of a swap); same floats as
        :meth:`peek` on the equivalent shares, without building them."""
        tok_r, tok_s = self.tok[r] - tokens, self.tok[s] + tokens
        fits = tok_r <= self.capacity and tok_s <= self.capacity
        if self.comm is CommMode.ALL_GATHER or self.ri[r] or self.rx[r] or self.si[r] or self.sx[r] \
                or self.ri[s] or self.rx[s] or self.si[s] or self.sx[s]:
            t_r = self.time(tok_r, self.attn[r] - ms, self.local[r] - ms, self.ri[r], self.rx[r], self.si[r],
                            self.sx[r], r)
            t_s = self.time(tok_s, self.attn[s] + ms, self.local[s] + ms, self.ri[s], self.rx[s], self.si[s],
                            self.sx[s], s)
            return (t_r if t_r > t_s else t_s), fits
        # Neither rank moves KV: :meth:`time` reduces to this (same floats: exposed is 0.0 - ov * local).
        ov = self._ov
        exposed = 0.0 - ov * (self.local[r] - ms)
        t_r = tok_r * self._lin + (self.attn[r] - ms) + (exposed if exposed > 0.0 else 0.0)
        exposed = 0.0 - ov * (self.local[s] + ms)
        t_s = tok_s * self._lin + (self.attn[s] + ms) + (exposed if exposed > 0.0 else 0.0)
        return (t_r if t_r > t_s else t_s), fits

    def peek_sum(
        self, remove: Sequence[Share], add: Sequence[Share], *, increase: bool = True,
        totals: Sequence[float] | None = None,
    ) -> tuple[float, float, bool]:
        """Like :meth:`peek`, plus the summed time increase over the touched ranks (middle item; 0 unless
        ``increase``). ``totals``: the current :meth:`totals`, if the caller has them."""
        if not remove:  # one placement's shares: one per rank, no netting needed
            return self._peek_add(add, increase, totals)
        delta: dict[int, list] = {}
        for sign, shares in ((-1, remove), (1, add)):
            for r, tok, attn, local, ri, rx, si, sx in shares:
                d = delta.get(r)
                if d is None:
                    d = delta[r] = [0, 0.0, 0.0, 0, 0, 0, 0]
                d[0] += sign * tok
                d[1] += sign * attn
                d[2] += sign * local
                d[3] += sign * ri
                d[4] += sign * rx
                d[5] += sign * si
                d[6] += sign * sx
        worst = 0.0
        added = 0.0
        fits = True
        for r, d in delta.items():
            tok = self.tok[r] + d[0]
            if tok > self.capacity:
                fits = False
            t = self.time(tok, self.attn[r] + d[1], self.local[r] + d[2], self.ri[r] + d[3], self.rx[r] + d[4],
                          self.si[r] + d[5], self.sx[r] + d[6], r)
            if increase:
                added += t - self.total(r)
            if t > worst:
                worst = t
        return worst, added, fits

    def _peek_add(
        self, add: Sequence[Share], increase: bool, totals: Sequence[float] | None
    ) -> tuple[float, float, bool]:
        worst = 0.0
        added = 0.0
        fits = True
        capacity, time = self.capacity, self.time
        for r, tok, attn, local, ri, rx, si, sx in add:
            tok += self.tok[r]
            if tok > capacity:
                fits = False
            t = time(tok, self.attn[r] + attn, self.local[r] + local, self.ri[r] + ri, self.rx[r] + rx,
                     self.si[r] + si, self.sx[r] + sx, r)
            if increase:
                added += t - (self.total(r) if totals is None else totals[r])
            if t > worst:
                worst = t
        return worst, added, fits
