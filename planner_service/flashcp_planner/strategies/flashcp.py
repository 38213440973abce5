"""The FlashCP heuristic: per document Whole-Doc, Per-Doc or sub-group head-tail, minimising the makespan.

Search, in three phases, on the additive per-rank shares of
:mod:`flashcp_planner.strategies.shares` (so every candidate is scored with the
evaluator's own formula, incrementally, without building a plan):

1. **Greedy.** Documents longest first. A document goes whole onto the
   least-loaded rank with room (LPT). If that would push the rank past the
   ideal per-rank load (``target`` variant), or the document fits on no rank,
   the best head-tail split over an aligned group of k ranks is considered
   (k a power of two dividing N, so groups of k <= gpus_per_node never straddle
   nodes; k = N is Per-Doc). If no head-tail split fits the capacity either,
   the document is cut into pieces that fill the ranks with room.
2. **Improvement.** Repeatedly take the slowest rank and try: moving one of its
   whole documents to a least-loaded rank, swapping one with a document of a
   least-loaded rank, splitting one of its documents over a group, or
   re-placing a split document that touches it (other k, other group, whole).
   The best move is applied if every rank it touches ends below the old
   makespan, so the sorted vector of rank times decreases strictly.
3. **Candidates.** The greedy is run with and without the ``target`` rule when
   they differ; the pure-LPT run starts from exactly the ``whole_doc``
   baseline's placement, so the result is never worse than it. All-Per-Doc is
   scored too (skipped when a lower bound shows it cannot win). The best
   layout is returned; ties keep the earlier candidate. No randomness.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import ClassVar

from flashcp_planner.layout import Layout, head_tail_segments, sharding_of, whole
from flashcp_planner.model import CommMode, DocSharding, Segment, ShardingKind
from flashcp_planner.request import PlanContext
from flashcp_planner.strategies.shares import LoadState, Share, pieces_shares, whole_share

__all__ = ["FILL", "FlashCPHeuristic", "Placement", "PlacementSearch", "group_sizes", "heuristic_placements",
           "placements_layout"]

Placement = tuple[int, int]
"""``(first_rank, k)``: k = 1 whole on ``first_rank``; k >= 2 head-tail over ranks
``first_rank .. first_rank + k - 1``; k = 0 cut into fill pieces (see :class:`PlacementSearch`)."""

FILL = 0
_SPLIT_CANDIDATE = 0.25
"""The greedy considers splitting only documents whose whole time is at least this fraction of the ideal load."""
_STOP_IMBALANCE = 1e-3
"""Stop improving once the slowest rank is within this fraction of the mean (large instances)."""
_STOP_IMBALANCE_SMALL = 1e-7
_SMALL_INSTANCE = 64
"""Up to this many documents every improvement move is tried each round; above, splits are tried only
when no cheaper whole-document move improves."""


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


class PlacementSearch:
    """Shares of every placement of one micro-batch (cached) and the greedy / improvement phases over them."""

    def __init__(self, ctx: PlanContext, comm: CommMode) -> None:
        self.ctx = ctx
        self.lengths = ctx.doc_lengths
        self.n = ctx.cp_size
        self.cm = ctx.cost_model
        self.capacity = ctx.capacity
        self.comm = comm
        self.ks = group_sizes(self.n, ctx.options.allow_sub_group)
        self.whole_ms = [self.cm.attention_ms(0, length) for length in self.lengths]
        self._cache: dict[tuple[int, int, int], tuple[Share, ...]] = {}
        gpn = self.cm.gpus_per_node
        self._shift_ok = {k: (k <= gpn and gpn % k == 0) or k % gpn == 0 for k in self.ks}

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
                pieces = head_tail_segments(d, self.lengths[d], range(g0, g0 + k))
                cached = pieces_shares(pieces, self.cm, self.comm)
            self._cache[key] = cached
        return cached

    # -- one full run ---------------------------------------------------------

    def greedy(self, *, use_target: bool) -> _Run:
        """Phase 1: place every document, longest first (see the module docstring)."""
        n, lengths, cm = self.n, self.lengths, self.cm
        capacity = self.capacity
        whole_ms = self.whole_ms
        state = LoadState(cm, n, self.comm, capacity)
        tok, attn, local = state.tok, state.attn, state.local
        placement: list[Placement] = [(0, 1)] * len(lengths)
        fills: dict[int, list[tuple[int, Segment]]] = {}
        lin = cm.linear_ms_per_token
        target = (sum(whole_ms) + sum(lengths) * lin) / n
        split_floor = _SPLIT_CANDIDATE * target if use_target and self.ks else float("inf")
        key = [0.0] * n  # the whole_doc baseline's LPT key while placements are whole
        heap = [(0.0, r) for r in range(n)]
        heappop, heappush = heapq.heappop, heapq.heappush
        deviated = False
        for d in sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True):  # stable: ties by index
            length = lengths[d]
            w = whole_ms[d]
            skipped = []
            r = -1
            while heap:
                t, cand = heappop(heap)
                if t != key[cand]:
                    continue  # stale entry
                if tok[cand] + length <= capacity:
                    r = cand
                    break
                skipped.append((t, cand))
            for item in skipped:
                heappush(heap, item)
            if r >= 0 and w + length * lin < split_floor:
                tok[r] += length  # fast path: whole on the least-loaded rank (LoadState.add inlined)
                attn[r] += w
                local[r] += w
                state.add_tokens(r, length)
                placement[d] = (r, 1)
                key[r] += w + length * lin
                heappush(heap, (key[r], r))
                continue
            if r >= 0:
                heappush(heap, (key[r], r))
                choice: Placement | None = (r, 1)
                whole_time = state.time(tok[r] + length, attn[r] + w, local[r] + w, state.ri[r], state.rx[r],
                                        state.si[r], state.sx[r], r)
                if whole_time > target:
                    split, split_time = self._best_split(state, d, (), whole_time)
                    if split is not None and split_time < whole_time:
                        choice = split
                        deviated = True
            else:
                choice, _ = self._best_split(state, d, (), float("inf"))
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
        touch: list[set[int]] = [set() for _ in range(n)]
        for d, (g0, k) in enumerate(placement):
            if k == 1:
                touch[g0].add(d)
            else:
                for share in (pieces_shares(fills[d], cm, self.comm) if k == FILL else self.shares(d, g0, k)):
                    touch[share[0]].add(d)
        return _Run(placement=placement, fills=fills, state=state, touch=touch, deviated=deviated)

    def _best_split(
        self, state: LoadState, d: int, remove: tuple[Share, ...], bound: float, totals: list[float] | None = None
    ) -> tuple[Placement | None, float]:
        """Best head-tail split of ``d`` (two least-loaded aligned groups per size k) under capacity."""
        if totals is None:
            totals = state.totals()
        best: Placement | None = None
        best_time = bound
        for k in self.ks:
            blocks = sorted((max(totals[g0:g0 + k]), g0) for g0 in range(0, self.n, k))
            for _, g0 in blocks[:2]:
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
        state, placement, touch = run.state, run.placement, run.touch
        n = self.n
        lengths = self.lengths
        small = len(lengths) <= _SMALL_INSTANCE
        stop = _STOP_IMBALANCE_SMALL if small else _STOP_IMBALANCE
        for _ in range(2 * n + 32):
            totals = state.totals()
            r = max(range(n), key=lambda x: (totals[x], -x))
            cur = totals[r]
            if cur - sum(totals) / n <= stop * cur:
                return
            low = sorted(range(n), key=lambda x: (totals[x], x))[:2]
            best_time = cur * (1.0 - 1e-9)
            best_move: tuple[int, Placement, int, Placement] | None = None  # (d, new, e, new_e); e < 0: no swap
            whole_here = sorted((self.whole_ms[d] + lengths[d] * state._lin, d) for d in touch[r] if placement[d][1] == 1)
            split_here = sorted((d for d in touch[r] if placement[d][1] >= 2), key=lambda d: (-lengths[d], d))
            # moves of whole documents to a least-loaded rank: try sizes around half the gap
            for s in low:
                if s == r:
                    continue
                gap = cur - totals[s]
                for d in self._near(whole_here, gap / 2):
                    t, fits = state.peek(self.shares(d, r, 1), self.shares(d, s, 1))
                    if fits and t < best_time:
                        best_time, best_move = t, (d, (s, 1), -1, (0, 0))
            if best_move is None and whole_here:
                s = low[0]
                if s != r:
                    there = sorted((self.whole_ms[e] + lengths[e] * state._lin, e) for e in touch[s]
                                   if placement[e][1] == 1)
                    half_gap = (cur - totals[s]) / 2
                    for w, d in whole_here[-64:]:
                        for e in self._near(there, w - half_gap):
                            if e == d:
                                continue
                            t, fits = state.peek(self.shares(d, r, 1) + self.shares(e, s, 1),
                                                 self.shares(d, s, 1) + self.shares(e, r, 1))
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
                return
            d, new, e, new_e = best_move
            self._move(state, placement, touch, d, new)
            if e >= 0:
                self._move(state, placement, touch, e, new_e)

    @staticmethod
    def _near(items: list[tuple[float, int]], value: float) -> list[int]:
        """Documents of the sorted ``(time, doc)`` list whose time is nearest ``value`` (two each side)."""
        import bisect

        i = bisect.bisect_left(items, (value, -1))
        return [d for _, d in items[max(0, i - 2):i + 2]]

    def _move(self, state: LoadState, placement: list[Placement], touch: list[set[int]], d: int, new: Placement) -> None:
        old_shares = self.shares(d, *placement[d])
        state.add(old_shares, -1)
        for s in old_shares:
            touch[s[0]].discard(d)
        placement[d] = new
        new_shares = self.shares(d, *new)
        state.add(new_shares)
        for s in new_shares:
            touch[s[0]].add(d)


def _exact_makespan(search: PlacementSearch, placement: list[Placement], fills: dict, comm: CommMode) -> float:
    """Makespan of a placement under ``comm`` with the evaluator's formula (exact also for ALL_GATHER)."""
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


def _per_doc_lower_bound(search: PlacementSearch) -> float:
    """Lower bound on the makespan of All-Per-Doc: average rank load with two segment overheads per long doc."""
    cm = search.cm
    n = search.n
    long_docs = sum(1 for length in search.lengths if length >= 2 * n)
    overhead = 2 * long_docs * cm.attention_segment_overhead_ms * (1.0 + cm.attention_backward_ratio)
    ideal = sum(cm.attention_ideal_ms(length) for length in search.lengths)
    return (ideal + sum(search.lengths) * cm.linear_ms_per_token) / n + overhead


def heuristic_placements(ctx: PlanContext, comm: CommMode) -> tuple[list[Placement], dict[int, list[tuple[int, Segment]]]]:
    """Run the heuristic; returns per-document placements and the pieces of fill-cut documents."""
    search_comm = CommMode.SHARDING_AWARE if comm is CommMode.ALL_GATHER else comm
    search = PlacementSearch(ctx, search_comm)

    def score(run: _Run) -> float:
        if comm is search_comm:
            return max(run.state.totals())
        return _exact_makespan(search, run.placement, run.fills, comm)

    run = search.greedy(use_target=True)
    search.improve(run)
    best = (score(run), run.placement, run.fills)
    if run.deviated:
        lpt = search.greedy(use_target=False)
        if score(lpt) < best[0]:  # improving only lowers it further
            search.improve(lpt)
            best = (score(lpt), lpt.placement, lpt.fills)
    if search.n > 1 and _per_doc_lower_bound(search) < best[0]:
        per_doc = [(0, search.n)] * len(search.lengths)
        per_doc_ms = _exact_makespan(search, per_doc, {}, comm)
        if per_doc_ms < best[0]:
            best = (per_doc_ms, per_doc, {})
    return best[1], best[2]


def placements_layout(ctx: PlanContext, placement: list[Placement], fills: dict[int, list[tuple[int, Segment]]]) -> Layout:
    """Turn per-document placements into a :class:`Layout` (segments per rank, sharding per document)."""
    n = ctx.cp_size
    rank_segments: list[list[Segment]] = [[] for _ in range(n)]
    documents: list[DocSharding] = []
    for d, length in enumerate(ctx.doc_lengths):
        g0, k = placement[d]
        if k == 1:
            seg, sharding = whole(d, length, g0)
            rank_segments[g0].append(seg)
        else:
            if k == FILL:
                pieces = fills[d]
                group: range | list[int] = [r for r, _ in pieces]
                kind = ShardingKind.PACKED
            else:
                group = range(g0, g0 + k)
                pieces = head_tail_segments(d, length, group)
                kind = ShardingKind.PER_DOC if k == n else ShardingKind.SUB_GROUP
            for rank, seg in pieces:
                rank_segments[rank].append(seg)
            sharding = sharding_of(d, group, pieces, kind)
        documents.append(sharding)
    return Layout(rank_segments=tuple(tuple(s) for s in rank_segments), documents=tuple(documents))


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
