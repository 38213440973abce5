# Included by _engine.pyx: the cost model's attention time in C.

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

    def ms_of(self, starts, ends):
        """``[attention_ms(start, end) ...]`` over two int64 arrays, as a float64 array."""
        cdef i64[::1] first = np.ascontiguousarray(starts, dtype=np.int64)
        cdef i64[::1] last = np.ascontiguousarray(ends, dtype=np.int64)
        cdef Py_ssize_t i
        out = np.empty(first.shape[0], dtype=np.float64)
        cdef double[::1] view = out
        for i in range(first.shape[0]):
            view[i] = self.ms(first[i], last[i])
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


