"""The final search of small instances: ruin and recreate, by bounded depth-first search.

Used by :func:`flashcp_planner.strategies.flashcp.heuristic_placements` on instances of up to
``_LNS_DOCS`` documents and N <= 16, after greedy and local search: reaching the optimum there can take
re-packing several ranks at once, which no single improving move does. Deterministic, bounded by
node counts.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import TYPE_CHECKING

from flashcp_planner.model import CommMode
from flashcp_planner.strategies.flashcp import FILL, Placement
from flashcp_planner.strategies.shares import LoadState, Share

if TYPE_CHECKING:
    from flashcp_planner.strategies.flashcp import PlacementSearch, _Run

__all__ = ["ruin_recreate"]

_LNS_RANKS = 3
"""The ruin-and-recreate search frees the slowest rank with every set of up to this many other ranks."""
_LNS_NODES = 60
"""Search nodes per freed set and child order."""


def ruin_recreate(search: PlacementSearch, run: _Run, nodes: int) -> None:
    """Large-neighbourhood search: free the slowest rank together with each set of up to
    :data:`_LNS_RANKS` other ranks (least-loaded first) and search for a re-insertion of the freed
    documents under which every rank they touch ends below the makespan (:func:`_recreate`: a depth-first
    search over every option of every freed document, :data:`_LNS_NODES` nodes per set, soonest-ending
    options first, then best fit first). The first one found is applied and the sweep restarts from the
    new slowest rank: the sorted vector of rank times decreases strictly. Stops when a whole sweep finds
    nothing or after ``nodes`` search nodes in all."""
    if search.engine is not None:  # the engine's run: the compiled twin of this function
        run.ruin_recreate(nodes, _LNS_RANKS, _LNS_NODES)
        return
    state, placement, touch = run.state, run.placement, run.touch
    n = search.n
    tables: dict[int, tuple[float, list[tuple[Placement, tuple[Share, ...], float]]]] = {}
    left = nodes
    improved = True
    while improved and left > 0:
        improved = False
        totals = state.totals()
        bound = max(totals) * (1.0 - 1e-9)
        r = max(range(n), key=lambda x: (totals[x], -x))
        if all(placement[d][1] == FILL for d in touch[r]):
            return  # only pieces of fill-cut documents: nothing to re-place
        others = sorted((x for x in range(n) if x != r), key=lambda x: (totals[x], x))
        tried: set[tuple[int, ...]] = set()
        for m in range(1, min(_LNS_RANKS, n - 1) + 1):
            for subset in combinations(others, m):
                freed = tuple(sorted({d for t in (r, *subset) for d in touch[t] if placement[d][1] != FILL},
                                     key=lambda d: (-search.lengths[d], d)))
                if freed in tried:  # the same documents as an earlier set: the same search
                    continue
                tried.add(freed)
                _fill_tables(search, freed, tables)
                for d in freed:
                    search.unplace(state, touch, d, placement[d])
                for best_fit in (False, True):
                    found, used = _recreate(search, state, freed, bound, min(_LNS_NODES, left), best_fit, tables)
                    left -= used
                    if found is not None:
                        for d, option in zip(freed, found, strict=True):
                            placement[d] = option
                        improved = True
                        break
                    if left <= 0:
                        break
                for d in freed:
                    search.place(state, touch, d, placement[d])
                if improved or left <= 0:
                    break
            if improved or left <= 0:
                break


def _fill_tables(search: PlacementSearch, docs: tuple[int, ...], tables: dict) -> None:
    """Add the table of :func:`_recreate` of every document of ``docs`` not in ``tables`` yet."""
    lin = search.cm.linear_ms_per_token
    for d in docs:
        if d not in tables:
            splits = [((g0, k), shares, math.fsum(share[1] * lin + share[2] for share in shares))
                      for k in search.ks for g0 in range(0, search.n, k) for shares in (search.shares(d, g0, k),)]
            tables[d] = (min([search.lengths[d] * lin + search.whole_ms[d], *(split[2] for split in splits)]), splits)


def _recreate(
    search: PlacementSearch, state: LoadState, docs: tuple[int, ...], bound: float, nodes: int, best_fit: bool,
    tables: dict[int, tuple[float, list[tuple[Placement, tuple[Share, ...], float]]]],
) -> tuple[list[Placement] | None, int]:
    """Depth-first search for placements of the (unplaced) ``docs``, in this order, under which every
    rank they touch ends below ``bound`` and within capacity. Children are tried soonest-ending first
    (with ``best_fit``, latest-ending first); whole placements on ranks in identical states without KV
    traffic are tried once.

    Cuts (exact, as rank times only grow when shares are added, overlap_fraction <= 1): an option that
    would end a rank at or past ``bound`` is not tried; nor one after which the summed work (linear +
    attention, a lower bound on a rank's time) of all ranks plus the least work of every document still
    to place reaches N x ``bound``.

    Args:
        tables: per document of ``docs``, its least work over all options and its head-tail options with
            their shares and work (:func:`_fill_tables`).

    Returns:
        The placement of each of ``docs`` (``state`` is left as it was) or None; the nodes expanded.
    """
    n = search.n
    tok, attn, local = state.tok, state.attn, state.local
    ri, rx, si, sx = state.ri, state.rx, state.si, state.sx
    capacity, time, gpn = search.capacity, state.time, search.cm.gpus_per_node
    lin = search.cm.linear_ms_per_token
    fast = state.comm is not CommMode.ALL_GATHER
    lengths, whole_ms = search.lengths, search.whole_ms
    rest = [0.0] * (len(docs) + 1)  # least work of docs[i:]
    for i in range(len(docs) - 1, -1, -1):
        rest[i] = rest[i + 1] + tables[docs[i]][0]
    area = n * bound
    totals = state.totals()
    work = sum(tok) * lin + math.fsum(attn)

    def children(i: int) -> list[tuple[Placement, tuple[Share, ...], float]]:
        d = docs[i]
        length, w = lengths[d], whole_ms[d]
        room = area - work - rest[i + 1]
        out = []
        whole_work = length * lin + w
        if whole_work < room:
            seen = set()
            for g0 in range(n):
                if tok[g0] + length > capacity:
                    continue
                if fast and not (ri[g0] or rx[g0] or si[g0] or sx[g0]):
                    signature = (tok[g0], attn[g0], g0 // gpn)
                    if signature in seen:
                        continue
                    seen.add(signature)
                    t = (tok[g0] + length) * lin + (attn[g0] + w)  # LoadState.time without traffic
                else:
                    t = time(tok[g0] + length, attn[g0] + w, local[g0] + w, ri[g0], rx[g0], si[g0], sx[g0], g0)
                if t < bound:
                    out.append((-t if best_fit else t, t - totals[g0], (g0, 1), whole_work))
        for option, shares, option_work in tables[d][1]:
            if option_work >= room:
                continue
            worst = inc = 0.0
            for s, s_tok, s_attn, s_local, s_ri, s_rx, s_si, s_sx in shares:
                if tok[s] + s_tok > capacity:
                    break
                t = time(tok[s] + s_tok, attn[s] + s_attn, local[s] + s_local, ri[s] + s_ri, rx[s] + s_rx,
                         si[s] + s_si, sx[s] + s_sx, s)
                if t >= bound:
                    break
                inc += t - totals[s]
                if t > worst:
                    worst = t
            else:
                out.append((-worst if best_fit else worst, inc, option, option_work))
        out.sort()
        return [(option, search.shares(docs[i], *option), option_work) for _, _, option, option_work in out]

    chosen: list[tuple[Placement, tuple[Share, ...], float]] = []
    stack = [iter(children(0))]
    used = 1
    found = None
    while stack:
        if len(chosen) == len(stack):  # undo the previous sibling
            _, shares, option_work = chosen.pop()
            state.add(shares, -1)
            work -= option_work
            for share in shares:
                totals[share[0]] = state.total(share[0])
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
            continue
        _, shares, option_work = child
        state.add(shares)
        work += option_work
        for share in shares:
            totals[share[0]] = state.total(share[0])
        chosen.append(child)
        if len(chosen) == len(docs):
            found = [option for option, _, _ in chosen]
            break
        if used >= nodes:
            break
        used += 1
        stack.append(iter(children(len(chosen))))
    for _, shares, _ in chosen:
        state.add(shares, -1)
    return found, used
