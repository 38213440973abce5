# Included by _engine.pyx: heaps, sorted vectors, share blocks and small sorts over C arrays.

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


cdef Py_ssize_t _least_blocks(double* totals, Py_ssize_t n, i64 k, Py_ssize_t tries, i64* out,
                              double* key) noexcept:
    """The first ranks of the (up to) ``tries`` aligned blocks of k ranks whose slowest rank is soonest, as
    ``sorted((max(totals[g0:g0 + k]), g0) for g0 in range(0, n, k))[:tries]``; returns how many. ``out``
    holds n entries; ``key``, n scratch entries (used when ``tries`` > 2)."""
    cdef Py_ssize_t g0 = -k, x, q, count = 0
    cdef double worst
    cdef double first = 0.0, second = 0.0
    while g0 + k < n:
        g0 += k
        worst = totals[g0]
        for x in range(g0 + 1, g0 + k if g0 + k < n else n):
            if totals[x] > worst:
                worst = totals[x]
        if tries > 2:  # insertion sort of every block (small instances)
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


cdef void _target_marks(double* totals, Py_ssize_t n, Py_ssize_t count, i64* mark, i64* scratch) noexcept:
    """Mark the ``count`` least-loaded ranks (ties by rank) in ``mark`` (n entries)."""
    cdef Py_ssize_t x
    _ranks_by_time(totals, n, scratch)
    for x in range(n):
        mark[x] = 0
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


