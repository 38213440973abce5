"""Plan quality: the FlashCP heuristic against the CP-SAT optimum of the same cost model.

Random small instances (2..24 documents, N in {2, 4, 8}, lengths from
lognormal families of varied spread, packed order as drawn), the default
preset and exact-need communication. For each: the heuristic's predicted
makespan, the optimum's (or the best solution CP-SAT found within the time
limit) and its proven bound. Gap = heuristic / best - 1 (>= 0 by construction:
the optimum is warm-started from the heuristic and never returns worse).

    python benchmarks/bench_quality.py            # 200 instances, 3 s each
    python benchmarks/bench_quality.py --quick    # smoke run: 12 instances, 1 s each

Writes benchmarks/results/quality.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from flashcp_planner import PlanOptions, PlanRequest, plan

RESULTS = Path(__file__).parent / "results" / "quality.md"


def instance(rng: random.Random) -> tuple[list[int], int]:
    """Document lengths and N of one random instance."""
    num_docs = rng.randint(2, 24)
    cp_size = rng.choice([2, 4, 8])
    mu = rng.uniform(5.0, 9.5)
    sigma = rng.uniform(0.3, 1.8)
    lengths = [max(1, min(131072, int(rng.lognormvariate(mu, sigma)))) for _ in range(num_docs)]
    return lengths, cp_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 12 instances, 1 s limit")
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--time-limit", type=float, default=3.0, help="CP-SAT seconds per instance")
    parser.add_argument("--workers", type=int, default=2, help="CP-SAT workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.instances, args.time_limit = 12, 1.0

    rng = random.Random(args.seed)
    rows = []
    started = time.perf_counter()
    for i in range(args.instances):
        lengths, cp_size = instance(rng)
        options = PlanOptions(time_limit_s=args.time_limit, num_workers=args.workers, random_seed=0)
        request = PlanRequest(micro_batches=[lengths], cp_size=cp_size, strategy="optimum", options=options)
        opt = plan(request)[0].optimality
        assert opt is not None
        rows.append((len(lengths), cp_size, opt.status, opt.heuristic_ms, opt.objective_ms, opt.bound_ms,
                     opt.solve_time_s))
        print(f"[{i + 1}/{args.instances}] D={len(lengths):2d} N={cp_size} {opt.status:8s} "
              f"gap={opt.heuristic_gap:.3%} bound_gap={opt.objective_ms / opt.bound_ms - 1:.3%} "
              f"t={opt.solve_time_s:.2f}s", flush=True)
    elapsed = time.perf_counter() - started

    gaps = [h / o - 1.0 for _, _, _, h, o, _, _ in rows]
    proven = [g for g, row in zip(gaps, rows, strict=True) if row[2] == "optimal"]
    vs_bound = [h / b - 1.0 for _, _, _, h, _, b, _ in rows]
    lines = [
        "# Heuristic vs CP-SAT optimum",
        "",
        f"`python benchmarks/bench_quality.py{' --quick' if args.quick else ''}` — {len(rows)} random instances "
        f"(2-24 documents, N in {{2, 4, 8}}, lognormal lengths), preset h100-llama8b, exact-need comm, "
        f"CP-SAT {args.time_limit:g} s x {args.workers} workers per instance, seed {args.seed}; "
        f"total {elapsed:.0f} s.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| instances | {len(rows)} |",
        f"| proven optimal | {len(proven)} ({len(proven) / len(rows):.0%}) |",
        f"| heuristic gap to best CP-SAT solution, median | {statistics.median(gaps):.3%} |",
        f"| heuristic gap to best CP-SAT solution, p90 | {_quantile(gaps, 0.9):.3%} |",
        f"| heuristic gap to best CP-SAT solution, worst | {max(gaps):.3%} |",
        f"| heuristic = optimum (gap < 1e-6), instances | {sum(1 for g in gaps if g < 1e-6)} |",
        f"| on proven-optimal instances: median / worst gap | {_median(proven):.3%} / {_max(proven):.3%} |",
        f"| heuristic gap to the solver's proven bound, median / worst | "
        f"{statistics.median(vs_bound):.3%} / {max(vs_bound):.3%} |",
        "",
        "Gap = heuristic makespan / CP-SAT makespan - 1, both scored by the same float evaluator "
        "(`flashcp_planner.cost.rank_costs`). Where CP-SAT hit its time limit the reference is its best "
        "solution (an upper bound on the optimum), so the gap there is a lower estimate; the bound column "
        "gives the upper estimate.",
        "",
        "## Worst 10 instances",
        "",
        "| D | N | status | heuristic ms | CP-SAT ms | bound ms | gap |",
        "|---|---|---|---|---|---|---|",
    ]
    worst = sorted(zip(gaps, rows, strict=True), key=lambda item: -item[0])[:10]
    for gap, (d, n, status, h, o, b, _) in worst:
        lines.append(f"| {d} | {n} | {status} | {h:.4f} | {o:.4f} | {b:.4f} | {gap:.3%} |")
    text = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    return 0


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _max(values: list[float]) -> float:
    return max(values) if values else float("nan")


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


if __name__ == "__main__":
    sys.exit(main())
