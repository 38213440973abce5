"""Latency of one PlannerClient.plan call per plan source, and what prefetch hides from the training loop.

Starts one ``python -m flashcp_service`` on 127.0.0.1 and plans one step
(``--micro-batches`` ProLong-like micro-batches of ``--context`` tokens, CP
size ``--cp``, heuristic ``flashcp``) through:

* the embedded planner (in-process);
* the service over HTTP and over gRPC (loopback);
* a dead service (connection refused, no retries) -> fallback;
* an open circuit breaker -> fallback without any network call;

then runs a toy training loop (``--step-ms`` of sleep per step) over gRPC with
and without :meth:`PlannerClient.prefetch`, and reports how long the loop
waited for plans per step. Loopback, 2 shared CPU cores: orientation figures.

    python benchmarks/bench_plan_client.py            # 8 x 32K tokens, CP 8
    python benchmarks/bench_plan_client.py --quick
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flashcp_client import BreakerPolicy, PlannerClient
from flashcp_planner.workloads import generate

RESULTS = Path(__file__).resolve().parent / "results" / "plan_client.md"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("service exited during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("service did not start")


def _time_calls(client: PlannerClient, steps: list[list[list[int]]], cp: int) -> list[float]:
    client.plan(steps[0], cp_size=cp)  # warm-up: connections, imports
    out = []
    for step in steps:
        t0 = time.perf_counter()
        client.plan(step, cp_size=cp)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _loop_wait_ms(client: PlannerClient, steps: list[list[list[int]]], cp: int, step_ms: float,
                  prefetch: bool) -> list[float]:
    waits = []
    if prefetch:
        with client.prefetch(steps, cp_size=cp, depth=2) as prefetched:
            while True:
                t0 = time.perf_counter()
                try:
                    next(prefetched)
                except StopIteration:
                    break
                waits.append((time.perf_counter() - t0) * 1e3)
                time.sleep(step_ms / 1e3)
    else:
        for step in steps:
            t0 = time.perf_counter()
            client.plan(step, cp_size=cp)
            waits.append((time.perf_counter() - t0) * 1e3)
            time.sleep(step_ms / 1e3)
    return waits[1:]  # the first step has nothing to overlap with


def _row(name: str, ms: list[float], note: str = "") -> str:
    ordered = sorted(ms)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"| {name} | {statistics.median(ms):.2f} | {p90:.2f} | {len(ms)} | {note} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--cp", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-ms", type=float, default=200.0)
    parser.add_argument("--quick", action="store_true", help="8K context, 2 micro-batches, 8 steps")
    args = parser.parse_args()
    if args.quick:
        args.context, args.micro_batches, args.steps = 8192, 2, 8

    steps = [generate("prolong", context=args.context, seed=s, num_micro_batches=args.micro_batches)
             for s in range(args.steps)]
    docs = sum(len(mb) for step in steps for mb in step) / len(steps)
    http_port, grpc_port = _free_port(), _free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "flashcp_service", "--http-port", str(http_port),
                             "--grpc-port", str(grpc_port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_port(http_port, proc)
        _wait_port(grpc_port, proc)
        cp = args.cp
        rows = [
            _row("embedded", _time_calls(PlannerClient(), steps, cp)),
            _row("HTTP (httpx, loopback)", _time_calls(PlannerClient(f"http://127.0.0.1:{http_port}",
                                                                    fallback=False), steps, cp)),
            _row("gRPC (loopback)", _time_calls(PlannerClient(f"grpc://127.0.0.1:{grpc_port}",
                                                               fallback=False), steps, cp)),
        ]
        dead = PlannerClient(f"grpc://127.0.0.1:{_free_port()}", retries=0,
                             breaker=BreakerPolicy(failure_threshold=10**6))
        rows.append(_row("dead service -> fallback", _time_calls(dead, steps, cp), "connection refused, no retry"))
        opened = PlannerClient(f"grpc://127.0.0.1:{_free_port()}", retries=0,
                               breaker=BreakerPolicy(failure_threshold=1, reset_timeout_s=3600))
        rows.append(_row("breaker open -> fallback", _time_calls(opened, steps, cp), "no network call"))
        grpc_client = PlannerClient(f"grpc://127.0.0.1:{grpc_port}", fallback=False)
        grpc_client.plan(steps[0], cp_size=cp)
        blocking = _loop_wait_ms(grpc_client, steps, cp, args.step_ms, prefetch=False)
        ahead = _loop_wait_ms(grpc_client, steps, cp, args.step_ms, prefetch=True)
    finally:
        proc.kill()
        proc.wait()
        log.close()

    lines = [
        "# PlannerClient latency per plan source",
        "",
        f"One step = {args.micro_batches} ProLong-like micro-batches of {args.context} tokens "
        f"({docs:.0f} documents per step on average), CP {args.cp}, strategy flashcp, cost model h100-llama8b; "
        f"{args.steps} steps. Service and client share a loaded 2-core machine (loopback): orientation only; "
        "the in-process rows (embedded, both fallbacks) run the same planner and differ by noise.",
        "",
        "| source | median ms / step | p90 ms / step | calls | note |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Training loop over gRPC, {args.step_ms:g} ms of (simulated) training per step: time the loop waited "
        "for its plans per step (first step excluded).",
        "",
        "| loop | median wait ms | p90 wait ms | steps | note |",
        "|---|---|---|---|---|",
        _row("plan on the critical path", blocking),
        _row("prefetch (depth 2)", ahead, "plans for t+1 computed while t trains"),
        "",
        f"Command: `python benchmarks/bench_plan_client.py{' --quick' if args.quick else ''}`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
