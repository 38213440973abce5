# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled twin of the FlashCP heuristic's search.

:class:`Engine` and its :class:`Run` execute :meth:`PlacementSearch.greedy`,
:meth:`PlacementSearch.improve` (with :meth:`PlacementSearch._compound` on small instances),
:meth:`PlacementSearch.lpt_may_beat` of :mod:`flashcp_planner.strategies.flashcp` and
:func:`flashcp_planner.strategies.recreate.ruin_recreate` over C arrays, operation for operation: the
same candidates in the same order, the same floating-point expressions in the same association, the
same tie breaks. The Python code stays the reference; tests require identical placements from both
(tests/core/test_engine.py).

Head-tail shares are computed here in closed form (groups of k >= 4 with every chunk non-empty), the
others taken from the reference (``PlacementSearch.shares``) and copied once into :class:`Block` arrays.
Only the search modes ``EXACT_NEED`` and ``SHARDING_AWARE`` exist here (the heuristic searches
``ALL_GATHER`` under ``SHARDING_AWARE``).
"""

from libc.math cimport ceil, fabs, floor, fmax, fmin, log2, sqrt
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove

import math
from itertools import combinations

import numpy as np

from flashcp_planner.model import Segment
from flashcp_planner.strategies.shares import pieces_shares

ctypedef long long i64

# -- small containers ----------------------------------------------------------------------------------


# Growable binary min-heap of ``(key, rank)`` pairs, ordered as Python orders the tuples.
cdef struct Heap:
    double* key
    i64* rank
    Py_ssize_t size
    Py_ssize_t cap


cdef int _heap_init(Heap* h, Py_ssize_t cap) except -1:
    h.size = 0
    h.cap = cap
    h.key = <double*> malloc(cap * sizeof(double))
    h.rank = <i64*> malloc(cap * sizeof(i64))
    if h.key == NULL or h.rank == NULL:
        raise MemoryError()
    return 0


cdef void _heap_free(Heap* h) noexcept:
    free(h.key)
    free(h.rank)
    h.key = NULL
    h.rank = NULL


cdef inline bint _before(double ka, i64 ra, double kb, i64 rb) noexcept nogil:
    return ka < kb or (ka == kb and ra < rb)


cdef void _heap_sift_up(Heap* h, Py_ssize_t i) noexcept nogil:
    cdef double k = h.key[i]
    cdef i64 r = h.rank[i]
    cdef Py_ssize_t parent
    while i > 0:
        parent = (i - 1) >> 1
        if not _before(k, r, h.key[parent], h.rank[parent]):
            break
        h.key[i] = h.key[parent]
        h.rank[i] = h.rank[parent]
        i = parent
    h.key[i] = k
    h.rank[i] = r


cdef void _heap_sift_down(Heap* h, Py_ssize_t i) noexcept nogil:
    cdef double k = h.key[i]
    cdef i64 r = h.rank[i]
    cdef Py_ssize_t child
    while True:
        child = 2 * i + 1
        if child >= h.size:
            break
        if child + 1 < h.size and _before(h.key[child + 1], h.rank[child + 1], h.key[child], h.rank[child]):
            child += 1
        if not _before(h.key[child], h.rank[child], k, r):
            break
        h.key[i] = h.key[child]
        h.rank[i] = h.rank[child]
        i = child
    h.key[i] = k
    h.rank[i] = r


cdef int _heap_push(Heap* h, double k, i64 r) except -1:
    if h.size == h.cap:
        h.cap = 2 * h.cap + 4
        h.key = <double*> realloc(h.key, h.cap * sizeof(double))
        h.rank = <i64*> realloc(h.rank, h.cap * sizeof(i64))
        if h.key == NULL or h.rank == NULL:
            raise MemoryError()
    h.key[h.size] = k
    h.rank[h.size] = r
    h.size += 1
    _heap_sift_up(h, h.size - 1)
    return 0


cdef void _heap_pop(Heap* h) noexcept nogil:
    h.size -= 1
    if h.size > 0:
        h.key[0] = h.key[h.size]
        h.rank[0] = h.rank[h.size]
        _heap_sift_down(h, 0)


cdef void _heap_replace(Heap* h, double k, i64 r) noexcept nogil:
    h.key[0] = k
    h.rank[0] = r
    _heap_sift_down(h, 0)


# Growable sorted array of int64.
cdef struct IntVec:
    i64* data
    Py_ssize_t size
    Py_ssize_t cap


cdef int _vec_insert_sorted(IntVec* v, i64 x) except -1:
    cdef Py_ssize_t lo = 0, hi = v.size, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if v.data[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    if v.size == v.cap:
        v.cap = v.cap * 2 + 4
        v.data = <i64*> realloc(v.data, v.cap * sizeof(i64))
        if v.data == NULL:
            raise MemoryError()
    memmove(&v.data[lo + 1], &v.data[lo], (v.size - lo) * sizeof(i64))
    v.data[lo] = x
    v.size += 1
    return 0


cdef void _vec_remove_sorted(IntVec* v, i64 x) noexcept nogil:
    cdef Py_ssize_t lo = 0, hi = v.size, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if v.data[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    if lo < v.size and v.data[lo] == x:
        memmove(&v.data[lo], &v.data[lo + 1], (v.size - lo - 1) * sizeof(i64))
        v.size -= 1


cdef class Block:
    """The shares of one placement (``flashcp_planner.strategies.shares.Share`` tuples) as columns."""

    cdef Py_ssize_t m
    cdef i64* rank
    cdef i64* tok
    cdef double* attn
    cdef double* local
    cdef i64* ri
    cdef i64* rx
    cdef i64* si
    cdef i64* sx

    def __cinit__(self, Py_ssize_t m):
        self.m = m
        self.rank = <i64*> malloc(6 * max(m, 1) * sizeof(i64))
        self.attn = <double*> malloc(2 * max(m, 1) * sizeof(double))
        if self.rank == NULL or self.attn == NULL:
            raise MemoryError()
        self.tok = self.rank + m
        self.ri = self.rank + 2 * m
        self.rx = self.rank + 3 * m
        self.si = self.rank + 4 * m
        self.sx = self.rank + 5 * m
        self.local = self.attn + m

    def __dealloc__(self):
        free(self.rank)
        free(self.attn)


cdef Block _block_of(tuple shares):
    cdef Py_ssize_t i, m = len(shares)
    cdef Block b = Block(m)
    for i in range(m):
        share = shares[i]
        b.rank[i] = share[0]
        b.tok[i] = share[1]
        b.attn[i] = share[2]
        b.local[i] = share[3]
        b.ri[i] = share[4]
        b.rx[i] = share[5]
        b.si[i] = share[6]
        b.sx[i] = share[7]
    return b


cdef Py_ssize_t _least_blocks(double* totals, Py_ssize_t n, i64 k, Py_ssize_t tries, i64* out) noexcept:
    """The first ranks of the (up to) ``tries`` aligned blocks of k ranks whose slowest rank is soonest, as
    ``sorted((max(totals[g0:g0 + k]), g0) for g0 in range(0, n, k))[:tries]``; returns how many. ``out``
    holds n entries."""
    cdef Py_ssize_t g0 = -k, x, q, count = 0
    cdef double worst
    cdef double* key = <double*> malloc(n * sizeof(double)) if tries > 2 else NULL
    cdef double first = 0.0, second = 0.0
    while g0 + k < n:
        g0 += k
        worst = totals[g0]
        for x in range(g0 + 1, g0 + k if g0 + k < n else n):
            if totals[x] > worst:
                worst = totals[x]
        if key != NULL:  # insertion sort of every block (small instances)
            q = count
            while q > 0 and worst < key[q - 1]:
                key[q] = key[q - 1]
                out[q] = out[q - 1]
                q -= 1
            key[q] = worst
            out[q] = g0
            count += 1
        elif count == 0 or worst < first:
            if count:
                out[1], second = out[0], first
            out[0], first = g0, worst
            count = count + 1 if count < 2 else 2
        elif count == 1 or worst < second:
            out[1], second = g0, worst
            count = 2
    free(key)
    return count if count < tries else tries


cdef void _ranks_by_time(double* totals, Py_ssize_t n, i64* out) noexcept:
    """Ranks by (time, rank): ``sorted(range(n), key=lambda x: (totals[x], x))``."""
    cdef Py_ssize_t x, q
    for x in range(n):
        q = x
        while q > 0 and totals[x] < totals[out[q - 1]]:
            out[q] = out[q - 1]
            q -= 1
        out[q] = x


cdef void _target_marks(double* totals, Py_ssize_t n, Py_ssize_t count, i64* mark, i64 current, i64* scratch) noexcept:
    """Mark ``{current, *the count least-loaded ranks}`` (ties by rank) in ``mark`` (n entries)."""
    cdef Py_ssize_t x
    _ranks_by_time(totals, n, scratch)
    for x in range(n):
        mark[x] = 0
    mark[current] = 1
    for x in range(count if count < n else n):
        mark[scratch[x]] = 1


cdef void _sort_i64(i64* a, Py_ssize_t n) noexcept:
    """Ascending insertion sort (short arrays)."""
    cdef Py_ssize_t i, q
    cdef i64 v
    for i in range(1, n):
        v = a[i]
        q = i
        while q > 0 and v < a[q - 1]:
            a[q] = a[q - 1]
            q -= 1
        a[q] = v


cdef struct Keyed:
    double key
    i64 idx


cdef void _stable_sort(Keyed* a, Keyed* tmp, Py_ssize_t n) noexcept:
    """Sort ``a`` by key, keeping the order of equal keys (bottom-up merge sort; ``tmp``: n scratch)."""
    cdef Py_ssize_t width = 1, lo, mid, hi, i, j, k
    cdef Keyed* src = a
    cdef Keyed* dst = tmp
    cdef Keyed* swap
    while width < n:
        lo = 0
        while lo < n:
            mid = lo + width if lo + width < n else n
            hi = lo + 2 * width if lo + 2 * width < n else n
            i, j, k = lo, mid, lo
            while i < mid and j < hi:
                if src[j].key < src[i].key:
                    dst[k] = src[j]
                    j += 1
                else:
                    dst[k] = src[i]
                    i += 1
                k += 1
            while i < mid:
                dst[k] = src[i]
                i += 1
                k += 1
            while j < hi:
                dst[k] = src[j]
                j += 1
                k += 1
            lo = hi
        swap = src
        src = dst
        dst = swap
        width *= 2
    if src != a:
        for i in range(n):
            a[i] = src[i]


cdef int _longest_first(i64* lengths, i64* order, Py_ssize_t n) except -1:
    """Documents by decreasing length, ties by index (a stable LSD radix sort: lengths < 2**32)."""
    cdef i64* tmp = <i64*> malloc(max(n, 1) * sizeof(i64))
    cdef Py_ssize_t counts[257]
    cdef Py_ssize_t i, b, shift
    cdef i64 top = 0xFFFFFFFF
    cdef i64* src = order
    cdef i64* dst = tmp
    cdef i64* swap
    if tmp == NULL:
        raise MemoryError()
    for i in range(n):
        order[i] = i
    for shift in range(0, 32, 8):
        for b in range(257):
            counts[b] = 0
        for i in range(n):
            counts[((top - lengths[src[i]]) >> shift & 0xFF) + 1] += 1
        for b in range(256):
            counts[b + 1] += counts[b]
        for i in range(n):
            b = (top - lengths[src[i]]) >> shift & 0xFF
            dst[counts[b]] = src[i]
            counts[b] += 1
        swap = src
        src = dst
        dst = swap
    free(tmp)  # four passes: the result is back in ``order``
    return 0


cdef struct Pair:
    double gap
    i64 d
    i64 e


cdef inline bint _pair_before(Pair a, Pair b) noexcept nogil:
    return a.gap < b.gap or (a.gap == b.gap and (a.d < b.d or (a.d == b.d and a.e < b.e)))


# -- the cost model's attention time -------------------------------------------------------------------


cdef class Attention:
    """:meth:`CostModel.attention_ms_of` in C: the same floating-point operations, so the same floats."""

    cdef double[::1] lq, ev
    cdef Py_ssize_t points
    cdef double heads, head_dim, rate, overhead, bwd

    def __init__(self, cost_model):
        self.lq = np.asarray(cost_model._eff_log_q, dtype=np.float64)
        self.ev = np.asarray(cost_model._eff_val, dtype=np.float64)
        self.points = len(cost_model._eff_val)
        self.heads = cost_model.num_heads
        self.head_dim = cost_model.head_dim
        self.rate = cost_model.attention_tflops * 1e9
        self.overhead = cost_model.attention_segment_overhead_ms
        self.bwd = 1.0 + cost_model.attention_backward_ratio

    cdef double ms(self, i64 start, i64 end) noexcept:
        """Attention of queries ``[start, end)`` (ends up to 2**31: the pair counts stay in int64)."""
        cdef i64 pairs = (end * (end + 1) - start * (start + 1)) // 2
        cdef i64 q = _isqrt(2 * pairs)
        cdef double x = log2(<double> q) if q > 1 else 0.0
        cdef double eff
        cdef Py_ssize_t lo, hi, mid
        if x <= self.lq[0]:
            eff = self.ev[0]
        elif x >= self.lq[self.points - 1]:
            eff = self.ev[self.points - 1]
        else:
            lo, hi = 0, self.points  # bisect_right(lq, x)
            while lo < hi:
                mid = (lo + hi) >> 1
                if x < self.lq[mid]:
                    hi = mid
                else:
                    lo = mid + 1
            eff = self.ev[lo - 1] + (x - self.lq[lo - 1]) / (self.lq[lo] - self.lq[lo - 1]) * (self.ev[lo] - self.ev[lo - 1])
        return (self.overhead + 4.0 * <double> pairs * self.heads * self.head_dim / (self.rate * eff)) * self.bwd

    def whole_ms(self, i64[::1] lengths):
        """``[attention_ms(0, length) for length in lengths]`` as a float64 array."""
        cdef Py_ssize_t i
        out = np.empty(lengths.shape[0], dtype=np.float64)
        cdef double[::1] view = out
        for i in range(lengths.shape[0]):
            view[i] = self.ms(0, lengths[i])
        return out


    def per_doc_lower_bound(self, i64[::1] lengths, i64 n, double linear_ms_per_token):
        """The bound of ``flashcp.per_doc_lower_bound`` in one pass (sums in another order: the caller's
        relative margin covers the difference)."""
        cdef Py_ssize_t i, j
        cdef double length, longest, x, eff, reached, attention = 0.0, tokens = 0.0
        for i in range(lengths.shape[0]):
            length = <double> lengths[i]
            longest = ceil(length / (2 * n))
            x = log2(fmax(floor(sqrt(2.0 * longest * length)), 1.0))
            reached = 0.0  # the best efficiency of the curve points at or below x
            for j in range(self.points):
                if self.lq[j] <= x and self.ev[j] > reached:
                    reached = self.ev[j]
            if x <= self.lq[0]:
                eff = self.ev[0]
            elif x >= self.lq[self.points - 1]:
                eff = self.ev[self.points - 1]
            else:
                j = 1
                while self.lq[j] < x:
                    j += 1
                eff = self.ev[j - 1] + (x - self.lq[j - 1]) * (self.ev[j] - self.ev[j - 1]) / (self.lq[j] - self.lq[j - 1])
            attention += (fmin(length, 2.0 * n) * self.overhead
                          + 4.0 * self.heads * self.head_dim * (length * (length + 1) / 2) / (self.rate * fmax(eff, reached)))
            tokens += length
        return (attention * self.bwd + tokens * linear_ms_per_token) / n


cdef inline i64 _isqrt(i64 value) noexcept:
    """``math.isqrt`` for 0 <= value < 2**63."""
    cdef unsigned long long r = <unsigned long long> sqrt(<double> value)
    cdef unsigned long long v = <unsigned long long> value
    while r * r > v:
        r -= 1
    while (r + 1) * (r + 1) <= v:
        r += 1
    return <i64> r


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
            if k >= 4 and self.lengths[d] >= 2 * k:
                block = self._head_tail(d, g0, k)
            else:  # tiny groups or chunks: the reference's generic path
                block = _block_of(self.search.shares(d, g0, k))
            self.blocks[key] = block
        return <Block> block

    cdef Block _head_tail(self, i64 d, i64 g0, i64 k):
        """:func:`~flashcp_planner.strategies.shares.head_tail_shares`, closed form (k >= 4, length >= 2k)."""
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
        assert k >= 4 and length >= 2 * k
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
            num_blocks = _least_blocks(totals, self.n, k, 2, least)
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


cdef class Run:
    """One greedy run refined by :meth:`improve`: per-rank sums, placements and rank membership."""

    cdef Engine eng
    cdef Py_ssize_t n
    cdef i64[::1] tok, ri, rx, si, sx
    cdef double[::1] attn, local
    cdef i64[::1] g0, k
    cdef readonly dict fills
    cdef dict fill_blocks
    cdef public bint deviated, split
    cdef IntVec* whole_on  # per rank, cost_pos of its whole documents (the reference's sorted((cost, d)))
    cdef IntVec* split_on  # per rank, lf_pos of the split documents with tokens on it (by (-length, d))
    cdef i64* scratch
    cdef i64* scratch2
    cdef double* totals_buf

    def __cinit__(self, Engine eng):
        cdef Py_ssize_t n = eng.n
        self.eng = eng
        self.n = n
        self.tok = np.zeros(n, dtype=np.int64)
        self.ri = np.zeros(n, dtype=np.int64)
        self.rx = np.zeros(n, dtype=np.int64)
        self.si = np.zeros(n, dtype=np.int64)
        self.sx = np.zeros(n, dtype=np.int64)
        self.attn = np.zeros(n, dtype=np.float64)
        self.local = np.zeros(n, dtype=np.float64)
        self.g0 = np.zeros(eng.num_docs, dtype=np.int64)
        self.k = np.ones(eng.num_docs, dtype=np.int64)
        self.fills = {}
        self.fill_blocks = {}
        self.whole_on = <IntVec*> malloc(n * sizeof(IntVec))
        self.split_on = <IntVec*> malloc(n * sizeof(IntVec))
        self.scratch = <i64*> malloc(n * sizeof(i64))
        self.scratch2 = <i64*> malloc(n * sizeof(i64))
        self.totals_buf = <double*> malloc(n * sizeof(double))
        if self.whole_on == NULL or self.split_on == NULL or self.scratch == NULL or self.scratch2 == NULL \
                or self.totals_buf == NULL:
            raise MemoryError()
        for r in range(n):
            self.whole_on[r].data = NULL
            self.whole_on[r].size = self.whole_on[r].cap = 0
            self.split_on[r].data = NULL
            self.split_on[r].size = self.split_on[r].cap = 0
            self.scratch[r] = -1

    def __dealloc__(self):
        if self.whole_on != NULL:
            for r in range(self.n):
                free(self.whole_on[r].data)
                free(self.split_on[r].data)
        free(self.whole_on)
        free(self.split_on)
        free(self.scratch)
        free(self.scratch2)
        free(self.totals_buf)

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

    cdef double time(self, i64 tok, double attn, double local, i64 ri, i64 rx, i64 si, i64 sx) noexcept:
        """:meth:`LoadState.time` (not ALL_GATHER), the same floating-point operations."""
        cdef Engine e = self.eng
        cdef double comm = 0.0, recv, exposed
        if ri:
            comm += e.lat_i + <double> (ri * e.kv) / e.bw_i
        if rx:
            comm += e.lat_x + <double> (rx * e.kv) / e.bw_x
        recv = comm
        comm = 0.0
        if si:
            comm += e.lat_i + <double> (si * e.kv) / e.bw_i
        if sx:
            comm += e.lat_x + <double> (sx * e.kv) / e.bw_x
        exposed = recv + comm - e.ov * local
        if exposed < 0.0:
            exposed = 0.0
        return tok * e.lin + attn + exposed

    cdef double* fill_totals(self) noexcept:
        """Every rank's predicted time, into (and returning) the run's buffer."""
        cdef Py_ssize_t r
        for r in range(self.n):
            self.totals_buf[r] = self.total(r)
        return self.totals_buf

    cdef double total(self, i64 r) noexcept:
        return self.time(self.tok[r], self.attn[r], self.local[r], self.ri[r], self.rx[r], self.si[r], self.sx[r])

    cdef void add(self, Block b, i64 sign) noexcept:
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
        cdef _Sums sums = _Sums.__new__(_Sums)
        sums.init_from(e, self)
        placement = self.placement
        touch = [set() for _ in range(self.n)]
        for d, (g0, k) in enumerate(placement):
            b = self._block(d, e.whole_a)
            for i in range(b.m):
                touch[b.rank[i]].add(d)
        _lns(e, sums, placement, touch, nodes, lns_ranks, lns_nodes)
        self.tok[:] = sums.tok
        self.attn[:] = sums.attn
        self.local[:] = sums.local
        self.ri[:] = sums.ri
        self.rx[:] = sums.rx
        self.si[:] = sums.si
        self.sx[:] = sums.sx
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
            num_blocks = _least_blocks(totals, self.n, size, tries, least)
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
        cdef i64 r, s, d, dd, ee, low0, low1, g0, k
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
        cdef Block old, b
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
                totals = self.fill_totals()
                for a in range(num_evicted):
                    ev = e.longest_first[evicted[a]]
                    best_s, best_t = self.g0[ev], math.inf
                    _target_marks(totals, n, num_targets, &mark[0], self.g0[ev], self.scratch2)
                    for s in range(n):
                        if not mark[s]:
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


# -- the small-instance ruin-and-recreate search ------------------------------------------------------------


cdef struct Candidate:
    double key
    double inc
    i64 g0
    i64 k
    double work
    Py_ssize_t option  # index in the document's split table; -1: whole on g0


cdef inline bint _candidate_before(Candidate* a, Candidate* b) noexcept:
    """Python's order of the reference's ``(key, inc, (g0, k), work)`` tuples."""
    if a.key != b.key:
        return a.key < b.key
    if a.inc != b.inc:
        return a.inc < b.inc
    if a.g0 != b.g0:
        return a.g0 < b.g0
    if a.k != b.k:
        return a.k < b.k
    return a.work < b.work


cdef class _Sums:
    """A copy of a run's per-rank sums, and the time formula (``LoadState.time``, not ALL_GATHER)."""

    cdef Py_ssize_t n
    cdef i64 capacity, kv
    cdef double lin, lat_i, lat_x, bw_i, bw_x, ov
    cdef i64[::1] tok, ri, rx, si, sx
    cdef double[::1] attn, local

    cdef void init_from(self, Engine e, Run run) noexcept:
        """A copy of an engine run's sums."""
        self.n = run.n
        self.capacity = e.capacity
        self.kv = e.kv
        self.lin = e.lin
        self.lat_i = e.lat_i
        self.lat_x = e.lat_x
        self.bw_i = e.bw_i
        self.bw_x = e.bw_x
        self.ov = e.ov
        self.tok = np.array(run.tok)
        self.attn = np.array(run.attn)
        self.local = np.array(run.local)
        self.ri = np.array(run.ri)
        self.rx = np.array(run.rx)
        self.si = np.array(run.si)
        self.sx = np.array(run.sx)

    cdef double time(self, i64 tok, double attn, double local, i64 ri, i64 rx, i64 si, i64 sx) noexcept:
        """:meth:`LoadState.time` (not ALL_GATHER)."""
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
        return self.time(self.tok[r], self.attn[r], self.local[r], self.ri[r], self.rx[r], self.si[r], self.sx[r])

    cdef void add(self, Block b, i64 sign) noexcept:
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


cdef int _lns(Engine e, _Sums sums, list placement, list touch, Py_ssize_t nodes, Py_ssize_t lns_ranks,
              Py_ssize_t lns_nodes) except -1:
    """:func:`flashcp_planner.strategies.recreate.ruin_recreate` (``lns_ranks``, ``lns_nodes``: its
    constants) on ``sums`` (updated in place), ``placement`` and ``touch``, operation for operation."""
    search = e.search
    cdef Py_ssize_t n = search.n, left = nodes, m, x, used
    cdef i64 r
    cdef double bound, best
    cdef bint improved = True
    cdef dict tables = {}, blocks = {}
    lengths = search.lengths
    while improved and left > 0:
        improved = False
        r = 0
        best = sums.total(0)
        for x in range(1, n):
            if sums.total(x) > best:
                r, best = x, sums.total(x)
        bound = best * (1.0 - 1e-9)
        if all(placement[d][1] == 0 for d in touch[r]):
            return 0  # only pieces of fill-cut documents: nothing to re-place
        totals = [sums.total(x) for x in range(n)]
        others = sorted((x for x in range(n) if x != r), key=lambda x: (totals[x], x))
        tried = set()
        for m in range(1, min(lns_ranks, n - 1) + 1):
            for subset in combinations(others, m):
                freed = tuple(sorted({d for t in (r, *subset) for d in touch[t] if placement[d][1] != 0},
                                     key=lambda d: (-lengths[d], d)))
                if freed in tried:  # the same documents as an earlier set: the same search
                    continue
                tried.add(freed)
                _fill_tables(e, freed, tables, blocks)
                for d in freed:
                    _move_shares(sums, touch, d, e._shares(d, placement[d][0], placement[d][1], e.whole_a), -1)
                for best_fit in (False, True):
                    found, used = _recreate(search, sums, freed, bound, min(lns_nodes, left), best_fit, tables,
                                            blocks)
                    left -= used
                    if found is not None:
                        for d, option in zip(freed, found):
                            placement[d] = option
                        improved = True
                        break
                    if left <= 0:
                        break
                for d in freed:
                    _move_shares(sums, touch, d, e._shares(d, placement[d][0], placement[d][1], e.whole_a), 1)
                if improved or left <= 0:
                    break
            if improved or left <= 0:
                break
    return 0


cdef int _fill_tables(Engine e, tuple docs, dict tables, dict blocks) except -1:
    """``recreate._fill_tables`` from the engine's shares; ``blocks[d]``: the split shares of each entry."""
    cdef Py_ssize_t i, ki
    cdef i64 d, g0, k
    cdef double least
    cdef Block b
    for d in docs:
        if d in tables:
            continue
        splits = []
        split_blocks = []
        for ki in range(e.num_ks):
            k = e.ks[ki]
            g0 = 0
            while g0 < e.n:
                b = e._shares(d, g0, k, e.whole_a)
                splits.append(((g0, k), None, math.fsum([b.tok[i] * e.lin + b.attn[i] for i in range(b.m)])))
                split_blocks.append(b)
                g0 += k
        least = e.lengths[d] * e.lin + e.whole_ms[d]
        for split in splits:
            least = min(least, split[2])
        tables[d] = (least, splits)
        blocks[d] = split_blocks
    return 0


cdef void _move_shares(_Sums sums, list touch, i64 d, Block b, i64 sign):
    """``PlacementSearch.place`` (sign 1) / ``unplace`` (sign -1) on the sums."""
    cdef Py_ssize_t i
    sums.add(b, sign)
    for i in range(b.m):
        if sign > 0:
            (<set> touch[b.rank[i]]).add(d)
        else:
            (<set> touch[b.rank[i]]).discard(d)


cdef tuple _recreate(search, _Sums sums, tuple docs, double bound, Py_ssize_t nodes, bint best_fit, dict tables,
                     dict blocks):
    """:func:`flashcp_planner.strategies.recreate._recreate` on ``sums`` (``tables`` filled for ``docs``;
    ``blocks``: their split shares as :class:`Block`), operation for operation."""
    cdef Py_ssize_t n = search.n, depth, num_docs = len(docs), i, j, count, g0, q, num_seen
    cdef i64 d, length, capacity = search.capacity, gpn = search.cm.gpus_per_node, r
    cdef double lin = search.cm.linear_ms_per_token, area = n * bound, work, room, whole_work, t, w, worst, inc
    cdef Block b
    cdef bint fits
    cdef Py_ssize_t used = 1
    lengths, whole_ms = search.lengths, search.whole_ms
    cdef double[::1] rest = np.zeros(num_docs + 1)  # least work of docs[i:]
    for i in range(num_docs - 1, -1, -1):
        rest[i] = rest[i + 1] + <double> tables[docs[i]][0]
    cdef double[::1] totals = np.empty(n)
    for i in range(n):
        totals[i] = sums.total(i)
    work = sum(np.asarray(sums.tok).tolist()) * lin + math.fsum(np.asarray(sums.attn).tolist())
    cdef Py_ssize_t width = n + sum(len(tables[d][1]) for d in docs)  # children of one node, at most
    cdef Candidate* kids = <Candidate*> malloc(max(num_docs * width, 1) * sizeof(Candidate))
    cdef Py_ssize_t* num_kids = <Py_ssize_t*> malloc((num_docs + 1) * sizeof(Py_ssize_t))
    cdef Py_ssize_t* next_kid = <Py_ssize_t*> malloc((num_docs + 1) * sizeof(Py_ssize_t))
    cdef list chosen = []  # per depth: (Block, work)
    cdef double* seen_tok = <double*> malloc(max(n, 1) * sizeof(double))
    cdef double* seen_attn = <double*> malloc(max(n, 1) * sizeof(double))
    cdef i64* seen_node = <i64*> malloc(max(n, 1) * sizeof(i64))
    cdef Candidate cand
    cdef Candidate* out
    if kids == NULL or num_kids == NULL or next_kid == NULL or seen_tok == NULL or seen_attn == NULL \
            or seen_node == NULL:
        free(kids); free(num_kids); free(next_kid); free(seen_tok); free(seen_attn); free(seen_node)
        raise MemoryError()
    found = None
    try:
        depth = 0  # children(depth) of the node reached by the chosen prefix
        while True:
            # -- children(depth) ------------------------------------------------------------------------
            d = docs[depth]
            length = lengths[d]
            w = whole_ms[d]
            room = area - work - rest[depth + 1]
            out = kids + depth * width
            count = 0
            whole_work = length * lin + w
            if whole_work < room:
                num_seen = 0
                for g0 in range(n):
                    if sums.tok[g0] + length > capacity:
                        continue
                    if not (sums.ri[g0] or sums.rx[g0] or sums.si[g0] or sums.sx[g0]):
                        for q in range(num_seen):
                            if seen_tok[q] == <double> sums.tok[g0] and seen_attn[q] == sums.attn[g0] \
                                    and seen_node[q] == g0 // gpn:
                                break
                        else:
                            q = -1
                        if q >= 0:
                            continue
                        seen_tok[num_seen] = <double> sums.tok[g0]
                        seen_attn[num_seen] = sums.attn[g0]
                        seen_node[num_seen] = g0 // gpn
                        num_seen += 1
                        t = (sums.tok[g0] + length) * lin + (sums.attn[g0] + w)
                    else:
                        t = sums.time(sums.tok[g0] + length, sums.attn[g0] + w, sums.local[g0] + w, sums.ri[g0],
                                      sums.rx[g0], sums.si[g0], sums.sx[g0])
                    if t < bound:
                        out[count].key = -t if best_fit else t
                        out[count].inc = t - totals[g0]
                        out[count].g0 = g0
                        out[count].k = 1
                        out[count].work = whole_work
                        out[count].option = -1
                        count += 1
            splits = tables[d][1]
            split_blocks = blocks[d]
            for j in range(len(splits)):
                option, _, option_work = splits[j]
                if <double> option_work >= room:
                    continue
                b = <Block> split_blocks[j]
                worst = 0.0
                inc = 0.0
                fits = True
                for i in range(b.m):
                    r = b.rank[i]
                    if sums.tok[r] + b.tok[i] > capacity:
                        fits = False
                        break
                    t = sums.time(sums.tok[r] + b.tok[i], sums.attn[r] + b.attn[i], sums.local[r] + b.local[i],
                                  sums.ri[r] + b.ri[i], sums.rx[r] + b.rx[i], sums.si[r] + b.si[i],
                                  sums.sx[r] + b.sx[i])
                    if t >= bound:
                        fits = False
                        break
                    inc += t - totals[r]
                    if t > worst:
                        worst = t
                if fits:
                    out[count].key = -worst if best_fit else worst
                    out[count].inc = inc
                    out[count].g0 = option[0]
                    out[count].k = option[1]
                    out[count].work = option_work
                    out[count].option = j
                    count += 1
            for i in range(1, count):  # insertion sort: out.sort()
                cand = out[i]
                q = i
                while q > 0 and _candidate_before(&cand, &out[q - 1]):
                    out[q] = out[q - 1]
                    q -= 1
                out[q] = cand
            num_kids[depth] = count
            next_kid[depth] = 0
            # -- descend: the next child of the deepest node with one left, undoing siblings -------------
            while True:
                if len(chosen) == depth + 1:  # undo the previous sibling
                    b, option_work = chosen.pop()
                    sums.add(b, -1)
                    work -= <double> option_work
                    for i in range(b.m):
                        totals[b.rank[i]] = sums.total(b.rank[i])
                if next_kid[depth] < num_kids[depth]:
                    break
                if depth == 0:
                    break
                depth -= 1
            if next_kid[depth] >= num_kids[depth]:
                break  # the whole tree is searched
            cand = kids[depth * width + next_kid[depth]]
            next_kid[depth] += 1
            d = docs[depth]
            if cand.option < 0:
                b = Block(1)
                b.rank[0] = cand.g0
                b.tok[0] = lengths[d]
                b.attn[0] = whole_ms[d]
                b.local[0] = whole_ms[d]
                b.ri[0] = b.rx[0] = b.si[0] = b.sx[0] = 0
            else:
                b = <Block> blocks[d][cand.option]
            sums.add(b, 1)
            work += cand.work
            for i in range(b.m):
                totals[b.rank[i]] = sums.total(b.rank[i])
            chosen.append((b, cand.work))
            if len(chosen) == num_docs:
                found = []
                for i in range(num_docs):
                    # (the options of the chosen path, read back from the candidate arrays)
                    cand = kids[i * width + next_kid[i] - 1]
                    found.append((cand.g0, cand.k))
                break
            if used >= nodes:
                break
            used += 1
            depth += 1
        for b, _ in chosen:
            sums.add(b, -1)
        return found, used
    finally:
        free(kids); free(num_kids); free(next_kid); free(seen_tok); free(seen_attn); free(seen_node)
