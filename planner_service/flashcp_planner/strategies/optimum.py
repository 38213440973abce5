"""Exact optimum of the FlashCP cost model with OR-Tools CP-SAT (small instances).

Same choices per document as the heuristic (:func:`document_options`): whole on
any rank r, head-tail over every aligned group of every allowed size k (k = N
is Per-Doc), plus, if the heuristic had to cut a document into fill pieces,
that cut. One boolean per (document, option), exactly one per document.

Per rank r, with every time scaled to integers by :func:`_units` (the only
place floats become integers)::

    tokens_r  = sum x * tokens                      <= capacity
    work_r    = sum x * (tokens * linear + attention)
    comm_r    = sum_c latency_c * b[r, c] + sum x * bytes_time
    exposed_r = max(0, comm_r - sum x * overlap * local_attention)
    makespan >= work_r + exposed_r                   minimise makespan

The max is written as two inequalities, ``makespan >= work_r`` and ``makespan >=
work_r + comm_r - overlap_r``: since the objective minimises the makespan this is
the same optimum as an ``add_max_equality`` on an exposed-comm variable, with a
much tighter LP relaxation (on 6 random instances of 3-12 documents the
``add_max_equality`` form proved 2 optimal in 5 s, this form all 6 in < 3.2 s).

``b[r, c]`` is a boolean per link class c (receive / send x intra / inter
node) implied by every selected option that moves bytes of class c at r, so
the latency is paid iff bytes move, as in :func:`flashcp_planner.cost.rank_costs`.
The solver is warm-started (``add_hint``) from the heuristic; its plan is
re-scored with the float evaluator and the heuristic's layout is returned
instead if it is better, so the result is never worse than the hint.

Deterministic: the search stops on CP-SAT's *deterministic* time
(``max_deterministic_time``, work units of roughly a second on an idle core),
half of ``options.time_limit_s``, and with ``options.num_workers > 1`` runs
CP-SAT's deterministic parallel mode (``interleave_search``): where it stops
does not depend on thread timing or machine load, so a fixed request gets the
same plan on every call and every rank. Wall-clock time is a backstop only
(:func:`wall_limit_s`); a solve that reaches it (a machine doing less than half
a work unit per second) may differ between calls. On a 2-core machine at load
~7, ``num_workers=1`` stayed deterministic; 8 interleaved workers on 2 cores
reached the backstop.
"""

from __future__ import annotations

import time
from typing import ClassVar

from flashcp_planner.cost import lower_bound_ms
from flashcp_planner.layout import Layout, layout_makespan
from flashcp_planner.model import CommMode, Optimality, Segment
from flashcp_planner.request import PlanContext
from flashcp_planner.strategies.flashcp import (
    FILL,
    Fills,
    Placement,
    PlacementSearch,
    heuristic_placements,
    placements_layout,
)
from flashcp_planner.strategies.shares import Share, pieces_shares

__all__ = ["OptimumCPSAT", "document_options", "option_shares", "wall_limit_s"]

_SCALE = 1e6
"""Integer units per millisecond in the CP-SAT model (1 unit = 1 ns of predicted time)."""


DETERMINISTIC_SHARE = 0.5
"""Deterministic time limit of a solve, as a share of ``options.time_limit_s``."""


def wall_limit_s(time_limit_s: float) -> float:
    """Wall-clock backstop of a solve with ``options.time_limit_s``: twice the limit, at most 10 s more.

    Stays under the service's wait for an exact search (the limit plus 15 s).
    """
    return time_limit_s + min(time_limit_s, 10.0)


def _units(ms: float) -> int:
    return round(ms * _SCALE)


def document_options(ctx: PlanContext, fills: Fills | None = None) -> list[list[Placement]]:
    """Every placement the optimum considers, per document (whole on r if it fits, every aligned group)."""
    search = PlacementSearch(ctx, CommMode.EXACT_NEED)
    out = []
    for d, length in enumerate(ctx.doc_lengths):
        options: list[Placement] = [(r, 1) for r in range(ctx.cp_size)] if length <= ctx.capacity else []
        for k in search.ks:
            options.extend((g0, k) for g0 in range(0, ctx.cp_size, k))
        if fills and d in fills:
            options.append((0, FILL))
        out.append(options)
    return out


def option_shares(
    search: PlacementSearch, d: int, option: Placement, fills: dict[int, list[tuple[int, Segment]]], comm: CommMode
) -> tuple[Share, ...]:
    """Shares of one option; ``search`` must have been built for ``comm``."""
    if option[1] == FILL:
        return pieces_shares(fills[d], search.cm, comm)
    return search.shares(d, *option)


def _rank_terms(search: PlacementSearch, shares: tuple[Share, ...], comm: CommMode) -> dict[int, list]:
    """Per rank touched (every rank under ALL_GATHER): [work_ms, overlap*local_ms, bytes_ms, traffic tokens x4]."""
    cm = search.cm
    lin = cm.linear_ms_per_token
    terms: dict[int, list] = {}
    for r, tok, attn, local, ri, rx, si, sx in shares:
        terms[r] = [tok * lin + attn, cm.overlap_fraction * local, ri, rx, si, sx]
    if comm is CommMode.ALL_GATHER:
        gpn = cm.gpus_per_node
        n = search.n
        owned = {s[0]: s[1] for s in shares}
        for r in range(n):
            entry = terms.setdefault(r, [0.0, 0.0, 0, 0, 0, 0])
            node = r // gpn
            node_size = min(gpn, n - node * gpn)
            for s, tok in owned.items():
                if s != r:
                    entry[2 if s // gpn == node else 3] += tok
            mine = owned.get(r, 0)
            entry[4] += mine * (node_size - 1)
            entry[5] += mine * (n - node_size)
    kv = cm.kv_bytes_per_token
    bw = (cm.intra_node_gbps * 1e6, cm.inter_node_gbps * 1e6, cm.intra_node_gbps * 1e6, cm.inter_node_gbps * 1e6)
    out = {}
    for r, (work, overlap, *traffic) in terms.items():
        bytes_ms = sum(tokens * kv / b for tokens, b in zip(traffic, bw, strict=True))
        out[r] = [work, overlap, bytes_ms, [tokens > 0 for tokens in traffic]]
    return out


class OptimumCPSAT:
    """Minimum makespan of the cost model over the heuristic's option space, by CP-SAT."""

    name: ClassVar[str] = "optimum"
    description: ClassVar[str] = "exact optimum of the same cost model (OR-Tools CP-SAT, warm-started, time-limited)"
    is_optimal: ClassVar[bool] = True
    default_comm: ClassVar[CommMode] = CommMode.EXACT_NEED

    def layout(self, ctx: PlanContext) -> Layout:
        try:
            from ortools.sat.python import cp_model
        except ImportError:
            raise ImportError(
                "the 'optimum' strategy needs OR-Tools; install the extra: pip install 'flashcp[ilp]'"
            ) from None
        started = time.perf_counter()
        comm = ctx.options.comm or self.default_comm
        cm = ctx.cost_model
        n = ctx.cp_size
        hint, fills = heuristic_placements(ctx, comm)
        heuristic_layout = placements_layout(ctx, hint, fills)
        heuristic_ms = layout_makespan(ctx, heuristic_layout, comm)
        # The model prices the search's mode; under node_dedup (not additive per document) its
        # optimum is re-scored exactly and proves nothing: status "feasible", the plain lower bound.
        proves = comm is not CommMode.NODE_DEDUP
        search_comm = comm if proves else CommMode.EXACT_NEED
        search = PlacementSearch(ctx, search_comm)
        options = document_options(ctx, fills)

        model = cp_model.CpModel()
        x: list[list] = []
        work = [[] for _ in range(n)]
        overlap = [[] for _ in range(n)]
        moved = [[] for _ in range(n)]
        tokens = [[] for _ in range(n)]
        busy = [[model.new_bool_var(f"b[{r},{c}]") for c in range(4)] for r in range(n)]
        for d, doc_options in enumerate(options):
            row = []
            for option in doc_options:
                var = model.new_bool_var(f"x[{d},{option[0]},{option[1]}]")
                row.append(var)
                shares = option_shares(search, d, option, fills, search.comm)
                for share in shares:
                    tokens[share[0]].append((var, share[1]))
                for r, (w, o, b, flags) in _rank_terms(search, shares, search_comm).items():
                    work[r].append((var, _units(w)))
                    overlap[r].append((var, _units(o)))
                    moved[r].append((var, _units(b)))
                    for c, flag in enumerate(flags):
                        if flag:
                            model.add_implication(var, busy[r][c])
            model.add_exactly_one(row)
            x.append(row)
        latency = [_units(cm.intra_node_latency_ms), _units(cm.inter_node_latency_ms)] * 2
        horizon = _units(heuristic_ms * 4 + 1.0)
        makespan = model.new_int_var(0, horizon, "makespan")
        for r in range(n):
            model.add(sum(v * c for v, c in tokens[r]) <= ctx.capacity)
            comm_r = sum(latency[c] * busy[r][c] for c in range(4)) + sum(v * c for v, c in moved[r])
            work_r = sum(v * c for v, c in work[r])
            # makespan >= work_r + max(0, comm_r - overlap_r), written as two inequalities: the same
            # optimum (the objective minimises a maximum) and a tighter relaxation than add_max_equality.
            model.add(makespan >= work_r)
            model.add(makespan >= work_r + comm_r - sum(v * c for v, c in overlap[r]))
        model.minimize(makespan)
        for d, doc_options in enumerate(options):
            chosen = doc_options.index(hint[d])
            for i, var in enumerate(x[d]):
                model.add_hint(var, i == chosen)

        solver = cp_model.CpSolver()
        solver.parameters.max_deterministic_time = float(ctx.options.time_limit_s) * DETERMINISTIC_SHARE
        solver.parameters.max_time_in_seconds = wall_limit_s(float(ctx.options.time_limit_s))
        solver.parameters.num_workers = ctx.options.num_workers
        solver.parameters.interleave_search = ctx.options.num_workers > 1
        solver.parameters.random_seed = ctx.options.random_seed
        status = solver.solve(model)
        solve_time = time.perf_counter() - started

        best_layout, best_ms = heuristic_layout, heuristic_ms
        if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            chosen_options = [
                doc_options[next(i for i, var in enumerate(x[d]) if solver.boolean_value(var))]
                for d, doc_options in enumerate(options)
            ]
            solver_layout = placements_layout(ctx, chosen_options, fills)
            solver_ms = layout_makespan(ctx, solver_layout, comm)
            if solver_ms < best_ms:
                best_layout, best_ms = solver_layout, solver_ms
        if status in (cp_model.OPTIMAL, cp_model.FEASIBLE) and proves:
            bound = solver.best_objective_bound / _SCALE
        else:
            bound = lower_bound_ms(ctx.doc_lengths, n, cm)
        optimality = Optimality(
            status="optimal" if status == cp_model.OPTIMAL and proves else "feasible",
            objective_ms=best_ms,
            bound_ms=min(bound, best_ms),
            heuristic_ms=heuristic_ms,
            heuristic_gap=heuristic_ms / best_ms - 1.0 if best_ms > 0 else 0.0,
            solve_time_s=solve_time,
        )
        return Layout(rank_segments=best_layout.rank_segments, documents=best_layout.documents, optimality=optimality)
