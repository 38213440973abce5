"""Cost model of one transformer layer, forward + backward, on each rank of a CP group.

Per rank r (all times in milliseconds)::

    total_r    = linear_r + attention_r + exposed_r
    linear_r   = tokens_r * linear_ms_per_token
    attention_r= sum over segments (overhead + 4*pairs*heads*head_dim / (tflops*eff(q_len))) * (1 + attn_bwd_ratio)
    comm_r     = forward (receive KV) + backward (receive dK/dV), per link class
                 (intra-node / inter-node): latency if any bytes + bytes / bandwidth
    exposed_r  = max(0, comm_r - overlap_fraction * local_attention_r)

``local_attention_r`` is the attention of segments whose keys are all owned by
r (Whole-Doc documents, the head chunk of a split one): it can run while the
KV of split documents is in flight. The same evaluator scores every strategy.

Traffic per mode (:mod:`flashcp_planner.comm`; tokens, times ``kv_bytes_per_token``)::

    exact_need   recv_r[c] = keys r reads, held by others, on links of class c; send_r the mirror
    node_dedup   stage 1 (inter):  recv_r[inter] = |stripe_r| = T_m / size_m  (+-1 token)
                                   send_s[inter] = sum over pieces p of s: |p| * (nodes != node(s) reading p)
                 stage 2 (intra):  recv_r[intra] = (keys r reads held elsewhere in node m)
                                                 + (stream keys r reads) - (those in stripe_r)
                                   send_r[intra] = sum over readers q != r in m of |reads_q & stripe_r|
                                                 + node-local pieces of r times their other readers

where node m's stream holds every key its ranks read that no rank of m holds (``T_m`` tokens,
each crossing once), striped over its ``size_m`` ranks. Both stages go into the same per-rank
formula: ``link_ms(recv)`` is stage 1 (inter latency + bytes / inter bandwidth) then stage 2
(intra latency + bytes / intra bandwidth), in sequence, each latency paid iff its stage moves
bytes; backward (dK/dV reduced inside the node, then sent across once) is ``link_ms(send)``.

Constants and their sources live in :mod:`flashcp_planner.presets`.
"""

from __future__ import annotations

import functools
import math
import operator
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from itertools import chain, compress

import numpy as np

from flashcp_planner.errors import InvalidRequest
from flashcp_planner.model import KVTransfer, RankColumns, RankCost, Segment, Segments, int64_array

__all__ = ["CostModel", "lower_bound_ms", "node_dedup_proxy", "rank_costs", "rank_costs_of_columns",
           "rank_costs_of_traffic"]

_WHOLE_CACHE_SIZE = 1 << 16
"""Distinct document lengths memoised per cost model (bounded memory in long-running services)."""
_WHOLE_TABLE_SIZE = 1 << 20
"""Largest dense memo of ``attention_ms(0, end)`` by ``end`` (8 MiB of float64); longer ends use the dict memo."""
_TABLE_FROM = 1024
"""Lengths looked up at once from which :meth:`CostModel.whole_attention_ms` uses the dense memo."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CostModel:
    """Every constant of the cost model; see the module docstring for the formulas."""

    name: str = "custom"
    """Preset or file name; recorded in every plan."""

    hidden_size: int = 4096
    """Model hidden dimension."""
    ffn_hidden_size: int = 14336
    """MLP intermediate dimension (gated MLP: three GEMMs of hidden x ffn)."""
    num_heads: int = 32
    """Query heads (per tensor-parallel rank, if TP is used)."""
    num_kv_heads: int = 8
    """Key/value heads (grouped-query attention)."""
    head_dim: int = 128
    """Dimension of one head."""
    bytes_per_element: int = 2
    """Bytes per activation element on the wire (2 for bf16)."""

    gemm_tflops: float = 600.0
    """Achieved dense GEMM throughput of the linear layers, TFLOP/s."""
    attention_tflops: float = 500.0
    """Attention forward throughput at full kernel efficiency, TFLOP/s."""
    attention_efficiency: tuple[tuple[int, float], ...] = ((128, 0.1), (1024, 0.45), (4096, 0.8), (16384, 1.0))
    """Kernel efficiency curve: ``(query_tokens, fraction of attention_tflops)`` points,
    interpolated linearly in log2(query_tokens) and clamped at both ends."""
    attention_segment_overhead_ms: float = 0.002
    """Fixed forward cost per segment (tile quantisation, varlen bookkeeping)."""
    linear_backward_ratio: float = 2.0
    """Backward / forward time of the linear layers."""
    attention_backward_ratio: float = 2.5
    """Backward / forward time of attention."""

    gpus_per_node: int = 8
    """Ranks per node: ranks r and s share a node iff r // gpus_per_node == s // gpus_per_node."""
    intra_node_gbps: float = 300.0
    """Achieved per-GPU receive bandwidth inside a node (NVLink), GB/s."""
    inter_node_gbps: float = 45.0
    """Achieved per-GPU receive bandwidth across nodes (InfiniBand), GB/s."""
    intra_node_latency_ms: float = 0.03
    """Latency of one intra-node exchange (one per phase when any bytes move)."""
    inter_node_latency_ms: float = 0.06
    """Latency of one inter-node exchange (one per phase when any bytes move)."""
    overlap_fraction: float = 1.0
    """Fraction of local attention time that can hide communication (0 = no overlap)."""

    _eff_log_q: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _eff_val: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _whole_cache: dict[int, float] = field(init=False, repr=False, compare=False, default_factory=dict)
    """Memo of ``attention_ms(0, length)`` (a pure function of the constants): whole documents are scored by
    the strategies and again by the evaluator, and lengths recur across micro-batches."""
    _whole_table: np.ndarray = field(init=False, repr=False, compare=False, default_factory=lambda: np.empty(0))
    """The same memo for bulk lookups: entry ``end`` holds ``attention_ms(0, end)``, NaN where not computed yet."""

    def __getstate__(self) -> dict[str, object]:
        """Pickles the constants only: the memo can be large and is rebuilt on use (solver processes)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def __setstate__(self, state: dict[str, object]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_whole_cache", {})
        object.__setattr__(self, "_whole_table", np.empty(0))
        self.__post_init__()

    def __post_init__(self) -> None:
        for name in ("hidden_size", "ffn_hidden_size", "num_heads", "num_kv_heads", "head_dim",
                     "bytes_per_element", "gpus_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"cost_model.{name}", f"must be a positive integer, got {value!r}")
        for name in ("gemm_tflops", "attention_tflops", "intra_node_gbps", "inter_node_gbps"):
            _check_float(name, getattr(self, name), positive=True)
        for name in ("attention_segment_overhead_ms", "linear_backward_ratio", "attention_backward_ratio",
                     "intra_node_latency_ms", "inter_node_latency_ms", "overlap_fraction"):
            _check_float(name, getattr(self, name), positive=False)
        if self.overlap_fraction > 1.0:
            raise InvalidRequest("cost_model.overlap_fraction", f"must be in [0, 1], got {self.overlap_fraction}")
        if self.num_heads % self.num_kv_heads:
            raise InvalidRequest("cost_model.num_kv_heads", "must divide num_heads")
        points = self.attention_efficiency
        if not isinstance(points, (tuple, list)) or not points:
            raise InvalidRequest("cost_model.attention_efficiency",
                                 "must be a non-empty list of [query_tokens, efficiency]")
        log_q, vals = [], []
        for i, point in enumerate(points):
            if not isinstance(point, (tuple, list)) or len(point) != 2:
                raise InvalidRequest(f"cost_model.attention_efficiency[{i}]",
                                     "must be a pair [query_tokens, efficiency]")
            q, eff = point
            if isinstance(q, bool) or not isinstance(q, int) or q < 1:
                raise InvalidRequest(f"cost_model.attention_efficiency[{i}][0]",
                                     f"must be a positive integer, got {q!r}")
            _check_float(f"attention_efficiency[{i}][1]", eff, positive=True)
            if eff > 1.0:
                raise InvalidRequest(f"cost_model.attention_efficiency[{i}][1]", f"must be in (0, 1], got {eff}")
            if log_q and math.log2(q) <= log_q[-1]:
                raise InvalidRequest(f"cost_model.attention_efficiency[{i}][0]",
                                     "query_tokens must be strictly increasing")
            log_q.append(math.log2(q))
            vals.append(float(eff))
        object.__setattr__(self, "attention_efficiency", tuple((int(q), float(e)) for q, e in points))
        object.__setattr__(self, "_eff_log_q", tuple(log_q))
        object.__setattr__(self, "_eff_val", tuple(vals))

    # -- derived constants -------------------------------------------------

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token, one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.bytes_per_element

    @property
    def linear_ms_per_token(self) -> float:
        """Forward + backward GEMM time of one token through one layer."""
        q_dim = self.num_heads * self.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        macs = (self.hidden_size * (q_dim + 2 * kv_dim) + q_dim * self.hidden_size
                + 3 * self.hidden_size * self.ffn_hidden_size)
        return 2.0 * macs * (1.0 + self.linear_backward_ratio) / (self.gemm_tflops * 1e9)

    def efficiency(self, query_tokens: int) -> float:
        """Kernel efficiency of a segment whose effective length is ``query_tokens``.

        :meth:`attention_ms` passes ``isqrt(2 * pairs)``: the length of the whole
        document with the same work. For a whole document that is its length; a
        short tail chunk that reads a long key range is credited with its larger
        work, as measured kernels are (see the calibration notes in presets.py).
        """
        lq, ev = self._eff_log_q, self._eff_val
        x = math.log2(query_tokens) if query_tokens > 1 else 0.0
        if x <= lq[0]:
            return ev[0]
        if x >= lq[-1]:
            return ev[-1]
        i = bisect_right(lq, x)
        t = (x - lq[i - 1]) / (lq[i] - lq[i - 1])
        return ev[i - 1] + t * (ev[i] - ev[i - 1])

    def attention_ms(self, start: int, end: int) -> float:
        """Forward + backward attention time of queries ``[start, end)`` of one document."""
        if start == 0:
            cached = self._whole_cache.get(end)
            if cached is not None:
                return cached
        pairs = (end * (end + 1) - start * (start + 1)) // 2
        flops = 4.0 * pairs * self.num_heads * self.head_dim
        fwd = self.attention_segment_overhead_ms + flops / (
            self.attention_tflops * 1e9 * self.efficiency(math.isqrt(2 * pairs))
        )
        ms = fwd * (1.0 + self.attention_backward_ratio)
        if start == 0 and len(self._whole_cache) < _WHOLE_CACHE_SIZE:
            self._whole_cache[end] = ms
        return ms

    def attention_ms_of(self, bounds: Sequence[tuple[int, int]]) -> list[float]:
        """``[attention_ms(start, end) for start, end in bounds]``, the same floats, in one tight loop
        (the per-segment method calls dominate scoring a split over many ranks)."""
        lq, ev = self._eff_log_q, self._eff_val
        lo_q, hi_q, lo_e, hi_e = lq[0], lq[-1], ev[0], ev[-1]
        scale = 4.0  # flops = 4.0 * pairs * heads * head_dim, in attention_ms's order of operations
        heads, head_dim = self.num_heads, self.head_dim
        rate = self.attention_tflops * 1e9
        overhead = self.attention_segment_overhead_ms
        bwd = 1.0 + self.attention_backward_ratio
        log2, isqrt = math.log2, math.isqrt
        out = []
        for start, end in bounds:
            pairs = (end * (end + 1) - start * (start + 1)) // 2
            q = isqrt(2 * pairs)
            x = log2(q) if q > 1 else 0.0
            if x <= lo_q:
                eff = lo_e
            elif x >= hi_q:
                eff = hi_e
            else:
                i = bisect_right(lq, x)
                eff = ev[i - 1] + (x - lq[i - 1]) / (lq[i] - lq[i - 1]) * (ev[i] - ev[i - 1])
            out.append((overhead + scale * pairs * heads * head_dim / (rate * eff)) * bwd)
        return out

    def attention_ms_array(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """:meth:`attention_ms_of` over int64 arrays, as float64: in the compiled search engine's
        twin of the formula when it is built (the same floats, tested), else in Python."""
        try:  # (imported here: the engine's module imports the cost model's)
            from flashcp_planner.strategies._engine import Attention
        except ImportError:  # pragma: no cover - installs without a C compiler
            return np.array(self.attention_ms_of(list(zip(starts.tolist(), ends.tolist(), strict=True))))
        return Attention(self).ms_of(starts, ends)

    def whole_attention_ms(self, lengths: Sequence[int]) -> list[float]:
        """``[attention_ms(0, length) for length in lengths]`` (same floats), through the memo in bulk."""
        if len(lengths) >= _TABLE_FROM:
            try:
                return self.whole_attention_array(int64_array(lengths)).tolist()
            except OverflowError:
                return [self.attention_ms(0, length) for length in lengths]
        cache = self._whole_cache
        values = list(map(cache.get, lengths))
        if None not in values:
            return values
        missing = sorted({length for length, value in zip(lengths, values, strict=True) if value is None})
        if len(cache) + len(missing) > _WHOLE_CACHE_SIZE:
            return [self.attention_ms(0, length) for length in lengths]
        cache.update(zip(missing, self.attention_ms_of([(0, length) for length in missing]), strict=True))
        return list(map(cache.__getitem__, lengths))

    def whole_attention_array(self, ends: np.ndarray) -> np.ndarray:
        """``attention_ms(0, end)`` for every entry of the int64 array ``ends``, as float64 (the same floats).

        Looked up in a dense table indexed by ``end`` (grown to the largest end seen, up to
        ``_WHOLE_TABLE_SIZE``); missing entries are computed once with :meth:`attention_ms_of`.
        Ends outside the table go through :meth:`attention_ms` one by one.
        """
        if not len(ends):
            return np.empty(0)
        inside = (ends >= 0) & (ends < _WHOLE_TABLE_SIZE)
        if not inside.all():
            out = np.empty(len(ends))
            out[inside] = self.whole_attention_array(ends[inside])
            out[~inside] = [self.attention_ms(0, end) for end in ends[~inside].tolist()]
            return out
        table = self._table_covering(int(ends.max()))
        out = table[ends]
        missing = np.isnan(out)
        if missing.any():
            new = np.unique(ends[missing])
            table[new] = self.attention_ms_of([(0, end) for end in new.tolist()])
            out = table[ends]
        return out

    def remember_whole_attention(self, lengths: np.ndarray, ms: np.ndarray) -> None:
        """Seed the whole-document memo with ``ms[i] = attention_ms(0, lengths[i])`` computed elsewhere
        (the compiled search engine's, the same floats), so that evaluating the plan looks them up."""
        if len(lengths) < _TABLE_FROM:  # (where whole_attention_ms looks)
            if len(self._whole_cache) + len(lengths) <= _WHOLE_CACHE_SIZE:
                self._whole_cache.update(zip(lengths.tolist(), ms.tolist(), strict=True))
            return
        inside = lengths < _WHOLE_TABLE_SIZE
        if inside.any():
            self._table_covering(int(lengths[inside].max()))[lengths[inside]] = ms[inside]

    def _table_covering(self, top: int) -> np.ndarray:
        """The dense whole-document table, grown to hold index ``top`` (< ``_WHOLE_TABLE_SIZE``)."""
        table = self._whole_table
        if top >= len(table):
            grown = np.full(min(_WHOLE_TABLE_SIZE, max(2 * len(table), 1 << (top + 1).bit_length())), np.nan)
            grown[:len(table)] = table
            object.__setattr__(self, "_whole_table", grown)  # readers of the old table stay valid
            table = grown
        return table

    def attention_ideal_ms(self, length: int) -> float:
        """Attention of a whole document at the best efficiency, no overhead (for lower bounds)."""
        return self.attention_ideal_ms_of_pairs(length * (length + 1) // 2)

    def attention_ideal_ms_of_pairs(self, pairs: int) -> float:
        """Attention of ``pairs`` causal pairs at the best efficiency, no overhead (for lower bounds)."""
        flops = 4.0 * pairs * self.num_heads * self.head_dim
        return flops * (1.0 + self.attention_backward_ratio) / (self.attention_tflops * 1e9 * max(self._eff_val))

    def same_node(self, a: int, b: int) -> bool:
        return a // self.gpus_per_node == b // self.gpus_per_node

    def link_ms(self, intra_bytes: int, inter_bytes: int) -> float:
        """Time of one phase moving these bytes into one rank."""
        ms = 0.0
        if intra_bytes:
            ms += self.intra_node_latency_ms + intra_bytes / (self.intra_node_gbps * 1e6)
        if inter_bytes:
            ms += self.inter_node_latency_ms + inter_bytes / (self.inter_node_gbps * 1e6)
        return ms


@functools.lru_cache(maxsize=16)
def node_dedup_proxy(cost_model: CostModel) -> CostModel:
    """``cost_model`` with the inter-node bandwidth that makes exact-need pricing stand for
    ``node_dedup`` routing, for searches whose traffic must be additive per document.

    When the ``g`` ranks of a node all read the keys their node lacks (head-tail groups over
    aligned nodes), ``B`` inter-node bytes per rank under exact need become ``B / g`` across the
    node's links plus ``B (g - 1) / g`` forwarded inside it::

        1 / inter_gbps' = 1 / (g * inter_gbps) + (g - 1) / (g * intra_gbps)

    Plans are always priced under the real constants; this model only steers a search.
    """
    g = cost_model.gpus_per_node
    inverse = 1.0 / (g * cost_model.inter_node_gbps) + (g - 1) / (g * cost_model.intra_node_gbps)
    return replace(cost_model, inter_node_gbps=1.0 / inverse)


def _check_float(name: str, value: object, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(f"cost_model.{name}", f"must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise InvalidRequest(f"cost_model.{name}", f"must be {'> 0' if positive else '>= 0'}, got {value}")


def rank_costs(
    rank_segments: Sequence[Sequence[Segment]],
    transfers: Sequence[KVTransfer],
    cost_model: CostModel,
) -> tuple[RankCost, ...]:
    """Score every rank of a layout. ``transfers`` must be the full forward list (all modes)."""
    n = len(rank_segments)
    gpn = cost_model.gpus_per_node
    recv = [[0, 0] for _ in range(n)]  # [intra, inter] tokens received in forward
    send = [[0, 0] for _ in range(n)]  # [intra, inter] tokens sent in forward = received in backward
    for src, dst, _, start, end in transfers:
        link = 0 if src // gpn == dst // gpn else 1
        recv[dst][link] += end - start
        send[src][link] += end - start
    return rank_costs_of_traffic(rank_segments, recv, send, cost_model)


def rank_costs_of_traffic(
    rank_segments: Sequence[Sequence[Segment]],
    recv: Sequence[Sequence[int]],
    send: Sequence[Sequence[int]],
    cost_model: CostModel,
) -> tuple[RankCost, ...]:
    """:func:`rank_costs` from per-rank ``[intra, inter]`` KV tokens received / sent in forward
    (:func:`flashcp_planner.comm.transfers_and_traffic`) instead of the transfer list.

    Attention sums use :func:`math.fsum` (exactly rounded, so independent of order and of the
    Python version's ``sum``). Segments from token 0 (whole documents, head chunks) are scored in
    bulk through the whole-document memo; the others one by one.
    """
    return rank_costs_of_sums(attention_sums(rank_segments, cost_model), recv, send, cost_model)


AttentionSums = tuple[list[int], list[float], list[float]]
"""Per rank: tokens, attention ms, local attention ms (what a rank's cost needs besides traffic)."""


def attention_sums(rank_segments: Sequence[Sequence[Segment]], cost_model: CostModel) -> AttentionSums:
    """The per-rank sums of :func:`rank_costs_of_traffic`, to price one layout under several traffics."""
    columns = [Segments.of(segments) for segments in rank_segments]
    local_ms, remote_ms = _attention_terms(columns, cost_model)
    tokens, attention, local = [], [], []
    for r, segments in enumerate(columns):
        tokens.append(sum(segments.ends) - sum(segments.starts))
        local.append(math.fsum(local_ms[r]))
        attention.append(math.fsum(local_ms[r] + remote_ms[r]) if remote_ms[r] else local[-1])
    return tokens, attention, local


def rank_costs_of_sums(
    sums: AttentionSums, recv: Sequence[Sequence[int]], send: Sequence[Sequence[int]], cost_model: CostModel
) -> tuple[RankCost, ...]:
    """Every rank's cost from :func:`attention_sums` (or :func:`attention_sums_of_columns`) and traffic."""
    return tuple(_rank_cost(tokens, attention, local, recv[r], send[r], cost_model)
                 for r, (tokens, attention, local) in enumerate(zip(*sums, strict=True)))


def makespan_of_sums(
    sums: AttentionSums, recv: Sequence[Sequence[int]], send: Sequence[Sequence[int]], cost_model: CostModel
) -> float:
    """``max(c.total_ms for c in rank_costs_of_sums(...))``, the same float (the same operations in
    the same order, per rank), in array passes: to compare layouts and modes before building costs."""
    cm = cost_model
    tokens, attention, local = (np.asarray(x) for x in sums)
    kv = cm.kv_bytes_per_token

    def link_ms(tokens_by_link: Sequence[Sequence[int]]) -> np.ndarray:  # CostModel.link_ms per rank
        moved = np.asarray(tokens_by_link, dtype=np.int64).reshape(-1, 2) * kv
        intra = np.where(moved[:, 0] > 0, cm.intra_node_latency_ms + moved[:, 0] / (cm.intra_node_gbps * 1e6), 0.0)
        inter = np.where(moved[:, 1] > 0, cm.inter_node_latency_ms + moved[:, 1] / (cm.inter_node_gbps * 1e6), 0.0)
        return intra + inter

    comm = link_ms(recv) + link_ms(send)
    exposed = np.maximum(0.0, comm - cm.overlap_fraction * local)
    return float((tokens * cm.linear_ms_per_token + attention + exposed).max())


def _rank_cost(
    tokens: int, attention: float, local_attention: float, recv: Sequence[int], send: Sequence[int],
    cost_model: CostModel,
) -> RankCost:
    """One rank's cost from its sums; ``recv`` / ``send``: ``[intra, inter]`` forward KV tokens."""
    kv = cost_model.kv_bytes_per_token
    (ri, rx), (si, sx) = recv, send
    comm = cost_model.link_ms(ri * kv, rx * kv) + cost_model.link_ms(si * kv, sx * kv)
    return RankCost(
        tokens=tokens,
        linear_ms=tokens * cost_model.linear_ms_per_token,
        attention_ms=attention,
        comm_ms=comm,
        exposed_comm_ms=max(0.0, comm - cost_model.overlap_fraction * local_attention),
        recv_bytes=(ri + rx) * kv,
        send_bytes=(si + sx) * kv,
    )


def _attention_terms(columns: Sequence[Segments], cost_model: CostModel) -> tuple[list[list[float]], list[list[float]]]:
    """Per rank (segments in ``(doc, start)`` order), the attention of the segments whose keys it holds
    from token 0 (local) and of the others (remote). Segments from token 0 are scored in one memo
    lookup, the others in one pass of the formula, for all ranks at once."""
    mixed = [any(segments.starts) for segments in columns]  # ranks with pieces not from token 0
    zero_ends = [list(compress(c.ends, map(operator.not_, c.starts))) if m else c.ends
                 for c, m in zip(columns, mixed, strict=True)]
    later = [list(compress(zip(c.docs, c.starts, c.ends, strict=True), c.starts)) if m else []
             for c, m in zip(columns, mixed, strict=True)]
    whole_ms = cost_model.whole_attention_ms(list(chain.from_iterable(zero_ends)))
    later_ms = iter(cost_model.attention_ms_of([(start, end) for rows in later for _, start, end in rows])
                    if any(mixed) else ())
    local, remote = [], []
    at = 0
    for c, ends, rows in zip(columns, zero_ends, later, strict=True):
        local_ms, remote_ms = whole_ms[at:at + len(ends)], []
        at += len(ends)
        if rows:
            prefix = dict(zip(compress(c.docs, map(operator.not_, c.starts)), ends, strict=True))  # doc -> keys from 0
            for doc, start, end in rows:
                if prefix.get(doc) == start:  # keys [0, end) all owned by this rank
                    prefix[doc] = end
                    local_ms.append(next(later_ms))
                else:
                    remote_ms.append(next(later_ms))
        local.append(local_ms)
        remote.append(remote_ms)
    return local, remote


def rank_costs_of_columns(
    columns: RankColumns,
    recv: Sequence[Sequence[int]],
    send: Sequence[Sequence[int]],
    cost_model: CostModel,
) -> tuple[RankCost, ...]:
    """:func:`rank_costs_of_traffic` of segments given as columns: the same floats, in array passes.

    Every segment's attention comes from the same scalar formula (segments from token 0 through the
    dense whole-document memo); the per-rank sums stay :func:`math.fsum`, so only how the terms are
    gathered changes. A segment is local when the rank holds its document's keys from token 0 on:
    its run of contiguous pieces of that document on the rank starts at token 0.
    """
    return rank_costs_of_sums(attention_sums_of_columns(columns, cost_model), recv, send, cost_model)


def attention_sums_of_columns(columns: RankColumns, cost_model: CostModel) -> AttentionSums:
    """:func:`attention_sums` of segments given as columns (the same floats, in array passes)."""
    starts, ends, bounds = columns.starts, columns.ends, columns.bounds
    later = np.flatnonzero(starts)  # rows not from token 0
    ms = cost_model.whole_attention_array(ends)  # right for the rows from token 0; the others next
    local = np.ones(len(ms), dtype=bool)
    if len(later):
        ms[later] = cost_model.attention_ms_array(starts[later], ends[later])
        local[later] = _later_rows_local(columns, later)
    remote_upto = np.searchsorted(np.flatnonzero(~local), bounds).tolist()  # remote rows before each rank
    local_list = local.tolist() if remote_upto[-1] else []
    ms_view = memoryview(ms)  # fsum reads Python floats from it, without a list of them
    attention, local_attention = [], []
    for r in range(len(bounds) - 1):
        a, b = bounds[r], bounds[r + 1]
        attention.append(math.fsum(ms_view[a:b]))
        local_attention.append(attention[-1] if remote_upto[r] == remote_upto[r + 1]
                               else math.fsum(compress(ms_view[a:b], local_list[a:b])))
    return columns.tokens(), attention, local_attention


def _later_rows_local(columns: RankColumns, later: np.ndarray) -> np.ndarray:
    """Whether each row of ``later`` (rows not from token 0) is local: its run of contiguous pieces of
    one document on one rank starts at token 0."""
    docs, starts, ends = columns.docs, columns.starts, columns.ends
    bounds = np.asarray(columns.bounds)
    first_of_rank = bounds[np.searchsorted(bounds, later, side="right") - 1] == later
    extends = ~first_of_rank & (docs[later - 1] == docs[later]) & (ends[later - 1] == starts[later])
    chained = np.zeros(len(later), dtype=bool)  # extends a later row: same run as the row before it
    chained[1:] = extends[1:] & (later[1:] - 1 == later[:-1])
    head = ~chained  # the first later row of each run: local iff it extends a row from token 0
    return extends[head][np.cumsum(head) - 1]


def lower_bound_ms(doc_lengths: Sequence[int] | np.ndarray, cp_size: int, cost_model: CostModel) -> float:
    """Perfect balance, full kernel efficiency, no exposed communication.

    ``doc_lengths`` may be an int64 array (the same result, without converting the lengths again).
    """
    pairs, tokens = _pairs_and_tokens(doc_lengths)
    attention = cost_model.attention_ideal_ms_of_pairs(pairs)
    linear = tokens * cost_model.linear_ms_per_token
    return (attention + linear) / cp_size


def _pairs_and_tokens(doc_lengths: Sequence[int] | np.ndarray) -> tuple[int, int]:
    """``(sum(causal_pairs(0, length)), sum(doc_lengths))``, exactly: in int64 where no sum can overflow."""
    lengths = doc_lengths.astype(np.int64, copy=False) if isinstance(doc_lengths, np.ndarray) else None
    if lengths is None and len(doc_lengths) >= _ARRAY_FROM:
        lengths = int64_array(doc_lengths)
    if lengths is not None and len(lengths):
        low, high = int(lengths.min()), int(lengths.max())
        if low >= 0 and len(lengths) * high * (high + 1) < 2**63:
            return int((lengths * (lengths + 1)).sum()) // 2, int(lengths.sum())
    values = doc_lengths.tolist() if isinstance(doc_lengths, np.ndarray) else doc_lengths
    return sum(map(operator.mul, values, map((1).__add__, values))) // 2, sum(values)


_ARRAY_FROM = 2048
"""Sequences of at least this many lengths are summed as an array (fewer: the conversion costs more)."""
