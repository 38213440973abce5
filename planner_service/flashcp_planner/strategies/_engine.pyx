# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled twin of the FlashCP heuristic's search.

:class:`Engine` and its :class:`Run` execute :meth:`PlacementSearch.greedy`,
:meth:`PlacementSearch.improve` (with :meth:`PlacementSearch._compound` on small instances),
:meth:`PlacementSearch.lpt_may_beat` of :mod:`flashcp_planner.strategies.flashcp` and
:func:`flashcp_planner.strategies.recreate.ruin_recreate` over C arrays, operation for operation: the
same candidates in the same order, the same floating-point expressions in the same association, the
same tie breaks. The Python code stays the reference; tests require identical placements from both
(tests/core/test_engine.py).

Head-tail shares are computed here (in closed form when every chunk is non-empty, piece by piece
otherwise); the shares of fill-cut documents come from the reference (``pieces_shares``), copied once
into :class:`Block` arrays.
Only the search modes ``EXACT_NEED`` and ``SHARDING_AWARE`` exist here (the heuristic searches
``ALL_GATHER`` under ``SHARDING_AWARE``).
"""

from libc.math cimport ceil, fabs, floor, fmax, fmin, log2, sqrt
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memmove

import math
from itertools import combinations

import numpy as np

from flashcp_planner.model import Segment
from flashcp_planner.strategies.shares import pieces_shares

ctypedef long long i64

include "_engine_arrays.pxi"
include "_engine_attention.pxi"


# -- the engine ------------------------------------------------------------------------------------------


cdef class Engine:
    """Greedy, local search and the LPT check of one :class:`PlacementSearch`, over C arrays.

    Args:
        search: the reference search (its documents, cost model, options and cached shares).
        by_cost: the documents by increasing whole cost, ties by index (``sorted((cost, d))``).
    """

    cdef object search
    cdef Py_ssize_t n, num_docs, num_ks
    cdef i64 capacity, kv
    cdef double lin, lat_i, lat_x, bw_i, bw_x, ov
    cdef i64[::1] lengths
    cdef double[::1] whole_ms, whole_cost
    cdef i64[::1] longest_first, lf_pos, by_cost, cost_pos
    cdef i64[::1] ks
    cdef dict blocks
    cdef Block whole_a, whole_b
    cdef readonly list ks_list
    cdef Attention attention
    cdef i64 gpn
    cdef bint exact_need

    def __init__(self, search):
        cm = search.cm
        comm = search.comm.value
        if comm not in ("exact_need", "sharding_aware"):
            raise ValueError(f"the compiled search supports exact_need and sharding_aware, not {comm}")
        self.search = search
        self.attention = Attention(cm)
        self.gpn = cm.gpus_per_node
        self.exact_need = comm == "exact_need"
        self.n = search.n
        self.num_docs = len(search.lengths)
        self.capacity = search.capacity
        self.kv = cm.kv_bytes_per_token
        self.lin = cm.linear_ms_per_token
        self.lat_i = cm.intra_node_latency_ms
        self.lat_x = cm.inter_node_latency_ms
        self.bw_i = cm.intra_node_gbps * 1e6
        self.bw_x = cm.inter_node_gbps * 1e6
        self.ov = cm.overlap_fraction
        self._index_documents(search.lengths)
        self.ks_list = list(search.ks)
        self.ks = np.asarray(self.ks_list, dtype=np.int64)
        self.num_ks = len(self.ks_list)
        assert self.num_ks <= 13, "group sizes of N <= 4096 (_choose keeps 27 candidates)"
        self.blocks = {}
        self.whole_a = Block(1)
        self.whole_b = Block(1)

    cdef int _index_documents(self, tuple lengths) except -1:
        """Per-document arrays: lengths, whole attention and cost, and both orders (PlacementSearch's
        ``length_array``, ``whole_ms_array``, ``whole_cost_array``, ``longest_first_array``)."""
        cdef Py_ssize_t d, num_docs = self.num_docs
        cdef Keyed* keyed = <Keyed*> malloc(2 * max(num_docs, 1) * sizeof(Keyed))
        if keyed == NULL:
            raise MemoryError()
        self.lengths = np.empty(num_docs, dtype=np.int64)
        self.whole_ms = np.empty(num_docs, dtype=np.float64)
        self.whole_cost = np.empty(num_docs, dtype=np.float64)
        self.longest_first = np.empty(num_docs, dtype=np.int64)
        self.lf_pos = np.empty(num_docs, dtype=np.int64)
        self.by_cost = np.empty(num_docs, dtype=np.int64)
        self.cost_pos = np.empty(num_docs, dtype=np.int64)
        try:
            for d in range(num_docs):
                self.lengths[d] = lengths[d]
                assert 0 < self.lengths[d] < 1 << 32, "document lengths are validated to 1 .. 2**31"
                self.whole_ms[d] = self.attention.ms(0, self.lengths[d])
                self.whole_cost[d] = self.whole_ms[d] + self.lengths[d] * self.lin
            _longest_first(&self.lengths[0], &self.longest_first[0], num_docs)
            for d in range(num_docs):
                self.lf_pos[self.longest_first[d]] = d
            if not self._by_cost_from_lengths():
                for d in range(num_docs):
                    keyed[d].key = self.whole_cost[d]
                    keyed[d].idx = d
                _stable_sort(keyed, keyed + num_docs, num_docs)
                for d in range(num_docs):
                    self.by_cost[d] = keyed[d].idx
            for d in range(num_docs):
                self.cost_pos[self.by_cost[d]] = d
        finally:
            free(keyed)
        return 0

    cdef bint _by_cost_from_lengths(self) noexcept:
        """``by_cost`` from the length order when the whole cost strictly increases with the length (it
        does unless the efficiency curve falls): (cost, d) order is then (length, d) order."""
        cdef Py_ssize_t i, j, start, end, out = 0, num_docs = self.num_docs
        for i in range(1, num_docs):
            if (self.lengths[self.longest_first[i]] != self.lengths[self.longest_first[i - 1]]
                    and not self.whole_cost[self.longest_first[i]] < self.whole_cost[self.longest_first[i - 1]]):
                return False
        end = num_docs  # groups of equal length, shortest first, each in index order
        while end > 0:
            start = end - 1
            while start > 0 and self.lengths[self.longest_first[start - 1]] == self.lengths[self.longest_first[end - 1]]:
                start -= 1
            for j in range(start, end):
                self.by_cost[out] = self.longest_first[j]
                out += 1
            end = start
        return True

    @property
    def length_array(self):
        return self.lengths.base

    @property
    def whole_ms_array(self):
        return self.whole_ms.base

    @property
    def whole_cost_array(self):
        return self.whole_cost.base

    @property
    def longest_first_array(self):
        return self.longest_first.base

    # -- shares ------------------------------------------------------------------------------------------

    cdef Block _shares(self, i64 d, i64 g0, i64 k, Block whole):
        """Shares of placement ``(g0, k)`` of ``d`` (k >= 1); whole placements fill ``whole``."""
        if k == 1:
            whole.rank[0] = g0
            whole.tok[0] = self.lengths[d]
            whole.attn[0] = self.whole_ms[d]
            whole.local[0] = self.whole_ms[d]
            whole.ri[0] = 0
            whole.rx[0] = 0
            whole.si[0] = 0
            whole.sx[0] = 0
            return whole
        key = (d, g0, k)
        block = self.blocks.get(key)
        if block is None:
            if self.lengths[d] >= 2 * k:
                block = self._head_tail(d, g0, k)
            else:  # some chunks empty
                block = self._short_head_tail(d, g0, k)
            self.blocks[key] = block
        return <Block> block

    cdef Block _head_tail(self, i64 d, i64 g0, i64 k):
        """:func:`~flashcp_planner.strategies.shares.head_tail_shares` in closed form (length >= 2k: every
        chunk non-empty)."""
        cdef Block b = Block(k)
        cdef i64 length = self.lengths[d]
        cdef i64 base = length // (2 * k), rem = length % (2 * k)
        cdef i64 p, i, start, first_node = g0 // self.gpn, nd, m, same, total = 0, heads_total = 0
        cdef Block template
        cdef i64* head = <i64*> malloc(8 * (k + 1) * sizeof(i64))
        cdef i64* tail = head + (k + 1)
        cdef i64* node = head + 2 * (k + 1)  # node of each position, counted from the group's first node
        cdef i64* per_node = head + 3 * (k + 1)  # exact need: heads per node; sharding aware: tokens per node
        cdef i64* node_size = head + 4 * (k + 1)
        cdef i64* running = head + 5 * (k + 1)  # per node: tails of positions >= p, then positions <= p
        cdef i64* tails_from = head + 6 * (k + 1)  # tails of positions >= p
        cdef i64* node_tails_from = head + 7 * (k + 1)  # the same within p's node
        cdef double* head_ms = <double*> malloc(k * sizeof(double))
        assert k >= 2 and length >= 2 * k
        if head == NULL or head_ms == NULL:
            free(head)
            free(head_ms)
            raise MemoryError()
        try:
            for p in range(k):
                head[p] = base
                tail[p] = base
                node[p] = (g0 + p) // self.gpn - first_node
                per_node[p] = 0
                node_size[p] = 0
                running[p] = 0
            for i in range(rem):
                p = (d + i) % k
                if i < k:
                    head[p] += 1
                else:
                    tail[p] += 1
            if g0 == 0:
                start = 0
                for p in range(k):
                    head_ms[p] = self.attention.ms(start, start + head[p])
                    start += head[p]
                for p in range(k - 1, -1, -1):
                    b.attn[p] = 0.0 + head_ms[p] + self.attention.ms(start, start + tail[p])
                    b.local[p] = 0.0
                    start += tail[p]
                b.local[0] = 0.0 + head_ms[0]  # only head chunk 0 reads no remote key
            else:  # the same chunks as at g0 = 0: only the ranks and the traffic differ
                template = self._shares(d, 0, k, self.whole_b)
                memcpy(b.attn, template.attn, k * sizeof(double))
                memcpy(b.local, template.local, k * sizeof(double))
            for p in range(k):
                b.rank[p] = g0 + p
                b.tok[p] = head[p] + tail[p]
                node_size[node[p]] += 1
            if self.exact_need:
                for p in range(k):
                    per_node[node[p]] += head[p]
                    heads_total += head[p]
                tails_from[k] = 0
                for p in range(k - 1, -1, -1):
                    tails_from[p] = tails_from[p + 1] + tail[p]
                    running[node[p]] += tail[p]
                    node_tails_from[p] = running[node[p]]
                for p in range(k):
                    running[p] = 0
                for p in range(k):
                    nd = node[p]
                    running[nd] += 1
                    same = per_node[nd] + node_tails_from[p]
                    m = node_size[nd]
                    b.ri[p] = same - b.tok[p]
                    b.rx[p] = heads_total + tails_from[p] - same
                    b.si[p] = head[p] * (m - 1) + tail[p] * (running[nd] - 1)
                    b.sx[p] = head[p] * (k - m) + tail[p] * (p + 1 - running[nd])
            else:
                for p in range(k):
                    per_node[node[p]] += b.tok[p]
                    total += b.tok[p]
                for p in range(k):
                    nd = node[p]
                    b.ri[p] = per_node[nd] - b.tok[p]
                    b.rx[p] = total - per_node[nd]
                    b.si[p] = b.tok[p] * (node_size[nd] - 1)
                    b.sx[p] = b.tok[p] * (k - node_size[nd])
        finally:
            free(head)
            free(head_ms)
        return b

    cdef Block _short_head_tail(self, i64 d, i64 g0, i64 k):
        """:func:`~flashcp_planner.strategies.shares.pieces_shares` of the head-tail pieces of a document
        shorter than 2k (empty chunks omitted): one share per rank holding tokens, in order of first piece."""
        cdef i64 length = self.lengths[d], p, i, j, q, m = 0, num_pieces = 0, start = 0, size, node, first_node
        cdef i64 total = 0, readers = 0, same
        cdef double ms
        cdef i64 w = 2 * k + 1  # room for every piece (at most 2k) or position
        cdef i64* head = <i64*> calloc(12 * w, sizeof(i64))
        cdef i64* tail = head + w
        cdef i64* piece_pos = head + 2 * w  # per piece: its position in the group
        cdef i64* piece_start = head + 3 * w
        cdef i64* piece_end = head + 4 * w
        cdef i64* slot = head + 5 * w  # per position: its share index + 1 (0: none yet)
        cdef i64* prefix = head + 6 * w  # per share: keys [0, prefix) held
        cdef i64* last_piece = head + 7 * w  # per share: the index of its last piece
        cdef i64* ending_at = head + 8 * w  # per piece: the share index + 1 whose last piece it is
        cdef i64* node_sum = head + 9 * w  # per node of the group
        cdef i64* node_count = head + 10 * w
        cdef Block b
        if head == NULL:
            raise MemoryError()
        assert length < 2 * k <= 2 * self.n
        try:
            first_node = g0 // self.gpn
            for i in range(length):  # head_tail_sizes with base 0
                p = (d + i) % k
                if i < k:
                    head[p] += 1
                else:
                    tail[p] += 1
            for p in range(k):  # pieces in document order: heads by position, tails by descending position
                if head[p]:
                    piece_pos[num_pieces], piece_start[num_pieces], piece_end[num_pieces] = p, start, start + head[p]
                    start += head[p]
                    num_pieces += 1
            for p in range(k - 1, -1, -1):
                if tail[p]:
                    piece_pos[num_pieces], piece_start[num_pieces], piece_end[num_pieces] = p, start, start + tail[p]
                    start += tail[p]
                    num_pieces += 1
            for i in range(num_pieces):
                if not slot[piece_pos[i]]:
                    m += 1
                    slot[piece_pos[i]] = m
            b = Block(m)
            for j in range(m):
                b.tok[j] = b.ri[j] = b.rx[j] = b.si[j] = b.sx[j] = 0
                b.attn[j] = b.local[j] = 0.0
            for i in range(num_pieces):
                j = slot[piece_pos[i]] - 1
                b.rank[j] = g0 + piece_pos[i]
                ms = self.attention.ms(piece_start[i], piece_end[i])
                b.tok[j] += piece_end[i] - piece_start[i]
                b.attn[j] += ms
                if piece_start[i] == prefix[j]:  # keys [0, end) all held by this rank
                    prefix[j] = piece_end[i]
                    b.local[j] += ms
                last_piece[j] = i
            if m > 1 and self.exact_need:  # shares._exact_need_traffic
                for j in range(m):
                    ending_at[last_piece[j]] = j + 1
                for i in range(num_pieces):
                    node = (g0 + piece_pos[i]) // self.gpn - first_node
                    node_sum[node] += piece_end[i] - piece_start[i]
                    total += piece_end[i] - piece_start[i]
                    if ending_at[i]:
                        j = ending_at[i] - 1
                        same = node_sum[b.rank[j] // self.gpn - first_node]
                        b.ri[j] = same - b.tok[j]
                        b.rx[j] = total - same
                for i in range(num_pieces - 1, -1, -1):  # readers of each piece: holders ending at or after it
                    if ending_at[i]:
                        node_count[b.rank[ending_at[i] - 1] // self.gpn - first_node] += 1
                        readers += 1
                    j = slot[piece_pos[i]] - 1
                    size = piece_end[i] - piece_start[i]
                    same = node_count[(g0 + piece_pos[i]) // self.gpn - first_node] - 1  # the owner reads its own
                    b.si[j] += size * same
                    b.sx[j] += size * (readers - 1 - same)
            elif m > 1:  # sharding aware: every holder receives every other holder's tokens
                for j in range(m):
                    node = b.rank[j] // self.gpn - first_node
                    node_sum[node] += b.tok[j]
                    node_count[node] += 1
                    total += b.tok[j]
                for j in range(m):
                    node = b.rank[j] // self.gpn - first_node
                    b.ri[j] = node_sum[node] - b.tok[j]
                    b.rx[j] = total - node_sum[node]
                    b.si[j] = b.tok[j] * (node_count[node] - 1)
                    b.sx[j] = b.tok[j] * (m - node_count[node])
        finally:
            free(head)
        return b

    def shares(self, i64 d, i64 g0, i64 k):
        """The shares of placement ``(g0, k)`` (k >= 1) of ``d`` as the engine scores them: tuples like
        ``PlacementSearch.shares`` (for tests)."""
        cdef Block b = self._shares(d, g0, k, Block(1))
        return tuple((b.rank[i], b.tok[i], b.attn[i], b.local[i], b.ri[i], b.rx[i], b.si[i], b.sx[i])
                     for i in range(b.m))

    def makespan(self, list placement):
        """``_exact_makespan`` of ``placement`` (no fill pieces) under the searched mode: shares added in
        document order, infinite past capacity."""
        cdef Run run = Run(self)
        cdef Py_ssize_t d, r
        cdef i64 g0, k
        for d in range(self.num_docs):
            g0, k = placement[d]
            run.add(self._shares(d, g0, k, self.whole_a), 1)
        for r in range(self.n):
            if run.tok[r] > self.capacity:
                return math.inf
        return max(run.totals())

    def lpt_may_beat(self, double makespan):
        """:meth:`PlacementSearch.lpt_may_beat`."""
        cdef Heap heap
        cdef Py_ssize_t i, r
        cdef i64 d
        cdef double worst
        cdef i64[::1] tok = np.zeros(self.n, dtype=np.int64)
        _heap_init(&heap, self.n + 1)
        try:
            for r in range(self.n):
                _heap_push(&heap, 0.0, r)
            for i in range(self.num_docs):
                d = self.longest_first[i]
                r = heap.rank[0]
                tok[r] += self.lengths[d]
                if tok[r] > self.capacity:
                    return True
                _heap_replace(&heap, heap.key[0] + self.whole_cost[d], r)
            worst = heap.key[0]
            for i in range(heap.size):
                if heap.key[i] > worst:
                    worst = heap.key[i]
            return worst <= makespan * (1.0 + 1e-9)
        finally:
            _heap_free(&heap)

    def greedy(self, double alpha, double limit, double split_floor):
        """:meth:`PlacementSearch.greedy` with its split limit and split floor (computed there).
        Returns a :class:`Run`."""
        cdef Run run = Run(self)
        cdef Py_ssize_t n = self.n, i, j
        cdef i64 d, r, cand, length, rank
        cdef double t, w
        cdef double lin = self.lin
        cdef i64 capacity = self.capacity
        cdef bint deviated = False, split_any = False
        cdef double[::1] key = np.zeros(n, dtype=np.float64)
        cdef Heap heap, blocked
        cdef Block shares
        _heap_init(&heap, 2 * n + 4)
        _heap_init(&blocked, n + 4)
        try:
            for r in range(n):
                _heap_push(&heap, 0.0, r)
            for i in range(self.num_docs):
                d = self.longest_first[i]
                length = self.lengths[d]
                if heap.size:
                    t = heap.key[0]
                    r = heap.rank[0]
                    if (t == key[r] and run.tok[r] + length <= capacity and self.whole_cost[d] < split_floor
                            and blocked.size == 0):
                        run.place_whole(d, r)
                        key[r] = t + self.whole_cost[d]
                        _heap_replace(&heap, key[r], r)
                        continue
                w = self.whole_ms[d]
                while blocked.size and -blocked.key[0] >= length:
                    r = blocked.rank[0]
                    _heap_pop(&blocked)
                    _heap_push(&heap, key[r], r)
                r = -1
                while heap.size:
                    t = heap.key[0]
                    cand = heap.rank[0]
                    if t != key[cand]:
                        _heap_pop(&heap)
                    elif run.tok[cand] + length <= capacity:
                        r = cand
                        break
                    else:
                        _heap_pop(&heap)
                        _heap_push(&blocked, <double> (run.tok[cand] - capacity), cand)
                if r >= 0 and w + length * lin < split_floor:
                    run.place_whole(d, r)
                    key[r] += w + length * lin
                    _heap_replace(&heap, key[r], r)
                    continue
                choice = self._choose(run, d, r, limit, alpha)
                if choice is None or choice[1] != 1:
                    split_any = True
                    deviated = deviated or r >= 0
                if choice is None:
                    pieces = self._fill_pieces(run, d)
                    run.fills[d] = pieces
                    shares = _block_of(pieces_shares(pieces, self.search.cm, self.search.comm))
                    run.fill_blocks[d] = shares
                    run.g0[d] = 0
                    run.k[d] = 0
                else:
                    shares = self._shares(d, choice[0], choice[1], self.whole_a)
                    run.g0[d] = choice[0]
                    run.k[d] = choice[1]
                run.add(shares, 1)
                for j in range(shares.m):
                    rank = shares.rank[j]
                    if run.k[d] == 1:
                        key[rank] = key[rank] + w + length * lin
                    else:
                        key[rank] = run.total(rank)
                    _heap_push(&heap, key[rank], rank)
        finally:
            _heap_free(&heap)
            _heap_free(&blocked)
        run.deviated = deviated
        run.split = split_any
        run.index_ranks()
        return run

    cdef object _choose(self, Run run, i64 d, i64 r, double limit, double alpha):
        """:meth:`PlacementSearch._choose`: ``(g0, k)`` or None."""
        cdef double t, inc, soonest, relaxed
        cdef bint fits, any_within = False
        cdef Py_ssize_t ki, b, c, count = 0, best = -1, num_blocks
        cdef i64 k
        cdef i64 least[2]
        cdef i64[27] cand_g0, cand_k  # one whole + two groups per size (at most 13 sizes: N <= 4096)
        cdef double[27] cand_t, cand_inc
        cdef double* totals
        if r >= 0:
            t = run.peek_add(self._shares(d, r, 1, self.whole_a), NULL, &inc, &fits)
            if t <= limit or not self.num_ks:
                return (r, 1)
            cand_g0[0], cand_k[0], cand_t[0], cand_inc[0] = r, 1, t, inc
            count = 1
        totals = run.fill_totals()
        for ki in range(self.num_ks):
            k = self.ks[ki]
            num_blocks = _least_blocks(totals, self.n, k, 2, least, NULL)
            for b in range(num_blocks):
                t = run.peek_add(self._shares(d, least[b], k, self.whole_a), totals, &inc, &fits)
                if fits:
                    cand_g0[count], cand_k[count], cand_t[count], cand_inc[count] = least[b], k, t, inc
                    count += 1
        if count == 0:
            return None
        relaxed = limit
        for c in range(count):
            if cand_t[c] <= limit:
                any_within = True
        if not any_within:  # the ideal load is out of reach: relax it around the best achievable time
            soonest = cand_t[0]
            for c in range(1, count):
                if cand_t[c] < soonest:
                    soonest = cand_t[c]
            relaxed = soonest * (alpha if alpha > 1.0 else 1.0)
        for c in range(count):  # the least (increase, time), first on ties
            if cand_t[c] <= relaxed and (best < 0 or cand_inc[c] < cand_inc[best]
                                         or (cand_inc[c] == cand_inc[best] and cand_t[c] < cand_t[best])):
                best = c
        return (cand_g0[best], cand_k[best])

    cdef list _fill_pieces(self, Run run, i64 d):
        """:meth:`PlacementSearch._fill_pieces`."""
        cdef i64 start = 0, end, room, length = self.lengths[d]
        pieces = []
        totals = run.totals()
        for r in sorted(range(self.n), key=lambda x: (totals[x], x)):
            room = self.capacity - run.tok[r]
            if room <= 0:
                continue
            end = min(length, start + room)
            pieces.append((r, Segment(doc=d, start=start, end=end)))
            start = end
            if start == length:
                break
        assert start == length, "total capacity checked by PlanRequest.contexts"
        return pieces


cdef class Sums:
    """Per-rank sums of placed shares and the predicted time they imply (``LoadState``'s formula, for
    the modes the engine searches)."""

    cdef Py_ssize_t n
    cdef i64 capacity, kv
    cdef double lin, lat_i, lat_x, bw_i, bw_x, ov
    cdef i64[::1] tok, ri, rx, si, sx
    cdef double[::1] attn, local

    def __cinit__(self, Engine eng, *args):
        self.n = eng.n
        self.capacity = eng.capacity
        self.kv = eng.kv
        self.lin = eng.lin
        self.lat_i = eng.lat_i
        self.lat_x = eng.lat_x
        self.bw_i = eng.bw_i
        self.bw_x = eng.bw_x
        self.ov = eng.ov
        self.tok = np.zeros(self.n, dtype=np.int64)
        self.ri = np.zeros(self.n, dtype=np.int64)
        self.rx = np.zeros(self.n, dtype=np.int64)
        self.si = np.zeros(self.n, dtype=np.int64)
        self.sx = np.zeros(self.n, dtype=np.int64)
        self.attn = np.zeros(self.n, dtype=np.float64)
        self.local = np.zeros(self.n, dtype=np.float64)

    cdef double time(self, i64 tok, double attn, double local, i64 ri, i64 rx, i64 si, i64 sx) noexcept:
        """:meth:`LoadState.time` (not ALL_GATHER), the same floating-point operations."""
        cdef double comm = 0.0, recv, exposed
        if ri:
            comm += self.lat_i + <double> (ri * self.kv) / self.bw_i
        if rx:
            comm += self.lat_x + <double> (rx * self.kv) / self.bw_x
        recv = comm
        comm = 0.0
        if si:
            comm += self.lat_i + <double> (si * self.kv) / self.bw_i
        if sx:
            comm += self.lat_x + <double> (sx * self.kv) / self.bw_x
        exposed = recv + comm - self.ov * local
        if exposed < 0.0:
            exposed = 0.0
        return tok * self.lin + attn + exposed

    cdef double total(self, i64 r) noexcept:
        """Rank ``r``'s predicted time now."""
        return self.time(self.tok[r], self.attn[r], self.local[r], self.ri[r], self.rx[r], self.si[r], self.sx[r])

    cdef void add(self, Block b, i64 sign) noexcept:
        """Add (``sign`` 1) or remove (-1) the shares of one placement."""
        cdef Py_ssize_t i
        cdef i64 r
        for i in range(b.m):
            r = b.rank[i]
            self.tok[r] += sign * b.tok[i]
            self.attn[r] += sign * b.attn[i]
            self.local[r] += sign * b.local[i]
            self.ri[r] += sign * b.ri[i]
            self.rx[r] += sign * b.rx[i]
            self.si[r] += sign * b.si[i]
            self.sx[r] += sign * b.sx[i]


cdef class Run(Sums):
    """One greedy run refined by :meth:`improve`: per-rank sums, placements and rank membership."""

    cdef Engine eng
    cdef i64[::1] g0, k
    cdef readonly dict fills
    cdef dict fill_blocks
    cdef public bint deviated, split
    cdef IntVec* whole_on  # per rank, cost_pos of its whole documents (the reference's sorted((cost, d)))
    cdef IntVec* split_on  # per rank, lf_pos of the split documents with tokens on it (by (-length, d))
    cdef i64* scratch
    cdef i64* scratch2
    cdef double* totals_buf
    cdef double* block_keys

    def __cinit__(self, Engine eng):
        cdef Py_ssize_t n = eng.n
        self.eng = eng
        self.g0 = np.zeros(eng.num_docs, dtype=np.int64)
        self.k = np.ones(eng.num_docs, dtype=np.int64)
        self.fills = {}
        self.fill_blocks = {}
        self.whole_on = <IntVec*> calloc(n, sizeof(IntVec))  # zeroed: empty vectors, safe to free
        self.split_on = <IntVec*> calloc(n, sizeof(IntVec))
        self.scratch = <i64*> malloc(n * sizeof(i64))
        self.scratch2 = <i64*> malloc(n * sizeof(i64))
        self.totals_buf = <double*> malloc(n * sizeof(double))
        self.block_keys = <double*> malloc(n * sizeof(double))
        if self.whole_on == NULL or self.split_on == NULL or self.scratch == NULL or self.scratch2 == NULL \
                or self.totals_buf == NULL or self.block_keys == NULL:
            raise MemoryError()
        for r in range(n):
            self.scratch[r] = -1

    def __dealloc__(self):
        for r in range(self.n):
            if self.whole_on != NULL:
                free(self.whole_on[r].data)
            if self.split_on != NULL:
                free(self.split_on[r].data)
        free(self.whole_on)
        free(self.split_on)
        free(self.scratch)
        free(self.scratch2)
        free(self.totals_buf)
        free(self.block_keys)

    # -- the reference's _Run / LoadState interface ---------------------------------------------------------

    @property
    def placement(self):
        """Per document ``(first_rank, k)``, as the reference's ``_Run.placement`` (a new list)."""
        cdef Py_ssize_t d
        cdef list whole_on = [(r, 1) for r in range(self.n)]
        cdef list out = [None] * self.eng.num_docs
        for d in range(self.eng.num_docs):
            out[d] = whole_on[self.g0[d]] if self.k[d] == 1 else (self.g0[d], self.k[d])
        return out

    @property
    def state(self):
        return self

    def totals(self):
        """Every rank's predicted time (a new list)."""
        return [self.total(r) for r in range(self.n)]

    # -- sums ---------------------------------------------------------------------------------------------

    cdef double* fill_totals(self) noexcept:
        """Every rank's predicted time, into (and returning) the run's buffer."""
        cdef Py_ssize_t r
        for r in range(self.n):
            self.totals_buf[r] = self.total(r)
        return self.totals_buf

    cdef void place_whole(self, i64 d, i64 r) noexcept:
        """The greedy's fast path: ``d`` whole on ``r`` (``LoadState.add`` inlined there too)."""
        cdef double w = self.eng.whole_ms[d]
        self.tok[r] += self.eng.lengths[d]
        self.attn[r] += w
        self.local[r] += w
        self.g0[d] = r
        self.k[d] = 1

    cdef double peek_add(self, Block b, double* totals, double* added, bint* fits) noexcept:
        """:meth:`LoadState._peek_add` with ``increase``: the max time of the touched ranks; ``added[0]``:
        their summed increase over ``totals`` (NULL: the current times); ``fits[0]``: capacity kept."""
        cdef double worst = 0.0, t
        cdef Py_ssize_t i
        cdef i64 r, tok
        added[0] = 0.0
        fits[0] = True
        for i in range(b.m):
            r = b.rank[i]
            tok = b.tok[i] + self.tok[r]
            if tok > self.eng.capacity:
                fits[0] = False
            t = self.time(tok, self.attn[r] + b.attn[i], self.local[r] + b.local[i], self.ri[r] + b.ri[i],
                          self.rx[r] + b.rx[i], self.si[r] + b.si[i], self.sx[r] + b.sx[i])
            added[0] += t - (self.total(r) if totals == NULL else totals[r])
            if t > worst:
                worst = t
        return worst

    cdef double peek(self, Block remove, Block add, bint* fits) noexcept:
        """:meth:`LoadState.peek`: the max new time of the touched ranks; ``fits[0]``: capacity kept."""
        cdef double worst = 0.0, t, attn, local
        cdef Py_ssize_t i, j
        cdef i64 r, tok, ri, rx, si, sx
        cdef i64* at = self.scratch  # rank -> index in remove, -1 when absent or netted
        fits[0] = True
        for j in range(remove.m):
            at[remove.rank[j]] = j
        for i in range(add.m):
            r = add.rank[i]
            tok, attn, local = add.tok[i], add.attn[i], add.local[i]
            ri, rx, si, sx = add.ri[i], add.rx[i], add.si[i], add.sx[i]
            j = at[r]
            if j >= 0:
                at[r] = -1
                tok -= remove.tok[j]
                attn -= remove.attn[j]
                local -= remove.local[j]
                ri -= remove.ri[j]
                rx -= remove.rx[j]
                si -= remove.si[j]
                sx -= remove.sx[j]
            tok += self.tok[r]
            if tok > self.eng.capacity:
                fits[0] = False
            t = self.time(tok, self.attn[r] + attn, self.local[r] + local, self.ri[r] + ri, self.rx[r] + rx,
                          self.si[r] + si, self.sx[r] + sx)
            if t > worst:
                worst = t
        for j in range(remove.m):
            r = remove.rank[j]
            if at[r] < 0:
                continue
            at[r] = -1
            t = self.time(self.tok[r] - remove.tok[j], self.attn[r] - remove.attn[j],
                          self.local[r] - remove.local[j], self.ri[r] - remove.ri[j], self.rx[r] - remove.rx[j],
                          self.si[r] - remove.si[j], self.sx[r] - remove.sx[j])
            if t > worst:
                worst = t
        return worst

    cdef double peek_shift(self, i64 r, i64 s, i64 tokens, double ms, bint* fits) noexcept:
        """:meth:`LoadState.peek_shift`."""
        cdef i64 tok_r = self.tok[r] - tokens, tok_s = self.tok[s] + tokens
        cdef double t_r, t_s
        fits[0] = tok_r <= self.eng.capacity and tok_s <= self.eng.capacity
        t_r = self.time(tok_r, self.attn[r] - ms, self.local[r] - ms, self.ri[r], self.rx[r], self.si[r], self.sx[r])
        t_s = self.time(tok_s, self.attn[s] + ms, self.local[s] + ms, self.ri[s], self.rx[s], self.si[s], self.sx[s])
        return t_r if t_r > t_s else t_s

    # -- membership ---------------------------------------------------------------------------------------

    cdef Block _block(self, i64 d, Block whole):
        if self.k[d] == 0:
            return <Block> self.fill_blocks[d]
        return self.eng._shares(d, self.g0[d], self.k[d], whole)

    cdef int index_ranks(self) except -1:
        """Build the per-rank membership after the greedy (whole by cost order, split by length order)."""
        cdef Engine e = self.eng
        cdef Py_ssize_t i, j
        cdef i64 d
        cdef Block b
        for i in range(e.num_docs):
            d = e.by_cost[i]
            if self.k[d] == 1:
                _vec_insert_sorted(&self.whole_on[self.g0[d]], i)  # appends: i increases
        for i in range(e.num_docs):
            d = e.longest_first[i]
            if self.k[d] >= 2:
                b = self._block(d, e.whole_a)
                for j in range(b.m):
                    _vec_insert_sorted(&self.split_on[b.rank[j]], i)
        return 0

    cdef int move(self, i64 d, i64 g0, i64 k) except -1:
        """:meth:`PlacementSearch._move`: re-place ``d`` as ``(g0, k)``."""
        cdef Engine e = self.eng
        cdef Block b = self._block(d, e.whole_a)
        cdef Py_ssize_t j
        self.add(b, -1)
        if self.k[d] == 1:
            _vec_remove_sorted(&self.whole_on[self.g0[d]], e.cost_pos[d])
        else:
            for j in range(b.m):
                _vec_remove_sorted(&self.split_on[b.rank[j]], e.lf_pos[d])
        self.g0[d] = g0
        self.k[d] = k
        b = self._block(d, e.whole_a)
        self.add(b, 1)
        if k == 1:
            _vec_insert_sorted(&self.whole_on[g0], e.cost_pos[d])
        else:
            for j in range(b.m):
                _vec_insert_sorted(&self.split_on[b.rank[j]], e.lf_pos[d])
        return 0

    # -- the final search of small instances -------------------------------------------------------------

    def ruin_recreate(self, Py_ssize_t nodes, Py_ssize_t lns_ranks, Py_ssize_t lns_nodes):
        """:func:`flashcp_planner.strategies.recreate.ruin_recreate` on this run (its sums, placements and
        membership updated)."""
        cdef Engine e = self.eng
        cdef Py_ssize_t r, i
        cdef Block b
        placement = self.placement
        touch = [set() for _ in range(self.n)]
        for d in range(e.num_docs):
            b = self._block(d, e.whole_a)
            for i in range(b.m):
                touch[b.rank[i]].add(d)
        _lns(e, self, placement, touch, nodes, lns_ranks, lns_nodes)
        for d, (g0, k) in enumerate(placement):
            self.g0[d] = g0
            self.k[d] = k
        for r in range(self.n):
            self.whole_on[r].size = 0
            self.split_on[r].size = 0
        self.index_ranks()

    # -- phase 2 -------------------------------------------------------------------------------------------

    cdef Py_ssize_t _near(self, IntVec* items, double value) noexcept:
        """Index of the first item whose cost is >= ``value`` (``bisect_left(items, (value, -1))``)."""
        cdef Py_ssize_t lo = 0, hi = items.size, mid
        cdef double[::1] cost = self.eng.whole_cost
        cdef i64[::1] by_cost = self.eng.by_cost
        while lo < hi:
            mid = (lo + hi) >> 1
            if cost[by_cost[items.data[mid]]] < value:
                lo = mid + 1
            else:
                hi = mid
        return lo

    cdef double _best_split(self, i64 d, Block remove, double bound, double* totals, Py_ssize_t tries, i64* g0,
                            i64* k):
        """:meth:`PlacementSearch._best_split` (``tries`` groups per size): the best time below ``bound``
        (``g0[0] = -1`` when none)."""
        cdef Engine e = self.eng
        cdef double best_time = bound, t
        cdef bint fits
        cdef Py_ssize_t ki, b, num_blocks
        cdef i64 size
        cdef i64* least = self.scratch2
        g0[0] = -1
        for ki in range(e.num_ks):
            size = e.ks[ki]
            num_blocks = _least_blocks(totals, self.n, size, tries, least, self.block_keys)
            for b in range(num_blocks):
                t = self.peek(remove, e._shares(d, least[b], size, e.whole_b), &fits)
                if fits and t < best_time:
                    g0[0], k[0], best_time = least[b], size, t
        return best_time

    def improve(self, double stop, bint small, tuple compound):
        """:meth:`PlacementSearch.improve` (``stop``: its imbalance; ``small``: the search's flag;
        ``compound``: :meth:`_compound`'s limits)."""
        cdef Engine e = self.eng
        cdef Py_ssize_t n = self.n, rounds, x, i, lo, hi, a, c, num_pairs, q
        cdef i64 r, s, d, ee, low0, low1, g0, k
        cdef double cur, best_time, gap, half_gap, t, w
        cdef bint fits
        cdef i64 move_d, move_g0, move_k, move_e
        cdef IntVec* here
        cdef IntVec* there
        cdef Pair pairs[64]
        cdef Pair pair
        cdef double[::1] cost = e.whole_cost
        cdef i64[::1] by_cost = e.by_cost
        cdef i64[::1] lengths = e.lengths
        cdef double[::1] whole_ms = e.whole_ms
        cdef Block old
        cdef double* totals
        cdef i64 low[2]
        cdef IntVec* split_here
        cdef Py_ssize_t tries
        for rounds in range(2 * n + 32):
            totals = self.fill_totals()
            r = 0
            cur = totals[0]
            for x in range(1, n):
                if totals[x] > cur:
                    cur, r = totals[x], x
            if cur - math.fsum([totals[x] for x in range(n)]) / n <= stop * cur:
                return
            low0, low1 = -1, -1  # heapq.nsmallest(2, zip(totals, range(n)))
            for x in range(n):
                if low0 < 0 or totals[x] < totals[low0]:
                    low1, low0 = low0, x
                elif low1 < 0 or totals[x] < totals[low1]:
                    low1 = x
            best_time = cur * (1.0 - 1e-9)
            move_d = -1
            move_e = -1
            here = &self.whole_on[r]
            low[0], low[1] = low0, low1
            for x in range(2):
                s = low[x]
                if s < 0 or s == r:
                    continue
                gap = cur - totals[s]
                i = self._near(here, gap / 2)
                lo = i - 2 if i >= 2 else 0
                hi = i + 2 if i + 2 < here.size else here.size
                for a in range(lo, hi):
                    d = by_cost[here.data[a]]
                    t = self.peek_shift(r, s, lengths[d], whole_ms[d], &fits)
                    if fits and t < best_time:
                        best_time, move_d, move_g0, move_k, move_e = t, d, s, 1, -1
            if move_d < 0 and here.size:
                s = low0
                if s != r:
                    there = &self.whole_on[s]
                    half_gap = (cur - totals[s]) / 2
                    num_pairs = 0
                    for a in range(here.size - 16 if here.size > 16 else 0, here.size):
                        d = by_cost[here.data[a]]
                        w = cost[d]
                        i = self._near(there, w - half_gap)
                        lo = i - 2 if i >= 2 else 0
                        hi = i + 2 if i + 2 < there.size else there.size
                        for c in range(lo, hi):
                            ee = by_cost[there.data[c]]
                            if ee == d:
                                continue
                            pair.gap = fabs(w - cost[ee] - half_gap)
                            pair.d = d
                            pair.e = ee
                            q = num_pairs  # insertion sort by (gap, d, e)
                            while q > 0 and _pair_before(pair, pairs[q - 1]):
                                pairs[q] = pairs[q - 1]
                                q -= 1
                            pairs[q] = pair
                            num_pairs += 1
                    for a in range(num_pairs if small or num_pairs < 4 else 4):
                        d, ee = pairs[a].d, pairs[a].e
                        t = self.peek_shift(r, s, lengths[d] - lengths[ee], whole_ms[d] - whole_ms[ee], &fits)
                        if fits and t < best_time:
                            best_time, move_d, move_g0, move_k, move_e = t, d, s, 1, ee
            if move_d >= 0 and not small:
                self.move(move_d, move_g0, move_k)
                if move_e >= 0:
                    self.move(move_e, r, 1)
                continue
            tries = n if small else 2
            for a in range(here.size - 2 if here.size > 2 else 0, here.size):
                d = by_cost[here.data[a]]
                t = self._best_split(d, e._shares(d, r, 1, e.whole_a), best_time, totals, tries, &g0, &k)
                if g0 >= 0:
                    best_time, move_d, move_g0, move_k, move_e = t, d, g0, k, -1
            split_here = &self.split_on[r]
            for a in range(split_here.size if split_here.size < 4 else 4):
                d = e.longest_first[split_here.data[a]]
                old = self._block(d, e.whole_a)
                t = self._best_split(d, old, best_time, totals, tries, &g0, &k)
                if g0 >= 0 and (g0 != self.g0[d] or k != self.k[d]):
                    best_time, move_d, move_g0, move_k, move_e = t, d, g0, k, -1
                for x in range(2):
                    s = low[x]
                    if s < 0:
                        continue
                    t = self.peek(old, e._shares(d, s, 1, e.whole_b), &fits)
                    if fits and t < best_time:
                        best_time, move_d, move_g0, move_k, move_e = t, d, s, 1, -1
            if move_d < 0:
                if small and self._compound(r, cur, compound):
                    continue
                return
            self.move(move_d, move_g0, move_k)
            if move_e >= 0:
                self.move(move_e, r, 1)

    cdef bint _compound(self, i64 r, double cur, tuple limits) except -1:
        """:meth:`PlacementSearch._compound` (``limits``: whole and split documents tried, target ranks,
        most evictions)."""
        cdef Engine e = self.eng
        cdef Py_ssize_t num_whole = limits[0], num_split = limits[1], num_targets = limits[2]
        cdef Py_ssize_t max_evict = limits[3], n = self.n, a, i, j, q, x, num_docs, num_options, num_evicted
        cdef Py_ssize_t num_journal, num_landed
        cdef i64 d, s, g0, k, ev, size, best_s
        cdef double t, best_t
        cdef bint fits, ok
        cdef IntVec* here = &self.whole_on[r]
        cdef Block b
        cdef double* totals
        cdef i64[::1] docs = np.empty(num_whole + num_split, dtype=np.int64)
        cdef i64[::1] lowest = np.empty(n, dtype=np.int64)
        cdef i64[::1] option_g0 = np.empty(n + n * e.num_ks + 1, dtype=np.int64)
        cdef i64[::1] option_k = np.empty(n + n * e.num_ks + 1, dtype=np.int64)
        cdef i64[::1] evicted = np.empty(e.num_docs, dtype=np.int64)
        cdef i64[::1] landed = np.empty(n, dtype=np.int64)
        cdef i64[::1] mark = np.zeros(n, dtype=np.int64)
        cdef i64[::1] journal_d = np.empty(e.num_docs + 1, dtype=np.int64)
        cdef i64[::1] journal_g0 = np.empty(e.num_docs + 1, dtype=np.int64)
        cdef i64[::1] journal_k = np.empty(e.num_docs + 1, dtype=np.int64)
        num_docs = 0
        for a in range(here.size - 1, (here.size - num_whole - 1 if here.size > num_whole else -1), -1):
            docs[num_docs] = e.by_cost[here.data[a]]
            num_docs += 1
        for a in range(self.split_on[r].size if self.split_on[r].size < num_split else num_split):
            docs[num_docs] = e.longest_first[self.split_on[r].data[a]]
            num_docs += 1
        totals = self.fill_totals()
        _ranks_by_time(totals, n, &lowest[0])
        for i in range(num_docs):
            d = docs[i]
            num_options = 0
            for a in range(num_targets if num_targets < n else n):
                if lowest[a] != r or self.k[d] != 1:
                    option_g0[num_options], option_k[num_options] = lowest[a], 1
                    num_options += 1
            for a in range(e.num_ks):
                size = e.ks[a]
                g0 = 0
                while g0 < n:
                    option_g0[num_options], option_k[num_options] = g0, size
                    num_options += 1
                    g0 += size
            for j in range(num_options):
                g0, k = option_g0[j], option_k[j]
                if g0 == self.g0[d] and k == self.k[d]:
                    continue
                b = e._shares(d, g0, k, e.whole_a)
                num_evicted = 0
                for q in range(b.m):
                    landed[q] = b.rank[q]
                    here = &self.whole_on[b.rank[q]]
                    for a in range(here.size):
                        ev = e.by_cost[here.data[a]]
                        if ev != d:
                            evicted[num_evicted] = e.lf_pos[ev]
                            num_evicted += 1
                if num_evicted > max_evict:
                    continue
                _sort_i64(&evicted[0], num_evicted)  # by (-length, doc): longest-first positions
                num_landed = b.m
                journal_d[0], journal_g0[0], journal_k[0] = d, self.g0[d], self.k[d]
                num_journal = 1
                self.move(d, g0, k)
                totals = self.fill_totals()  # (the targets are ranked once, after moving d, as in the reference)
                _target_marks(totals, n, num_targets, &mark[0], self.scratch2)
                for a in range(num_evicted):
                    ev = e.longest_first[evicted[a]]
                    best_s, best_t = self.g0[ev], math.inf
                    for s in range(n):  # its rank and the targets, in rank order
                        if not mark[s] and s != self.g0[ev]:
                            continue
                        t = self.peek(e._shares(ev, self.g0[ev], 1, e.whole_a), e._shares(ev, s, 1, e.whole_b), &ok)
                        if ok and t < best_t:
                            best_s, best_t = s, t
                    if best_s != self.g0[ev]:
                        journal_d[num_journal], journal_g0[num_journal], journal_k[num_journal] = ev, self.g0[ev], 1
                        num_journal += 1
                        self.move(ev, best_s, 1)
                fits = True
                for q in range(num_landed):
                    if self.tok[landed[q]] > e.capacity:
                        fits = False
                if fits:
                    totals = self.fill_totals()
                    t = totals[0]
                    for x in range(1, n):
                        if totals[x] > t:
                            t = totals[x]
                    if t < cur * (1.0 - 1e-9):
                        return True
                for q in range(num_journal - 1, -1, -1):
                    self.move(journal_d[q], journal_g0[q], journal_k[q])
                totals = self.fill_totals()
        return False


include "_engine_recreate.pxi"
