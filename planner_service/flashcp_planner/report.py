"""Side-by-side strategy comparisons: running them, text tables, JSON and plots.

Used by ``flashcp plan`` and ``flashcp compare``. Communication volume is the
forward KV bytes received (summed over ranks, or the largest rank); backward
moves the same bytes the other way. matplotlib is imported only by
:func:`plot_comparison`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flashcp_planner.cost import lower_bound_ms
from flashcp_planner.errors import InvalidRequest
from flashcp_planner.model import Plan, ShardingKind
from flashcp_planner.planner import compare
from flashcp_planner.request import PlanRequest
from flashcp_planner.strategies import STRATEGIES, get_strategy

__all__ = [
    "OPTIMUM_MAX_DOCS",
    "REFERENCE_STRATEGIES",
    "MicroBatchComparison",
    "StrategyResult",
    "comparison_json",
    "comparison_tables",
    "plan_table",
    "plot_comparison",
    "run_comparison",
]

OPTIMUM_MAX_DOCS = 64
"""Exact strategies are skipped on larger micro-batches unless named explicitly."""
REFERENCE_STRATEGIES = ("per_doc", "zigzag")
"""Baselines every speedup is quoted against (computed even when not displayed)."""
_MIB = float(1 << 20)


@dataclass(frozen=True, slots=True, kw_only=True)
class StrategyResult:
    """One strategy on one micro-batch."""

    strategy: str
    plan: Plan | None
    """None when the strategy was infeasible or skipped."""
    status: str
    """``"ok"``, ``"infeasible"`` or ``"skipped"``."""
    note: str = ""
    """Why there is no plan."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MicroBatchComparison:
    """Every requested strategy on one micro-batch, plus the reference makespans."""

    index: int
    doc_lengths: tuple[int, ...]
    results: tuple[StrategyResult, ...]
    """In the requested strategy order."""
    reference_ms: dict[str, float]
    """Makespan of each feasible reference strategy (see :data:`REFERENCE_STRATEGIES`)."""
    lower_bound_ms: float
    capacity: int


def run_comparison(
    request: PlanRequest,
    strategies: Sequence[str],
    *,
    explicit: bool,
    progress: Any = None,
) -> tuple[list[MicroBatchComparison], list[str]]:
    """Plan every micro-batch of ``request`` with every strategy.

    Args:
        request: micro-batches, CP size, cost model and options (its ``strategy`` is ignored).
        strategies: names to run, in display order.
        explicit: the caller named ``strategies``; when False, exact strategies are
            skipped on micro-batches of more than :data:`OPTIMUM_MAX_DOCS` documents.
        progress: optional tqdm-like object; ``update(1)`` is called after every plan.

    Returns:
        The per-micro-batch comparisons and human-readable notes (skipped strategies).

    Raises:
        InvalidRequest: unknown strategy name.
        Infeasible: a micro-batch does not fit in ``cp_size x capacity``.
    """
    for name in strategies:
        get_strategy(name)
    references = [r for r in REFERENCE_STRATEGIES if r in STRATEGIES]
    skipped: dict[str, list[int]] = {}
    out = []
    for index, lengths in enumerate(request.micro_batches):
        single = dataclasses.replace(request, micro_batches=(lengths,))
        runs: dict[str, StrategyResult] = {}
        for name in [*strategies, *(r for r in references if r not in strategies)]:
            if not explicit and STRATEGIES[name].is_optimal and len(lengths) > OPTIMUM_MAX_DOCS:
                note = f"{len(lengths)} documents > {OPTIMUM_MAX_DOCS}; name it in --strategies to run it anyway"
                skipped.setdefault(name, []).append(index)
                runs[name] = StrategyResult(strategy=name, plan=None, status="skipped", note=note)
            else:
                (row,) = compare(single, [name])
                (result,) = row
                runs[name] = StrategyResult(strategy=name, plan=result.plan,
                                            status="ok" if result.plan is not None else "infeasible",
                                            note=result.error)
            if progress is not None:
                progress.update(1)
        (ctx,) = single.contexts()
        out.append(
            MicroBatchComparison(
                index=index,
                doc_lengths=lengths,
                results=tuple(runs[name] for name in strategies),
                reference_ms={r: runs[r].plan.makespan_ms for r in references if runs[r].plan is not None},
                lower_bound_ms=lower_bound_ms(lengths, request.cp_size, request.cost_model),
                capacity=ctx.capacity,
            )
        )
    notes = [f"skipped {name} on {len(indices)} of {len(out)} micro-batch(es) with more than {OPTIMUM_MAX_DOCS} "
             f"documents (e.g. micro-batch {indices[0]}); name it in --strategies to run it anyway"
             for name, indices in skipped.items()]
    return out, notes


# -- metrics -----------------------------------------------------------------


def _metrics(result: StrategyResult, mb: MicroBatchComparison) -> dict[str, Any]:
    out: dict[str, Any] = {"strategy": result.strategy, "status": result.status}
    plan = result.plan
    if plan is None:
        out["error"] = result.note
        return out
    recv = [rp.cost.recv_bytes for rp in plan.ranks]
    out.update(
        comm=plan.comm.value,
        makespan_ms=plan.makespan_ms,
        ratio_to_lower_bound=plan.makespan_ms / plan.lower_bound_ms,
        comm_bytes_total=sum(recv),
        comm_bytes_max_rank=max(recv),
    )
    for ref in REFERENCE_STRATEGIES:
        ref_ms = mb.reference_ms.get(ref)
        out[f"speedup_vs_{ref}"] = ref_ms / plan.makespan_ms if ref_ms is not None else None
    if plan.optimality is not None:
        opt = plan.optimality
        out["optimality"] = {"status": opt.status, "objective_ms": opt.objective_ms, "bound_ms": opt.bound_ms,
                             "heuristic_ms": opt.heuristic_ms, "heuristic_gap": opt.heuristic_gap,
                             "solve_time_s": opt.solve_time_s}
    out["ranks"] = {
        "tokens": [rp.cost.tokens for rp in plan.ranks],
        "linear_ms": [rp.cost.linear_ms for rp in plan.ranks],
        "attention_ms": [rp.cost.attention_ms for rp in plan.ranks],
        "exposed_comm_ms": [rp.cost.exposed_comm_ms for rp in plan.ranks],
        "total_ms": [rp.cost.total_ms for rp in plan.ranks],
        "recv_bytes": recv,
    }
    return out


def _summary(comparisons: Sequence[MicroBatchComparison], strategies: Sequence[str]) -> list[dict[str, Any]]:
    """Per strategy, totals over the micro-batches it planned (micro-batches run one after another)."""
    rows = []
    for i, name in enumerate(strategies):
        planned = [(mb, mb.results[i].plan) for mb in comparisons if mb.results[i].plan is not None]
        row: dict[str, Any] = {"strategy": name, "micro_batches_planned": len(planned),
                               "micro_batches": len(comparisons)}
        if planned:
            row["makespan_ms_total"] = sum(p.makespan_ms for _, p in planned)
            row["lower_bound_ms_total"] = sum(p.lower_bound_ms for _, p in planned)
            row["comm_bytes_total"] = sum(rp.cost.recv_bytes for _, p in planned for rp in p.ranks)
            for ref in REFERENCE_STRATEGIES:
                both = [(mb.reference_ms[ref], p.makespan_ms) for mb, p in planned if ref in mb.reference_ms]
                row[f"speedup_vs_{ref}"] = (sum(a for a, _ in both) / sum(b for _, b in both)) if both else None
        rows.append(row)
    return rows


def comparison_json(
    comparisons: Sequence[MicroBatchComparison], strategies: Sequence[str], notes: Sequence[str],
    header: dict[str, Any],
) -> dict[str, Any]:
    """JSON form of a comparison: ``header`` fields, per-micro-batch metrics, summary, notes."""
    return {
        **header,
        "strategies": list(strategies),
        "notes": list(notes),
        "micro_batches": [
            {"index": mb.index, "num_docs": len(mb.doc_lengths), "num_tokens": sum(mb.doc_lengths),
             "capacity": mb.capacity, "lower_bound_ms": mb.lower_bound_ms,
             "results": [_metrics(r, mb) for r in mb.results]}
            for mb in comparisons
        ],
        "summary": _summary(comparisons, strategies),
    }


# -- text tables ---------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(cells).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]).rstrip()


def _ms(value: float) -> str:
    return f"{value:.3f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mib(value: float) -> str:
    return f"{value / _MIB:.1f}"


def plan_table(plan: Plan, *, index: int) -> str:
    """Per-rank breakdown, makespan, lower bound and document sharding of one plan."""
    header = (f"micro-batch {index}: {len(plan.doc_lengths)} documents, {plan.num_tokens} tokens, "
              f"N={plan.cp_size}, strategy {plan.strategy}, comm {plan.comm.value}, cost model {plan.cost_model}, "
              f"capacity {plan.capacity} tokens/rank")
    rows = [
        [str(rp.rank), str(rp.cost.tokens), str(len(rp.segments)), _ms(rp.cost.attention_ms), _ms(rp.cost.linear_ms),
         _ms(rp.cost.exposed_comm_ms), _ms(rp.cost.total_ms), _mib(rp.cost.recv_bytes)]
        for rp in plan.ranks
    ]
    table = format_table(["rank", "tokens", "segments", "attention_ms", "linear_ms", "exposed_comm_ms", "total_ms",
                          "kv_recv_MiB"], rows)
    lines = [header, table,
             f"makespan {_ms(plan.makespan_ms)} ms   lower bound {_ms(plan.lower_bound_ms)} ms   "
             f"ratio {plan.makespan_ms / plan.lower_bound_ms:.3f}   "
             f"kv moved {_mib(sum(rp.cost.recv_bytes for rp in plan.ranks))} MiB"]
    kinds = Counter(d.kind for d in plan.documents)
    lines.append("documents: " + ", ".join(f"{kinds[k]} {k.value}" for k in ShardingKind if kinds[k]))
    split = [d for d in plan.documents if d.kind is not ShardingKind.WHOLE]
    if split:
        shown = [f"doc {d.doc} ({plan.doc_lengths[d.doc]} tokens) {d.kind.value} over "
                 f"{_rank_list(d.ranks, plan.cp_size)}" for d in split[:8]]
        more = f"; ... {len(split) - 8} more" if len(split) > 8 else ""
        lines.append("split: " + "; ".join(shown) + more)
    if plan.optimality is not None:
        lines.append(_optimality_line(plan))
    return "\n".join(lines)


def _rank_list(ranks: Sequence[int], cp_size: int) -> str:
    if len(ranks) == cp_size:
        return f"all {cp_size} ranks"
    if list(ranks) == list(range(ranks[0], ranks[0] + len(ranks))):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ",".join(map(str, ranks))


def _optimality_line(plan: Plan) -> str:
    opt = plan.optimality
    assert opt is not None
    return (f"solver: {opt.status}, objective {_ms(opt.objective_ms)} ms, bound {_ms(opt.bound_ms)} ms, "
            f"heuristic {_ms(opt.heuristic_ms)} ms (gap {opt.heuristic_gap:+.2%}), {opt.solve_time_s:.2f} s")


def _comparison_rows(mb: MicroBatchComparison) -> list[list[str]]:
    rows = []
    for result in mb.results:
        m = _metrics(result, mb)
        if result.plan is None:
            rows.append([result.strategy, result.status, *["-"] * 7])
            continue
        note = ""
        if "optimality" in m:
            o = m["optimality"]
            note = f"{o['status']} (bound {_ms(o['bound_ms'])}), heuristic gap {o['heuristic_gap']:+.2%}"
        rows.append([result.strategy, m["comm"], _ms(m["makespan_ms"]), _x(m["speedup_vs_per_doc"]),
                     _x(m["speedup_vs_zigzag"]), f"{m['ratio_to_lower_bound']:.3f}", _mib(m["comm_bytes_total"]),
                     _mib(m["comm_bytes_max_rank"]), note])
    return rows


_COMPARE_HEADERS = ["strategy", "comm", "makespan_ms", "vs_per_doc", "vs_zigzag", "/lower_bound", "kv_MiB_total",
                    "kv_MiB_max_rank", "optimality"]


def comparison_tables(comparisons: Sequence[MicroBatchComparison], strategies: Sequence[str], *,
                      cp_size: int, cost_model: str, notes: Sequence[str]) -> str:
    """Text report: one table per micro-batch (up to 4), else a summary plus a makespan matrix."""
    parts = []
    if len(comparisons) <= 4:
        for mb in comparisons:
            parts.append(f"micro-batch {mb.index}: {len(mb.doc_lengths)} documents, {sum(mb.doc_lengths)} tokens, "
                         f"N={cp_size}, cost model {cost_model}, capacity {mb.capacity}, "
                         f"lower bound {_ms(mb.lower_bound_ms)} ms")
            parts.append(format_table(_COMPARE_HEADERS, _comparison_rows(mb)))
            for r in mb.results:
                if r.status == "infeasible":
                    parts.append(f"  {r.strategy}: infeasible: {r.note}")
            parts.append("")
    else:
        headers = ["micro-batch", "docs", "lower_bound", *strategies]
        rows = [[str(mb.index), str(len(mb.doc_lengths)), _ms(mb.lower_bound_ms),
                 *(_ms(r.plan.makespan_ms) if r.plan is not None else r.status for r in mb.results)]
                for mb in comparisons]
        parts += [f"makespan (ms) per micro-batch, N={cp_size}, cost model {cost_model}",
                  format_table(headers, rows), ""]
    if len(comparisons) > 1:
        summary = _summary(comparisons, strategies)
        rows = [[s["strategy"], f"{s['micro_batches_planned']}/{s['micro_batches']}",
                 *((_ms(s["makespan_ms_total"]), _x(s["speedup_vs_per_doc"]), _x(s["speedup_vs_zigzag"]),
                    f"{s['makespan_ms_total'] / s['lower_bound_ms_total']:.3f}", _mib(s["comm_bytes_total"]))
                   if s["micro_batches_planned"] else ["-"] * 5)]
                for s in summary]
        parts += [f"summary over {len(comparisons)} micro-batches (sums; speedups over micro-batches both planned)",
                  format_table(["strategy", "planned", "makespan_ms", "vs_per_doc", "vs_zigzag", "/lower_bound",
                                "kv_MiB_total"], rows), ""]
    parts += [f"note: {n}" for n in notes]
    return "\n".join(parts).rstrip()


# -- plots ---------------------------------------------------------------------------


def plot_comparison(mb: MicroBatchComparison, path: str, *, cp_size: int, cost_model: str) -> None:
    """Per-rank stacked bars (linear / attention / exposed comm), one subplot per strategy, shared y axis.

    Raises:
        InvalidRequest: matplotlib is not installed (field ``plot``) or ``path`` cannot be written.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InvalidRequest("plot", "--plot needs matplotlib: pip install 'flashcp[plot]'") from None
    results = mb.results
    ncols = min(3, len(results))
    nrows = -(-len(results) // ncols)
    width = max(4.0, min(8.0, 2.5 + 0.1 * cp_size))
    fig = Figure(figsize=(max(9.0, width * ncols), 3.8 * nrows + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False)
    colors = {"linear": "#8da0cb", "attention": "#fc8d62", "exposed comm": "#66c2a5"}
    ranks = list(range(cp_size))
    for ax, result in zip(axes.flat, results, strict=False):
        ax.set_xlabel("rank")
        plan = result.plan
        if plan is None:
            ax.set_title(f"{result.strategy}: {result.status}")
            ax.text(0.5, 0.5, result.status, transform=ax.transAxes, ha="center", va="center", color="gray")
            continue
        linear = [rp.cost.linear_ms for rp in plan.ranks]
        attention = [rp.cost.attention_ms for rp in plan.ranks]
        exposed = [rp.cost.exposed_comm_ms for rp in plan.ranks]
        ax.bar(ranks, linear, color=colors["linear"], label="linear")
        ax.bar(ranks, attention, bottom=linear, color=colors["attention"], label="attention")
        below = [a + b for a, b in zip(linear, attention, strict=True)]
        ax.bar(ranks, exposed, bottom=below, color=colors["exposed comm"], label="exposed comm")
        ax.axhline(plan.lower_bound_ms, color="black", linestyle="--", linewidth=1, label="lower bound")
        ax.set_title(f"{result.strategy} ({plan.comm.value}): makespan {plan.makespan_ms:.2f} ms", fontsize=10)
        if cp_size <= 16:
            ax.set_xticks(ranks)
    for ax in axes.flat[len(results):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("time per layer, fwd+bwd (ms)")
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    order = [label for label in (*colors, "lower bound") if label in legend]
    if order:
        fig.legend([legend[label] for label in order], order, loc="outside lower center", ncols=len(order))
    fig.suptitle(f"micro-batch {mb.index}: {len(mb.doc_lengths)} documents, {sum(mb.doc_lengths)} tokens, "
                 f"N={cp_size}, cost model {cost_model}")
    try:
        fig.savefig(path, format="png", dpi=110)
    except OSError as exc:
        raise InvalidRequest("plot", f"cannot write {path}: {exc.strerror or exc}") from None
