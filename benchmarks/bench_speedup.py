"""Modeled speedup of the FlashCP heuristic over all-per-doc (all-gather) and static zigzag.

For every workload, context size and CP size N, several seeded micro-batches
are planned with ``flashcp``, ``per_doc`` and ``zigzag`` (each with its default
communication mechanism) and scored by the shared cost model. Reported per
cell: speedup = sum of baseline makespans / sum of flashcp makespans (micro-
batches run one after another), its range over micro-batches, flashcp's ratio
to the lower bound, and the KV volume saved: 1 - (forward KV bytes received by
all ranks under flashcp) / (the same under per_doc with all-gather).

    python benchmarks/bench_speedup.py            # full grid, writes benchmarks/results/speedup.md
    python benchmarks/bench_speedup.py --quick    # small grid, a few seconds
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from flashcp_planner import CommMode, PlanRequest, get_preset, plan
from flashcp_planner.comm import traffic_of_columns
from flashcp_planner.cost import rank_costs_of_columns
from flashcp_planner.model import RankColumns
from flashcp_planner.workloads import WORKLOADS, generate

RESULTS = Path(__file__).resolve().parent / "results" / "speedup.md"
BASELINES = ("per_doc", "zigzag")


@dataclass(frozen=True, slots=True, kw_only=True)
class Cell:
    """Aggregated results of one (workload, context, N) cell."""

    workload: str
    context: int
    cp_size: int
    mean_docs: float
    flashcp_ms: float
    """Sum of flashcp makespans over the micro-batches."""
    speedup: dict[str, float]
    """Baseline -> sum(baseline makespans) / sum(flashcp makespans)."""
    speedup_range: dict[str, tuple[float, float]]
    """Baseline -> (min, max) per-micro-batch speedup."""
    lower_bound_ratio: float
    """Sum of flashcp makespans / sum of lower bounds."""
    kv_saved: float
    """1 - flashcp KV bytes / per_doc all-gather KV bytes."""
    dedup: NodeDedup | None = None
    """Multi-node cells (N > gpus_per_node): flashcp's layouts priced under both exact-need modes."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeDedup:
    """flashcp's layouts of one cell priced under exact_need and node_dedup (the same placements)."""

    exact_ms: float
    dedup_ms: float
    slower: int
    """Micro-batches slower under node_dedup than under exact_need (goal: 0)."""
    chosen: int
    """Micro-batches whose plan came back as node_dedup (the planner's choice)."""
    inter_exact: float
    inter_dedup: float
    """Inter-node KV bytes received per node per layer step (forward), mean over micro-batches."""


def _priced(p, comm: CommMode, cost_model) -> tuple[float, int]:
    """Makespan of plan ``p``'s layout under ``comm`` and the inter-node KV bytes its ranks receive."""
    columns = RankColumns.of([rp.segments for rp in p.ranks])
    recv, send = traffic_of_columns(columns, comm, cost_model.gpus_per_node)
    costs = rank_costs_of_columns(columns, recv, send, cost_model)
    return max(c.total_ms for c in costs), sum(r[1] for r in recv) * cost_model.kv_bytes_per_token


def node_dedup_of(plans, cost_model) -> NodeDedup:
    exact = [_priced(p, CommMode.EXACT_NEED, cost_model) for p in plans]
    dedup = [_priced(p, CommMode.NODE_DEDUP, cost_model) for p in plans]
    nodes = (plans[0].cp_size - 1) // cost_model.gpus_per_node + 1
    return NodeDedup(
        exact_ms=sum(ms for ms, _ in exact), dedup_ms=sum(ms for ms, _ in dedup),
        slower=sum(d[0] > e[0] for d, e in zip(dedup, exact, strict=True)),
        chosen=sum(p.comm is CommMode.NODE_DEDUP for p in plans),
        inter_exact=statistics.fmean(b for _, b in exact) / nodes,
        inter_dedup=statistics.fmean(b for _, b in dedup) / nodes,
    )


def run_cell(workload: str, context: int, cp_size: int, *, micro_batches: int, seed: int, cost: str) -> Cell:
    batches = generate(workload, context=context, seed=seed, num_micro_batches=micro_batches)
    cost_model = get_preset(cost)
    makespans: dict[str, list[float]] = {}
    kv_bytes: dict[str, int] = {}
    lower = 0.0
    dedup = None
    for strategy in ("flashcp", *BASELINES):
        plans = plan(PlanRequest(micro_batches=batches, cp_size=cp_size, cost_model=cost_model, strategy=strategy))
        makespans[strategy] = [p.makespan_ms for p in plans]
        kv_bytes[strategy] = sum(rp.cost.recv_bytes for p in plans for rp in p.ranks)
        if strategy == "flashcp":
            lower = sum(p.lower_bound_ms for p in plans)
        if strategy == "flashcp" and cp_size > cost_model.gpus_per_node:
            dedup = node_dedup_of(plans, cost_model)
    ours = makespans["flashcp"]
    return Cell(
        dedup=dedup,
        workload=workload,
        context=context,
        cp_size=cp_size,
        mean_docs=statistics.fmean(len(b) for b in batches),
        flashcp_ms=sum(ours),
        speedup={b: sum(makespans[b]) / sum(ours) for b in BASELINES},
        speedup_range={b: (min(x / y for x, y in zip(makespans[b], ours, strict=True)),
                           max(x / y for x, y in zip(makespans[b], ours, strict=True))) for b in BASELINES},
        lower_bound_ratio=sum(ours) / lower,
        kv_saved=1.0 - kv_bytes["flashcp"] / kv_bytes["per_doc"] if kv_bytes["per_doc"] else 0.0,
    )


def _k(tokens: int) -> str:
    return f"{tokens // 1024}K"


def _geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def render(cells: list[Cell], *, micro_batches: int, seed: int, cost: str, elapsed_s: float, quick: bool) -> str:
    lines = [
        "# Modeled speedup of the FlashCP heuristic",
        "",
        f"Generated by `python benchmarks/bench_speedup.py{' --quick' if quick else ''}`: cost model `{cost}`, "
        f"{micro_batches} micro-batches per cell (workload seeds `[{seed}, k]`), {elapsed_s:.0f} s of planning.",
        "Speedup = sum of baseline makespans / sum of flashcp makespans over the micro-batches of a cell "
        "(range: per-micro-batch min-max). per_doc uses all-gather, zigzag its default; flashcp uses exact-need "
        "KV, routed per node (node_dedup) where that prices lower. KV saved = 1 - flashcp forward KV bytes / per_doc "
        "all-gather bytes (backward mirrors forward). Times are predictions of the cost model for one layer, "
        "forward + backward, not measurements.",
        "",
        "| workload | context | N | docs/mb | flashcp ms | vs per_doc | range | vs zigzag | range | / lower bound "
        "| KV saved |",
        "|---|---:|---:|---:|---:|---:|---|---:|---|---:|---:|",
    ]
    for c in cells:
        pr, zr = c.speedup_range["per_doc"], c.speedup_range["zigzag"]
        lines.append(
            f"| {c.workload} | {_k(c.context)} | {c.cp_size} | {c.mean_docs:.1f} | {c.flashcp_ms:.2f} "
            f"| {c.speedup['per_doc']:.2f}x | {pr[0]:.2f}-{pr[1]:.2f} | {c.speedup['zigzag']:.2f}x "
            f"| {zr[0]:.2f}-{zr[1]:.2f} | {c.lower_bound_ratio:.3f} | {c.kv_saved:.1%} |"
        )
    lines += ["", "## Summary per workload (geometric mean over cells, min-max)", "",
              "| workload | vs per_doc | vs zigzag | / lower bound | KV saved |", "|---|---:|---:|---:|---:|"]
    for workload in dict.fromkeys(c.workload for c in cells):
        sub = [c for c in cells if c.workload == workload]
        per_doc = [c.speedup["per_doc"] for c in sub]
        zigzag = [c.speedup["zigzag"] for c in sub]
        lines.append(
            f"| {workload} | {_geomean(per_doc):.2f}x ({min(per_doc):.2f}-{max(per_doc):.2f}) "
            f"| {_geomean(zigzag):.2f}x ({min(zigzag):.2f}-{max(zigzag):.2f}) "
            f"| {_geomean([c.lower_bound_ratio for c in sub]):.3f} "
            f"| {statistics.fmean(c.kv_saved for c in sub):.1%} ({min(c.kv_saved for c in sub):.1%}-"
            f"{max(c.kv_saved for c in sub):.1%}) |"
        )
    lines += _dedup_lines([c for c in cells if c.dedup is not None])
    return "\n".join(lines) + "\n"


def _dedup_lines(cells: list[Cell]) -> list[str]:
    if not cells:
        return []
    lines = ["", "## node_dedup on multi-node cells (N > gpus per node)", "",
             "flashcp's layouts of each cell priced under exact_need and under node_dedup (the same placements). "
             "Inter-node GB/node: forward KV bytes received across nodes per node per layer step, mean over "
             "micro-batches; dedup factor = exact / node_dedup. slower: micro-batches slower under node_dedup "
             "(goal 0); chosen: micro-batches the planner returned as node_dedup.", "",
             "| workload | context | N | exact_need ms | node_dedup ms | gain | inter GB/node exact | node_dedup "
             "| dedup factor | slower | chosen |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        d = c.dedup
        factor = f"{d.inter_exact / d.inter_dedup:.2f}x" if d.inter_dedup else "-"
        lines.append(f"| {c.workload} | {_k(c.context)} | {c.cp_size} | {d.exact_ms:.2f} | {d.dedup_ms:.2f} "
                     f"| {d.exact_ms / d.dedup_ms:.2f}x | {d.inter_exact / 1e9:.3f} | {d.inter_dedup / 1e9:.3f} "
                     f"| {factor} | {d.slower} | {d.chosen} |")
    factors = [c.dedup.inter_exact / c.dedup.inter_dedup for c in cells if c.dedup.inter_dedup]
    gains = [c.dedup.exact_ms / c.dedup.dedup_ms for c in cells]
    lines += ["", f"Geometric means over these {len(cells)} cells: dedup factor {_geomean(factors):.2f}x "
              f"({min(factors):.2f}-{max(factors):.2f}), makespan gain {_geomean(gains):.3f}x "
              f"({min(gains):.3f}-{max(gains):.3f}); micro-batches slower under node_dedup: "
              f"{sum(c.dedup.slower for c in cells)}."]
    for n in sorted({c.cp_size for c in cells}):
        per_doc = [c.speedup["per_doc"] for c in cells if c.cp_size == n]
        lines.append(f"- N={n}: flashcp vs per_doc geometric mean {_geomean(per_doc):.2f}x over {len(per_doc)} cells")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid (64K/128K, N=4/8, 2 micro-batches)")
    parser.add_argument("--workloads", default="prolong,web,code,longctx", help="comma-separated workload names")
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per cell (default: 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cost", default="h100-llama8b", help="cost-model preset (default: h100-llama8b)")
    parser.add_argument("--out", type=Path, default=None, help=f"markdown output (default: {RESULTS}; "
                                                                 "--quick prints only unless --out is given)")
    args = parser.parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; expected some of {sorted(WORKLOADS)}")
    contexts = [65536, 131072] if args.quick else [65536, 131072, 262144, 524288]
    cp_sizes = [4, 8] if args.quick else [4, 8, 16, 32, 64]
    micro_batches = 2 if args.quick else args.micro_batches
    grid = [(w, ctx, n) for w in workloads for ctx in contexts for n in cp_sizes]
    start = time.perf_counter()
    cells = []
    with tqdm(grid, desc="cells", file=sys.stderr, delay=1.0, disable=not sys.stderr.isatty()) as bar:
        for workload, context, cp_size in bar:
            bar.set_postfix_str(f"{workload} {_k(context)} N={cp_size}")
            cells.append(run_cell(workload, context, cp_size, micro_batches=micro_batches, seed=args.seed,
                                  cost=args.cost))
    text = render(cells, micro_batches=micro_batches, seed=args.seed, cost=args.cost,
                  elapsed_s=time.perf_counter() - start, quick=args.quick)
    print(text)
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
