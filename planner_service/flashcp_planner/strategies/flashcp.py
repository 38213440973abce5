"""The FlashCP heuristic: per document Whole-Doc, Per-Doc or sub-group head-tail, minimising the makespan.

Every candidate is scored on the additive per-rank shares of
:mod:`flashcp_planner.strategies.shares`, i.e. with the evaluator's own formula
(:func:`flashcp_planner.cost.rank_costs`), incrementally, without building a plan.
Group sizes k are powers of two dividing N (plus N itself, Per-Doc) and groups are
aligned blocks of consecutive ranks, so groups of k <= gpus_per_node never straddle
nodes; ``allow_sub_group=False`` leaves only k = N.

1. **Greedy** (:meth:`PlacementSearch.greedy`). Documents longest first, each whole
   onto the least-loaded rank with room (LPT). A document whose whole placement
   would end past ``alpha`` x the ideal per-rank load, or that fits on no rank, takes
   the option (whole, or head-tail over the two least-loaded groups of each size)
   that adds the least total time among those ending within the limit. A document
   no head-tail split can hold under capacity is cut into pieces filling the ranks
   with room, so a plan exists whenever N * capacity >= T.
2. **Improvement** (:meth:`PlacementSearch.improve`). Repeatedly take the slowest
   rank and try moving one of its whole documents to a least-loaded rank, swapping
   one with a document there, splitting one over a group, re-placing a split
   document that touches it; on small instances also compound moves (re-place a
   document and re-insert the whole documents it displaces). A move is applied only
   if every rank it touches ends below the old makespan: the sorted vector of rank
   times decreases strictly, so the loop terminates (and is bounded anyway).
3. **Candidates** (:func:`heuristic_placements`). Small instances (<= 32 documents)
   run the greedy with several ``alpha`` (multi-start), then a ruin-and-recreate
   search on the best (:func:`~flashcp_planner.strategies.recreate.ruin_recreate`, <= 32 documents, N <= 16):
   free the slowest rank with every set of up to three others and search depth-first,
   with a node budget, for a re-insertion of their documents (any option each) that
   ends every rank below the makespan. When the greedy split a document that fitted
   whole, pure LPT (``alpha`` = 0, exactly the ``whole_doc`` baseline's placement)
   is run and improved too unless a bound shows it cannot win, so the result is
   never worse than ``whole_doc`` (under ``all_gather``, whose traffic the search
   only approximates, the greedy placements are candidates before improving too).
   All-Per-Doc is scored unless a lower bound rules it out. The best layout is
   returned; ties keep the earlier candidate.

Deterministic: ties broken by index, no random choices; the work is bounded by counts
(rounds, candidates per round, search nodes), never by wall-clock time.

The code below is the reference. When it is built, :mod:`flashcp_planner.strategies._engine` runs the
same search in C, operation for operation (identical placements, tested); ``native=False`` or
``FLASHCP_NATIVE=0`` runs this Python code instead.

Cost: the greedy is O(D log N) (ranks without room for the current document wait in
a second heap until the documents get short enough), whole-document moves are scored
in O(1) (:meth:`LoadState.peek_shift`), a split over k ranks in O(k) closed form
(:func:`~flashcp_planner.strategies.shares.head_tail_shares`), rank totals are cached
between changes, and per-document costs, order, bounds and the final layout are
computed over arrays; the per-document Python work is one heap step.
"""

from __future__ import annotations

import heapq
import math
import os
from bisect import bisect_left
from dataclasses import dataclass
from functools import cached_property
from itertools import compress
from operator import itemgetter
from typing import ClassVar

import numpy as np

from flashcp_planner.layout import FILL, Layout, head_tail_segments, layout_makespan, placements_layout
from flashcp_planner.model import CommMode, Segment
from flashcp_planner.request import PlanContext
from flashcp_planner.strategies.shares import LoadState, Share, head_tail_shares, pieces_shares, whole_share

try:  # the compiled twin of this search (strategies/_engine.pyx, built by setup.py; optional)
    from flashcp_planner.strategies._engine import Attention, Engine
except ImportError:  # pragma: no cover - exercised on installs without a C compiler
    Attention = Engine = None

NATIVE_AVAILABLE = Engine is not None
"""Whether the compiled search engine is built. ``FLASHCP_NATIVE=0`` in the environment makes the planner
run the Python reference instead (the same plans, slower)."""
_NATIVE_DEFAULT = NATIVE_AVAILABLE and os.environ.get("FLASHCP_NATIVE", "1") != "0"

__all__ = ["FILL", "NATIVE_AVAILABLE", "FlashCPHeuristic", "Placement", "PlacementSearch", "group_sizes",
           "heuristic_placements", "placements_layout"]

Placement = tuple[int, int]
"""``(first_rank, k)``: k = 1 whole on ``first_rank``; k >= 2 head-tail over ranks
``first_rank .. first_rank + k - 1``; k = 0 cut into fill pieces (see :class:`PlacementSearch`)."""

_SPLIT_CANDIDATE = 0.25
"""The greedy considers splitting only documents whose whole time is at least this fraction of the ideal load."""
_STOP_IMBALANCE = 1e-3
"""Stop improving once the slowest rank is within this fraction of the mean (large instances)."""
_STOP_IMBALANCE_SMALL = 1e-7
_ALPHAS = (1.1, 1.25, 1.5, 2.0, 3.0)
"""Extra greedy runs (multi-start) with looser split limits, on instances of up to _SMALL_INSTANCE documents."""
_SMALL_INSTANCE = 32
"""Up to this many documents: multi-start; with N <= _SMALL_CP also every improvement move each round and
compound moves. Above, splits are tried only when no cheaper whole-document move improves."""
_SMALL_CP = 16
_SWAP_DOCS = 16
"""Largest whole documents of the slowest rank tried in swaps."""
_SWAP_SCORED = 4
"""Large instances: swaps scored exactly per round, the closest to half the gap (the rest only estimated)."""
_COMPOUND_EVICT = 6
"""Compound moves displacing more whole documents than this are not tried."""
_COMPOUND_TARGETS = 4
"""A displaced document is re-inserted on its rank or on one of this many least-loaded ranks."""
_LNS_DOCS = 32
"""Instances of up to this many documents (and N <= _SMALL_CP) get a final ruin-and-recreate search."""
_LNS_BUDGET = 2000
"""Search nodes of the whole ruin-and-recreate search (each scores every option of one document)."""

def group_sizes(cp_size: int, allow_sub_group: bool) -> list[int]:
    """Group sizes k >= 2 a document may be split over: powers of two dividing N, and N itself."""
    if cp_size < 2:
        return []
    sizes = [] if not allow_sub_group else [1 << i for i in range(1, cp_size.bit_length()) if cp_size % (1 << i) == 0]
    if cp_size not in sizes:
        sizes.append(cp_size)
    return sorted(s for s in sizes if s <= cp_size)


@dataclass(slots=True, kw_only=True)
class _Run:
    """Mutable result of one greedy run, refined in place by :meth:`PlacementSearch.improve`."""

    placement: list[Placement]
    fills: dict[int, list[tuple[int, Segment]]]
    """Pieces of documents cut by the capacity fallback (placement k = 0)."""
    state: LoadState
    touch: list[set[int]]
    """Per rank, the documents with tokens on it."""
    deviated: bool
    """Whether the greedy split a document that fitted whole (then pure LPT differs)."""
    split: bool
    """Whether the greedy split any document (then looser split limits may do better)."""


class PlacementSearch:
    """Shares of every placement of one micro-batch (cached) and the greedy / improvement phases over them.

    Args:
        ctx: the micro-batch and its constants.
        comm: the communication mode searched (``EXACT_NEED`` or ``SHARDING_AWARE``; ``ALL_GATHER`` is
            scored exactly but not searched by the compiled engine).
        native: run the search in the compiled engine (the same results); None: when built, unless
            ``FLASHCP_NATIVE=0``.
    """

    def __init__(self, ctx: PlanContext, comm: CommMode, *, native: bool | None = None) -> None:
        self.ctx = ctx
        self.lengths = ctx.doc_lengths
        self.n = ctx.cp_size
        self.cm = ctx.cost_model
        self.capacity = ctx.capacity
        self.comm = comm
        self.ks = group_sizes(self.n, ctx.options.allow_sub_group)
        self.small = len(self.lengths) <= _SMALL_INSTANCE and self.n <= _SMALL_CP
        """Small instances get the exhaustive improvement moves (every group, compound moves)."""
        if native is None:
            native = _NATIVE_DEFAULT
        if native and not NATIVE_AVAILABLE:
            raise RuntimeError("the compiled search engine is not built (pip install needs a C compiler)")
        # Compiled code sums KV bytes in int64: exact far beyond any real micro-batch, checked anyway.
        self.native = native and comm is not CommMode.ALL_GATHER and \
            sum(self.lengths) * self.n * self.cm.kv_bytes_per_token < 1 << 53
        """Whether the compiled engine runs the search (greedy, improvement, the final search)."""
        self._cache: dict[tuple[int, int, int], tuple[Share, ...]] = {}
        gpn = self.cm.gpus_per_node
        self._shift_ok = {k: (k <= gpn and gpn % k == 0) or k % gpn == 0 for k in self.ks}
        self.engine = Engine(self) if self.native else None
        if self.engine is not None:  # the same arrays, computed in C
            self.length_array = self.engine.length_array
            self.whole_ms_array = self.engine.whole_ms_array
            self.whole_cost_array = self.engine.whole_cost_array
            self.longest_first_array = self.engine.longest_first_array
            self.cm.remember_whole_attention(self.length_array, self.whole_ms_array)  # the plan's evaluation
            return
        self.length_array = np.array(self.lengths, dtype=np.int64)
        self.whole_ms_array = np.array(self.cm.whole_attention_ms(self.lengths))
        """Per document, its attention time kept whole."""
        self.whole_cost_array = self.whole_ms_array + self.length_array * self.cm.linear_ms_per_token
        """Per document, its time kept whole: attention + linear (the LPT key of the whole_doc baseline)."""
        self.longest_first_array = np.argsort(-self.length_array, kind="stable")
        """Documents by decreasing length, ties by index."""

    @cached_property
    def whole_ms(self) -> list[float]:
        return self.whole_ms_array.tolist()

    @cached_property
    def whole_cost(self) -> list[float]:
        return self.whole_cost_array.tolist()

    @cached_property
    def longest_first(self) -> list[int]:
        return self.longest_first_array.tolist()

    # -- shares of one placement --------------------------------------------

    def shares(self, d: int, g0: int, k: int) -> tuple[Share, ...]:
        if k == 1:
            return whole_share(g0, self.lengths[d], self.whole_ms[d])
        key = (d, g0, k)
        cached = self._cache.get(key)
        if cached is None:
            if g0 and self._shift_ok[k]:
                cached = tuple((s[0] + g0, *s[1:]) for s in self.shares(d, 0, k))  # type: ignore[misc]
            else:
                cached = head_tail_shares(d, self.lengths[d], g0, k, self.cm, self.comm)
            self._cache[key] = cached
        return cached

    # -- one full run ---------------------------------------------------------

    def greedy(self, *, alpha: float) -> _Run:
        """Phase 1: place every document, longest first (see the module docstring).

        Args:
            alpha: documents may be split once whole placement would exceed ``alpha`` times the ideal
                per-rank load; 0 gives pure LPT (splits only what fits nowhere whole).
        """
        n, lengths, cm = self.n, self.lengths, self.cm
        lin = cm.linear_ms_per_token
        target = (math.fsum(self.whole_ms) + sum(lengths) * lin) / n
        limit = alpha * target
        split_floor = _SPLIT_CANDIDATE * target if alpha and self.ks else float("inf")
        if self.engine is not None:
            return self.engine.greedy(alpha, limit, split_floor)
        capacity = self.capacity
        whole_ms = self.whole_ms
        state = LoadState(cm, n, self.comm, capacity)
        tok, attn, local, dirty = state.tok, state.attn, state.local, state.dirty.add
        placement: list[Placement] = [(0, 1)] * len(lengths)
        whole_on = [(r, 1) for r in range(n)]  # shared placement tuples
        fills: dict[int, list[tuple[int, Segment]]] = {}
        key = [0.0] * n  # the whole_doc baseline's LPT key while placements are whole
        heap = [(0.0, r) for r in range(n)]
        heappop, heappush, heapreplace = heapq.heappop, heapq.heappush, heapq.heapreplace
        deviated = split_any = False
        blocked: list[tuple[int, int]] = []  # (-room, rank): ranks without room for the current document
        cost = self.whole_cost
        for d in self.longest_first:
            length = lengths[d]
            t, r = heap[0]
            if t == key[r] and tok[r] + length <= capacity and cost[d] < split_floor and not blocked:
                tok[r] += length  # fast path: whole on the least-loaded rank (LoadState.add inlined)
                w = whole_ms[d]
                attn[r] += w
                local[r] += w
                dirty(r)
                placement[d] = whole_on[r]
                key[r] = t + cost[d]
                heapreplace(heap, (key[r], r))
                continue
            w = whole_ms[d]
            while blocked and -blocked[0][0] >= length:  # documents only shrink: a rank regains a chance
                r = heappop(blocked)[1]
                heappush(heap, (key[r], r))
            r = -1
            while heap:
                t, cand = heap[0]  # r stays at the top of the heap until its key changes
                if t != key[cand]:
                    heappop(heap)  # stale entry
                elif tok[cand] + length <= capacity:
                    r = cand
                    break
                else:
                    heappop(heap)
                    heappush(blocked, (tok[cand] - capacity, cand))
            if r >= 0 and w + length * lin < split_floor:
                tok[r] += length  # fast path: whole on the least-loaded rank (LoadState.add inlined)
                attn[r] += w
                local[r] += w
                dirty(r)
                placement[d] = whole_on[r]
                key[r] += w + length * lin
                heapreplace(heap, (key[r], r))
                continue
            state.sync_tokens()
            choice = self._choose(state, d, r, limit, alpha)
            if choice is None or choice[1] != 1:
                split_any = True
                deviated = deviated or r >= 0
            if choice is None:
                pieces = self._fill_pieces(state, d)
                fills[d] = pieces
                shares = pieces_shares(pieces, cm, self.comm)
                choice = (0, FILL)
            else:
                shares = self.shares(d, *choice)
            placement[d] = choice
            state.add(shares)
            for share in shares:
                rank = share[0]
                key[rank] = key[rank] + w + length * lin if choice[1] == 1 else state.total(rank)
                heappush(heap, (key[rank], rank))
        state.sync_tokens()
        first_rank = np.fromiter(map(itemgetter(0), placement), dtype=np.int64, count=len(placement))
        by_rank = np.argsort(first_rank, kind="stable")
        bounds = np.searchsorted(first_rank[by_rank], np.arange(n + 1)).tolist()
        by_rank_list = by_rank.tolist()
        touch: list[set[int]] = [set(by_rank_list[bounds[r]:bounds[r + 1]]) for r in range(n)]
        for d in compress(range(len(placement)), map((1).__ne__, map(itemgetter(1), placement))):
            g0, k = placement[d]  # a split document touches every rank of its shares, not just the first
            touch[g0].discard(d)
            for share in (pieces_shares(fills[d], cm, self.comm) if k == FILL else self.shares(d, g0, k)):
                touch[share[0]].add(d)
        return _Run(placement=placement, fills=fills, state=state, touch=touch, deviated=deviated, split=split_any)

    def lpt_may_beat(self, makespan: float) -> bool:
        """Whether pure LPT (``greedy(alpha=0)``, the whole_doc baseline's placement) might end before
        ``makespan``: its rank keys, without communication, bound its time from below; a document that
        finds no room on the least-loaded rank makes the answer "maybe"."""
        if self.engine is not None:
            return self.engine.lpt_may_beat(makespan)
        heap = [(0.0, r) for r in range(self.n)]
        tok = [0] * self.n
        lengths, cost, capacity = self.lengths, self.whole_cost, self.capacity
        heapreplace = heapq.heapreplace
        for d in self.longest_first:
            t, r = heap[0]
            tok[r] += lengths[d]
            if tok[r] > capacity:
                return True
            heapreplace(heap, (t + cost[d], r))
        return max(heap)[0] <= makespan * (1.0 + 1e-9)  # margin: the keys sum in another order

    def _choose(self, state: LoadState, d: int, r: int, limit: float, alpha: float) -> Placement | None:
        """Placement of a new document: whole on ``r`` (the least-loaded rank with room; -1: none) or a split.

        Among options whose touched ranks stay within ``limit``, the one adding the least total time
        (whole first on ties); if none stays within, the same among options within ``alpha`` times the
        lowest max touched time.
        """
        candidates: list[tuple[Placement, float, float]] = []  # (option, max touched time, total increase)
        if r >= 0:
            t, inc, _ = state.peek_sum((), self.shares(d, r, 1))
            if t <= limit or not self.ks:
                return (r, 1)
            candidates.append(((r, 1), t, inc))
        totals = state.totals()
        for k in self.ks:
            blocks = sorted((max(totals[g0:g0 + k]), g0) for g0 in range(0, self.n, k))
            for _, g0 in blocks[:2]:
                t, inc, fits = state.peek_sum((), self.shares(d, g0, k), totals=totals)
                if fits:
                    candidates.append(((g0, k), t, inc))
        if not candidates:
            return None
        within = [c for c in candidates if c[1] <= limit]
        if not within:  # the ideal load is out of reach: relax it around the best achievable time
            soonest = min(c[1] for c in candidates)
            within = [c for c in candidates if c[1] <= soonest * max(alpha, 1.0)]
        return min(within, key=lambda c: (c[2], c[1]))[0]

    def _best_split(
        self, state: LoadState, d: int, remove: tuple[Share, ...], bound: float, totals: list[float] | None = None
    ) -> tuple[Placement | None, float]:
        """Best head-tail split of ``d`` (two least-loaded aligned groups per size k) under capacity."""
        if totals is None:
            totals = state.totals()
        best: Placement | None = None
        best_time = bound
        tries = self.n if self.small else 2
        for k in self.ks:
            blocks = sorted((max(totals[g0:g0 + k]), g0) for g0 in range(0, self.n, k))
            for _, g0 in blocks[:tries]:
                t, fits = state.peek(remove, self.shares(d, g0, k))
                if fits and t < best_time:
                    best, best_time = (g0, k), t
        return best, best_time

    def _fill_pieces(self, state: LoadState, d: int) -> list[tuple[int, Segment]]:
        """Cut ``d`` into contiguous pieces filling the least-loaded ranks with room (always fits: T <= N*C)."""
        pieces = []
        start = 0
        length = self.lengths[d]
        totals = state.totals()
        for r in sorted(range(self.n), key=lambda r: (totals[r], r)):
            room = self.capacity - state.tok[r]
            if room <= 0:
                continue
            end = min(length, start + room)
            pieces.append((r, Segment(doc=d, start=start, end=end)))
            start = end
            if start == length:
                break
        assert start == length, "total capacity checked by PlanRequest.contexts"
        return pieces

    # -- phase 2 --------------------------------------------------------------

    def improve(self, run: _Run) -> None:
        """Phase 2: local search on the slowest rank until no move improves (bounded rounds)."""
        if self.engine is not None:
            tiny = len(self.lengths) <= _LNS_DOCS  # (as in _compound)
            run.improve(_STOP_IMBALANCE_SMALL if self.small else _STOP_IMBALANCE, self.small,
                        (3 if tiny else 2, 2 if tiny else 1, self.n if tiny else _COMPOUND_TARGETS, _COMPOUND_EVICT))
            return
        state, placement, touch = run.state, run.placement, run.touch
        n = self.n
        lengths = self.lengths
        cost = self.whole_cost
        small = self.small
        stop = _STOP_IMBALANCE_SMALL if small else _STOP_IMBALANCE
        for _ in range(2 * n + 32):
            totals = state.totals()
            cur, r = max(zip(totals, range(0, -n, -1), strict=True))  # slowest rank, lowest index on ties
            r = -r
            if cur - math.fsum(totals) / n <= stop * cur:
                return
            low = [x for _, x in heapq.nsmallest(2, zip(totals, range(n), strict=True))]
            best_time = cur * (1.0 - 1e-9)
            best_move: tuple[int, Placement, int, Placement] | None = None  # (d, new, e, new_e); e < 0: no swap
            whole_here = sorted((cost[d], d) for d in touch[r] if placement[d][1] == 1)
            split_here = sorted((d for d in touch[r] if placement[d][1] >= 2), key=lambda d: (-lengths[d], d))
            # moves of whole documents to a least-loaded rank: try sizes around half the gap
            for s in low:
                if s == r:
                    continue
                gap = cur - totals[s]
                for _, d in self._near_items(whole_here, gap / 2):
                    t, fits = state.peek_shift(r, s, lengths[d], self.whole_ms[d])
                    if fits and t < best_time:
                        best_time, best_move = t, (d, (s, 1), -1, (0, 0))
            if best_move is None and whole_here:
                s = low[0]
                if s != r:
                    there = sorted((cost[e], e) for e in touch[s]
                                   if placement[e][1] == 1)
                    half_gap = (cur - totals[s]) / 2
                    # Without KV on either rank a swap moving cost c ends at max(cur - c, t_s + c): best
                    # near c = half the gap. Rank the pairs by that, score the closest exactly.
                    pairs = sorted((abs(w - w_e - half_gap), d, e) for w, d in whole_here[-_SWAP_DOCS:]
                                   for w_e, e in self._near_items(there, w - half_gap) if e != d)
                    for _, d, e in pairs if self.small else pairs[:_SWAP_SCORED]:
                        t, fits = state.peek_shift(r, s, lengths[d] - lengths[e], self.whole_ms[d] - self.whole_ms[e])
                        if fits and t < best_time:
                            best_time, best_move = t, (d, (s, 1), e, (r, 1))
            if best_move is not None and not small:
                self._move(state, placement, touch, best_move[0], best_move[1])
                if best_move[2] >= 0:
                    self._move(state, placement, touch, best_move[2], best_move[3])
                continue
            # split the largest whole documents of the slowest rank
            for _, d in whole_here[-2:]:
                option, t = self._best_split(state, d, self.shares(d, r, 1), best_time, totals)
                if option is not None:
                    best_time, best_move = t, (d, option, -1, (0, 0))
            # re-place split documents touching the slowest rank
            for d in split_here[:4]:
                old = self.shares(d, *placement[d])
                option, t = self._best_split(state, d, old, best_time, totals)
                if option is not None and option != placement[d]:
                    best_time, best_move = t, (d, option, -1, (0, 0))
                for s in low:
                    t, fits = state.peek(old, self.shares(d, s, 1))
                    if fits and t < best_time:
                        best_time, best_move = t, (d, (s, 1), -1, (0, 0))
            if best_move is None:
                if small and self._compound(run, r, cur, whole_here, split_here):
                    continue
                return
            d, new, e, new_e = best_move
            self._move(state, placement, touch, d, new)
            if e >= 0:
                self._move(state, placement, touch, e, new_e)

    def _compound(self, run: _Run, r: int, cur: float, whole_here: list, split_here: list[int]) -> bool:
        """Re-place one of the largest documents of the slowest rank ``r`` in every possible way, each time
        evicting the whole documents of the ranks it lands on and re-inserting them one by one where they
        end soonest. Keeps the first combination that brings every rank below ``cur``; else undoes all."""
        state, placement, touch = run.state, run.placement, run.touch
        tiny = len(self.lengths) <= _LNS_DOCS
        docs = [d for _, d in reversed(whole_here[-3 if tiny else -2:])] + split_here[:2 if tiny else 1]
        totals = state.totals()
        lowest = sorted(range(self.n), key=lambda x: (totals[x], x))[:self.n if tiny else _COMPOUND_TARGETS]
        for d in docs:
            options = [(s, 1) for s in lowest if s != r or placement[d][1] != 1]
            options += [(g0, k) for k in self.ks for g0 in range(0, self.n, k)]
            for option in options:
                if option == placement[d]:
                    continue
                landed = {share[0] for share in self.shares(d, *option)}
                evicted = sorted({e for t in landed for e in touch[t] if e != d and placement[e][1] == 1},
                                 key=lambda e: (-self.lengths[e], e))
                if len(evicted) > _COMPOUND_EVICT:
                    continue
                journal: list[tuple[int, Placement]] = [(d, placement[d])]
                self._move(state, placement, touch, d, option)
                totals = state.totals()
                targets = sorted(range(self.n), key=lambda x: (totals[x], x))[:self.n if tiny else _COMPOUND_TARGETS]
                for e in evicted:
                    current = self.shares(e, *placement[e])
                    best_s, best_t = placement[e][0], float("inf")
                    for s in sorted({placement[e][0], *targets}):
                        t, ok = state.peek(current, self.shares(e, s, 1))
                        if ok and t < best_t:
                            best_s, best_t = s, t
                    if best_s != placement[e][0]:
                        journal.append((e, placement[e]))
                        self._move(state, placement, touch, e, (best_s, 1))
                fits = all(state.tok[t] <= self.capacity for t in landed)
                if fits and max(state.totals()) < cur * (1.0 - 1e-9):
                    return True
                for doc, old in reversed(journal):
                    self._move(state, placement, touch, doc, old)
        return False

    def place(self, state: LoadState, touch: list[set[int]], d: int, option: Placement) -> None:
        """Add the shares of ``d`` under ``option`` to ``state`` and ``touch``."""
        shares = self.shares(d, *option)
        state.add(shares)
        for share in shares:
            touch[share[0]].add(d)

    def unplace(self, state: LoadState, touch: list[set[int]], d: int, option: Placement) -> None:
        """Remove the shares of ``d`` under ``option`` from ``state`` and ``touch``."""
        shares = self.shares(d, *option)
        state.add(shares, -1)
        for share in shares:
            touch[share[0]].discard(d)

    @staticmethod
    def _near_items(items: list[tuple[float, int]], value: float) -> list[tuple[float, int]]:
        """The entries of the sorted ``(time, doc)`` list whose time is nearest ``value`` (two each side)."""
        i = bisect_left(items, (value, -1))
        return items[max(0, i - 2):i + 2]

    def _move(
        self, state: LoadState, placement: list[Placement], touch: list[set[int]], d: int, new: Placement
    ) -> None:
        old_shares = self.shares(d, *placement[d])
        state.add(old_shares, -1)
        for s in old_shares:
            touch[s[0]].discard(d)
        placement[d] = new
        new_shares = self.shares(d, *new)
        state.add(new_shares)
        for s in new_shares:
            touch[s[0]].add(d)


def search_comm_of(comm: CommMode) -> CommMode:
    """The mode the search scores moves under: ``comm`` itself when its traffic is additive per
    document, else the closest that is (candidates are then re-scored exactly under ``comm``):
    sharding-aware for all-gather, exact-need for node_dedup (whose stripes couple documents)."""
    if comm is CommMode.ALL_GATHER:
        return CommMode.SHARDING_AWARE
    return CommMode.EXACT_NEED if comm is CommMode.NODE_DEDUP else comm


def _exact_makespan(search: PlacementSearch, placement: list[Placement], fills: dict, comm: CommMode) -> float:
    """Makespan of a placement under ``comm`` with the evaluator's formula (exact also for ALL_GATHER)."""
    if comm is CommMode.NODE_DEDUP:  # by the plan evaluator itself
        layout = placements_layout(search.ctx, placement, fills)
        if any(sum(e - s for _, s, e in segments) > search.capacity for segments in layout.rank_segments):
            return float("inf")
        return layout_makespan(search.ctx, layout, comm)
    if search.engine is not None and comm is search.comm and not fills:
        return search.engine.makespan(placement)
    state = LoadState(search.cm, search.n, comm, search.capacity)
    for d, (g0, k) in enumerate(placement):
        if k == FILL:
            state.add(pieces_shares(fills[d], search.cm, comm))
        elif k == 1 or comm is search.comm:
            state.add(search.shares(d, g0, k))
        else:
            state.add(pieces_shares(head_tail_segments(d, search.lengths[d], range(g0, g0 + k)), search.cm, comm))
    if any(t > search.capacity for t in state.tok):
        return float("inf")
    return max(state.totals())


def _whole_only_lower_bound(search: PlacementSearch) -> float:
    """Lower bound on any all-whole layout: the largest document alone, or the mean rank time."""
    return max(max(search.whole_cost), math.fsum(search.whole_cost) / search.n)


def _per_doc_lower_bound(search: PlacementSearch) -> float:
    """Lower bound on the makespan of All-Per-Doc: the mean rank time without exposed comm.

    A document of length L head-tail over N ranks is cut into min(L, 2N) chunks of at most
    ceil(L / 2N) queries, each reading at most L keys, so its attention is at least one overhead per
    chunk plus its FLOPs at the best efficiency any chunk's effective length can reach. Computed in
    floating point over arrays: callers compare it with a relative margin far above its rounding.
    """
    cm = search.cm
    n = search.n
    if search.engine is not None:
        return Attention(cm).per_doc_lower_bound(search.length_array, n, cm.linear_ms_per_token)
    lengths = search.length_array.astype(np.float64)
    longest = np.ceil(lengths / (2 * n))
    log_q = np.log2(np.maximum(np.floor(np.sqrt(2.0 * longest * lengths)), 1.0))
    lq, ev = np.array(cm._eff_log_q), np.array(cm._eff_val)
    reached = np.searchsorted(lq, log_q, side="right")  # curve points at or below each effective length
    eff = np.maximum(np.interp(log_q, lq, ev), np.concatenate([[0.0], np.maximum.accumulate(ev)])[reached])
    chunks = np.minimum(lengths, 2 * n)
    flops = 4.0 * cm.num_heads * cm.head_dim * (lengths * (lengths + 1) / 2)
    attention = (chunks * cm.attention_segment_overhead_ms + flops / (cm.attention_tflops * 1e9 * eff)).sum()
    linear = lengths.sum() * cm.linear_ms_per_token
    return float(attention * (1.0 + cm.attention_backward_ratio) + linear) / n


Fills = dict[int, list[tuple[int, Segment]]]
"""Pieces ``(rank, segment)`` of the documents cut by the capacity fallback (placement k = 0)."""


def heuristic_placements(
    ctx: PlanContext, comm: CommMode, *, native: bool | None = None
) -> tuple[list[Placement], Fills]:
    """Run the heuristic; returns per-document placements and the pieces of fill-cut documents.

    ``native``: as for :class:`PlacementSearch` (the compiled engine gives the same placements).
    """
    from flashcp_planner.strategies.recreate import ruin_recreate  # (it builds on this module)

    search_comm = search_comm_of(comm)
    search = PlacementSearch(ctx, search_comm, native=native)

    def score(run: _Run) -> float:
        if comm is search_comm:
            return max(run.state.totals())
        return _exact_makespan(search, run.placement, run.fills, comm)

    # Under ALL_GATHER the search scores sharding-aware traffic, so improving can raise the exact time:
    # the greedy placements are then candidates before improving too.
    exact = comm is search_comm
    run = search.greedy(alpha=1.0)
    best = (float("inf"), list(run.placement), run.fills) if exact else (score(run), list(run.placement), run.fills)
    search.improve(run)
    if score(run) < best[0]:
        best = (score(run), list(run.placement), run.fills)
    best_run = run
    alphas: tuple[float, ...] = ()
    if run.split and search.small:
        alphas = (*_ALPHAS, 0.0)
    elif run.deviated and best[0] > _whole_only_lower_bound(search) and search.lpt_may_beat(best[0]):
        alphas = (0.0,)  # pure LPT could still win: run it (never worse than the whole_doc baseline)
    for alpha in alphas:
        other = search.greedy(alpha=alpha)
        if not exact and score(other) < best[0]:
            best = (score(other), list(other.placement), other.fills)
        if alpha or score(other) < best[0] or not exact:  # (exact) improving only lowers it further
            search.improve(other)
            if score(other) < best[0]:
                best = (score(other), list(other.placement), other.fills)
                best_run = other
    if len(search.lengths) <= _LNS_DOCS and 1 < search.n <= _SMALL_CP:
        ruin_recreate(search, best_run, _LNS_BUDGET)
        if score(best_run) < best[0]:
            best = (score(best_run), list(best_run.placement), best_run.fills)
    # The margin dwarfs the bound's rounding, so whether All-Per-Doc is scored never changes the result.
    if search.n > 1 and _per_doc_lower_bound(search) < best[0] * (1.0 + 1e-9):
        per_doc = [(0, search.n)] * len(search.lengths)
        per_doc_ms = _exact_makespan(search, per_doc, {}, comm)
        if per_doc_ms < best[0]:
            best = (per_doc_ms, per_doc, {})
    return best[1], best[2]


class FlashCPHeuristic:
    """Whole-Doc, Per-Doc or sub-group head-tail per document, by greedy + local search on the cost model."""

    name: ClassVar[str] = "flashcp"
    description: ClassVar[str] = "FlashCP heuristic: whole-doc / per-doc / sub-group per document, exact-need KV"
    is_optimal: ClassVar[bool] = False
    default_comm: ClassVar[CommMode] = CommMode.EXACT_NEED

    def layout(self, ctx: PlanContext) -> Layout:
        comm = ctx.options.comm or self.default_comm
        placement, fills = heuristic_placements(ctx, comm)
        return placements_layout(ctx, placement, fills)
