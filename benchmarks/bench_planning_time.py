"""Planning time of the FlashCP heuristic vs number of documents D and CP size N.

Times ``flashcp_planner.plan`` end to end (heuristic search, transfers, costs,
validation, the Plan object) on one micro-batch of D documents drawn from the
ProLong-like length distribution (../shared/data/doclens-prolong.json; a
lognormal stand-in if absent), with the default preset and capacity slack.
Reports median and p99 over repeated runs, and the growth exponent of the
median in D (goal: no worse than D log D).

    python benchmarks/bench_planning_time.py            # D 64..65536, N 4..256
    python benchmarks/bench_planning_time.py --quick    # smoke run

Writes benchmarks/results/planning_time.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from flashcp_planner import PlanRequest, plan
from flashcp_planner.strategies.flashcp import NATIVE_AVAILABLE

RESULTS = Path(__file__).parent / "results" / "planning_time.md"
_REFERENCE_MS = 10.0
"""Reference-loop time of a typical idle desktop core, the scale of the normalised table."""
_MAX_REPEATS_LARGE_N = 5
"""Runs per cell at N >= 256 (per-doc splits over 256 ranks dominate there; keeps the full grid to minutes)."""
PROLONG = Path(__file__).resolve().parents[2] / "shared" / "data" / "doclens-prolong.json"


@functools.cache
def _prolong_pool() -> list[int] | None:
    """The ProLong document lengths, read once (parsing the file between timed runs would leave every
    plan to start with cold caches and a pending garbage collection)."""
    for path in (PROLONG, Path("/work/shared/data/doclens-prolong.json")):
        if path.exists():
            return [int(x) for x in json.loads(path.read_text())]
    return None


def sample_lengths(num_docs: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    pool = _prolong_pool()
    if pool is not None:
        return [rng.choice(pool) for _ in range(num_docs)]
    return [max(1, int(rng.lognormvariate(7.5, 1.0))) for _ in range(num_docs)]


def reference_loop_ms() -> float:
    """A fixed pure-Python workload, to compare machines: median ms of sum(range(10**6))."""
    times = []
    for _ in range(5):
        started = time.perf_counter()
        sum(range(10**6))
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def time_plan(num_docs: int, cp_size: int, repeats: int) -> list[float]:
    """Wall ms of ``plan`` on ``repeats`` different micro-batches (a fresh sample each time, as a
    dataloader would send, so memoised per-length costs are only as warm as in a real service)."""
    plan(PlanRequest(micro_batches=[sample_lengths(num_docs, seed=-1)], cp_size=cp_size))  # warm-up
    out = []
    for i in range(repeats):
        request = PlanRequest(micro_batches=[sample_lengths(num_docs, seed=num_docs * 1000 + i)], cp_size=cp_size)
        started = time.perf_counter()
        plan(request)
        out.append((time.perf_counter() - started) * 1e3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small grid, 3 repeats")
    parser.add_argument("--budget-s", type=float, default=2.0, help="approximate seconds per cell")
    parser.add_argument("--give-up-s", type=float, default=30.0,
                        help="skip larger D for an N once one plan takes longer than this")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    docs = [64, 256, 1024] if args.quick else [64, 256, 1024, 4096, 16384, 65536]
    sizes = [4, 16] if args.quick else [4, 16, 64, 256]
    budget = 0.3 if args.quick else args.budget_s

    reference = reference_loop_ms()
    table: dict[tuple[int, int], tuple[float, float, int]] = {}
    cell_reference: dict[tuple[int, int], float] = {}  # reference loop around each cell (the load varies)
    too_slow: set[int] = set()  # N whose previous D took longer than --give-up-s: larger D skipped
    for num_docs in docs:
        for cp_size in sizes:
            if cp_size in too_slow:
                continue
            first = time_plan(num_docs, cp_size, 1)[0]
            if first > args.give_up_s * 1e3:
                too_slow.add(cp_size)
            most = _MAX_REPEATS_LARGE_N if cp_size >= 256 else 200
            repeats = 1 if first > 2e3 else max(3, min(most, int(budget * 1e3 / max(first, 1e-3))))
            before = reference_loop_ms()
            times = time_plan(num_docs, cp_size, repeats)
            cell_reference[num_docs, cp_size] = min(before, reference_loop_ms())
            ordered = sorted(times)
            p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
            table[num_docs, cp_size] = (statistics.median(times), p99, repeats)
            print(f"D={num_docs:6d} N={cp_size:4d}  median {table[num_docs, cp_size][0]:9.3f} ms  "
                  f"p99 {p99:9.3f} ms  ({repeats} runs, reference loop {cell_reference[num_docs, cp_size]:.1f} ms)",
                  flush=True)

    lines = [
        "# FlashCP heuristic planning time",
        "",
        f"`python benchmarks/bench_planning_time.py{' --quick' if args.quick else ''}`: end-to-end "
        "`flashcp_planner.plan` of one micro-batch (heuristic + transfers + costs + validation + Plan), "
        "ProLong-like lengths (a fresh micro-batch per run), preset h100-llama8b, capacity slack 0.25. "
        "Median / p99 ms over repeated runs.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; reference loop `sum(range(10**6))` = {reference:.1f} ms "
        "(a typical idle desktop core: ~8-12 ms; scale the figures by the ratio).",
        "",
        "Search engine: " + ("compiled (`strategies/_engine.pyx`)" if NATIVE_AVAILABLE and os.environ.get(
            "FLASHCP_NATIVE", "1") != "0" else "Python reference (`FLASHCP_NATIVE=0` or no compiled build)") + ".",
        "",
        "| D \\ N | " + " | ".join(str(n) for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for num_docs in docs:
        cells = [f"{table[num_docs, n][0]:.2f} / {table[num_docs, n][1]:.2f}" if (num_docs, n) in table
                 else f"skipped (> {args.give_up_s:g} s)" for n in sizes]
        lines.append(f"| {num_docs} | " + " | ".join(cells) + " |")
    lines += ["", f"Medians scaled to a {_REFERENCE_MS:g} ms reference loop (each cell by the reference loop timed "
              "around it; a rough guide only: on a machine shared with other work the short loop and the plans "
              "are slowed unevenly):", "",
              "| D \\ N | " + " | ".join(str(n) for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for num_docs in docs:
        cells = [f"{_scaled(table, cell_reference, num_docs, n):.2f}" if (num_docs, n) in table else "-"
                 for n in sizes]
        lines.append(f"| {num_docs} | " + " | ".join(cells) + " |")
    lines += ["", "Growth of the median (exponent b in time ~ D^b between consecutive D, then overall):", ""]
    for n in sizes:
        measured = [d for d in docs if (d, n) in table]
        steps = [_exponent(table[a, n][0], table[b, n][0], a, b) for a, b in zip(measured, measured[1:], strict=False)]
        if len(measured) >= 2:
            overall = _exponent(table[measured[0], n][0], table[measured[-1], n][0], measured[0], measured[-1])
            lines.append(f"- N={n}: steps " + ", ".join(f"{b:.2f}" for b in steps) + f"; overall {overall:.2f}")
    goals = []
    for cell, goal in (((256, 16), 1), ((16384, 64), 20)):
        if cell in table:
            goals.append(f"- {cell[0]:,} documents, N={cell[1]}: median {table[cell][0]:.2f} ms here "
                         f"(reference loop {cell_reference[cell]:.1f} ms), "
                         f"{_scaled(table, cell_reference, *cell):.2f} ms scaled (goal < {goal} ms)")
    if goals:
        lines += ["", "Goals:", "", *goals]
    text = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    return 0


def _scaled(table: dict, reference: dict, num_docs: int, cp_size: int) -> float:
    return table[num_docs, cp_size][0] * _REFERENCE_MS / reference[num_docs, cp_size]


def _exponent(time_a: float, time_b: float, docs_a: int, docs_b: int) -> float:
    return math.log(time_b / time_a) / math.log(docs_b / docs_a)


if __name__ == "__main__":
    sys.exit(main())
