"""Planner service latency and throughput over loopback, both transports, against in-process planning.

Starts ``python -m flashcp_service`` on 127.0.0.1 (OS-chosen ports), then for
requests of 64, 1,024 and 16,384 documents (one micro-batch, strategy
``flashcp``) at N=8 and N=64 measures, per transport (gRPC, HTTP/JSON) and
per number of concurrent clients (1, 32): p50 / p99 latency and plans per
second. The in-process ``flashcp_planner.plan`` time of the same requests is
the baseline; "overhead" is the p50 difference at 1 client. A last run
measures sustained throughput of 128-document requests with 32 clients.
The gRPC goal cells are repeated with ``omit_transfers`` set, as the
``flashcp_client`` library sends its requests. For the latency goal cell a
floor is measured too: a bare grpc.aio server (``--canned-server``) that
answers every call with a pre-encoded response of the same size, and the
server's own work for that request run in-process (parse, decode, plan,
encode, serialize). The load average of the
machine at the start and the end is recorded (other work skews every figure).

Clients and server share this machine's cores, so client-side work (encoding,
decoding) is included in every figure. Results: benchmarks/results/service.md.

Usage::

    .venv/bin/python benchmarks/bench_service.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

from flashcp import SERVICE_NAME, codec
from flashcp.v1 import planner_pb2 as pb
from flashcp.v1 import planner_pb2_grpc
from flashcp_planner import PlanRequest, plan

RESULTS = Path(__file__).resolve().parent / "results" / "service.md"
MAX_CELL_MS = 60_000.0
"""A 32-client cell whose requests would take longer than this in-process (one round per client) is skipped."""
OMIT_LABEL = "grpc, `omit_transfers` (as `flashcp_client` sends)"
GRPC_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


@dataclass
class Cell:
    transport: str
    num_docs: int
    cp_size: int
    clients: int
    latencies_s: list[float]
    wall_s: float
    errors: int

    @property
    def p50_ms(self) -> float:
        return 1e3 * statistics.median(self.latencies_s)

    @property
    def p99_ms(self) -> float:
        ordered = sorted(self.latencies_s)
        return 1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]

    @property
    def plans_per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s


def make_requests(num_docs: int, cp_size: int, count: int, seed: int) -> list[PlanRequest]:
    """Documents drawn like packed pre-training data: mostly short, a heavy tail up to 32k tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        lengths = [min(32768, max(1, int(rng.lognormvariate(6.5, 1.3)))) for _ in range(num_docs)]
        out.append(PlanRequest(micro_batches=[lengths], cp_size=cp_size))
    return out


def in_process(requests: list[PlanRequest], seconds: float, min_runs: int) -> list[float]:
    latencies = []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline or len(latencies) < min_runs:
        started = time.perf_counter()
        plan(requests[i % len(requests)])
        latencies.append(time.perf_counter() - started)
        i += 1
    return latencies


async def drive(transport: str, target: str, requests: list[PlanRequest], clients: int, seconds: float,
                min_runs: int, *, omit_transfers: bool = False) -> tuple[list[float], float, int]:
    messages = [codec.request_to_pb(r, omit_transfers=omit_transfers) for r in requests]
    bodies = [json.dumps({"micro_batches": [list(mb) for mb in r.micro_batches], "cp_size": r.cp_size,
                          **({"omit_transfers": True} if omit_transfers else {})}).encode()
              for r in requests]
    latencies: list[float] = []
    errors = 0
    started_all = time.perf_counter()
    deadline = started_all + seconds

    async def grpc_worker(index: int, stub) -> None:
        nonlocal errors
        i = index
        while time.perf_counter() < deadline or len(latencies) < min_runs:
            started = time.perf_counter()
            try:
                reply = await stub.Plan(messages[i % len(messages)], timeout=300)
                assert len(reply.plans) == 1
                latencies.append(time.perf_counter() - started)
            except grpc.RpcError:
                errors += 1
            i += 1

    async def http_worker(index: int, client: httpx.AsyncClient) -> None:
        nonlocal errors
        i = index
        while time.perf_counter() < deadline or len(latencies) < min_runs:
            started = time.perf_counter()
            response = await client.post("/v1/plan", content=bodies[i % len(bodies)],
                                         headers={"content-type": "application/json"})
            if response.status_code == 200 and len(json.loads(response.content)["plans"]) == 1:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1
            i += 1

    if transport == "grpc":
        async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
            stub = planner_pb2_grpc.PlannerStub(channel)
            await stub.Plan(messages[0], timeout=300)  # connect + warm up
            started_all = time.perf_counter()
            deadline = started_all + seconds
            await asyncio.gather(*(grpc_worker(i, stub) for i in range(clients)))
    else:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=target, timeout=300, limits=limits) as client:
            await client.post("/v1/plan", content=bodies[0], headers={"content-type": "application/json"})
            started_all = time.perf_counter()
            deadline = started_all + seconds
            await asyncio.gather(*(http_worker(i, client) for i in range(clients)))
    return latencies, time.perf_counter() - started_all, errors


def server_work(requests: list[PlanRequest], seconds: float, min_runs: int) -> list[float]:
    """What the server does for each request, in-process: parse, decode, plan, encode, serialize."""
    wire = [codec.request_to_pb(r).SerializeToString() for r in requests]
    latencies = []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline or len(latencies) < min_runs:
        started = time.perf_counter()
        request = codec.request_from_pb(pb.PlanRequest.FromString(wire[i % len(wire)]))
        response = pb.PlanResponse()
        for p in plan(request):
            codec.plan_to_pb(p, response.plans.add())
        response.SerializeToString()
        latencies.append(time.perf_counter() - started)
        i += 1
    return latencies


def serve_canned(num_docs: int, cp_size: int) -> None:
    """``--canned-server``: a bare grpc.aio Planner.Plan answering with one pre-encoded plan response."""
    request = make_requests(num_docs, cp_size, count=1, seed=num_docs * 1000 + cp_size)[0]
    response = pb.PlanResponse()
    for p in plan(request):
        codec.plan_to_pb(p, response.plans.add())
    canned = response.SerializeToString()

    async def answer(request: bytes, context) -> bytes:
        return canned

    async def run() -> None:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        handler = grpc.unary_unary_rpc_method_handler(answer)  # bytes in, bytes out: no (de)serialization
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"Plan": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()

    asyncio.run(run())


def measure_floor(requests: list[PlanRequest], seconds: float) -> tuple[float, float]:
    """p50 ms of (a bare gRPC round trip with a same-size canned answer, the server's work in-process)."""
    process = subprocess.Popen([sys.executable, __file__, "--canned-server"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(process.stdout.readline())
        latencies, _, _ = asyncio.run(drive("grpc", f"127.0.0.1:{port}", requests, 1, seconds, 20))
    finally:
        process.terminate()
        process.wait(60)
    work = server_work(requests, seconds, 20)
    return 1e3 * statistics.median(latencies), 1e3 * statistics.median(work)


def start_server(log_dir: Path) -> tuple[subprocess.Popen, str, str]:
    log_path = log_dir / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "flashcp_service", "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0",
             "--max-request-bytes", str(64 * 1024 * 1024)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "FLASHCP_LOG_LEVEL": "info"},
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            if '"listening"' in line:
                event = json.loads(line)
                return process, f"http://127.0.0.1:{event['http_port']}", f"127.0.0.1:{event['grpc_port']}"
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"server did not start: {log_path.read_text()}")


def _load(avg: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in avg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (about a minute in all)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--canned-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.canned_server:
        serve_canned(1024, 8)
        return 0
    seconds = 1.0 if args.quick else 3.0
    throughput_seconds = 3.0 if args.quick else 10.0
    sizes = [(64, 8), (64, 64), (1024, 8), (1024, 64), (16384, 8), (16384, 64)]

    rows: list[str] = []
    skipped: list[str] = []
    baseline: dict[tuple[int, int], float] = {}
    cells: list[Cell] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        process, http_url, grpc_target = start_server(Path(tmp))
        try:
            for num_docs, cp_size in sizes:
                requests = make_requests(num_docs, cp_size, count=4, seed=num_docs * 1000 + cp_size)
                local = in_process(requests, seconds, 3)
                baseline[num_docs, cp_size] = 1e3 * statistics.median(local)
                min_runs = 3 if baseline[num_docs, cp_size] > 100 else 20
                print(f"in-process  docs={num_docs:>6} N={cp_size:>3}  p50 {baseline[num_docs, cp_size]:9.2f} ms",
                      flush=True)
                for transport, target in (("grpc", grpc_target), ("http", http_url)):
                    for clients in (1, 32):
                        if clients > 1 and baseline[num_docs, cp_size] * clients > MAX_CELL_MS:
                            skipped.append(f"{transport} docs={num_docs} N={cp_size} clients={clients}")
                            continue
                        runs = max(min_runs, clients) if clients > 1 else min_runs
                        run = drive(transport, target, requests, clients, seconds, runs)
                        latencies, wall, errors = asyncio.run(run)
                        cell = Cell(transport, num_docs, cp_size, clients, latencies, wall, errors)
                        cells.append(cell)
                        print(f"{transport:<5} docs={num_docs:>6} N={cp_size:>3} clients={clients:>2}  "
                              f"p50 {cell.p50_ms:9.2f} ms  p99 {cell.p99_ms:9.2f} ms  "
                              f"{cell.plans_per_s:8.1f} plans/s  errors {errors}", flush=True)
                        if (transport, num_docs, cp_size, clients) == ("grpc", 1024, 8, 1):
                            # The goal cell once more right away, as flashcp_client asks: no transfer lists.
                            run = drive(transport, target, requests, clients, seconds, runs, omit_transfers=True)
                            omit_goal = Cell(transport, num_docs, cp_size, clients, *asyncio.run(run))
                            print(f"grpc  docs={num_docs:>6} N={cp_size:>3} clients={clients:>2}  "
                                  f"p50 {omit_goal.p50_ms:9.2f} ms  p99 {omit_goal.p99_ms:9.2f} ms  "
                                  f"{omit_goal.plans_per_s:8.1f} plans/s  errors {omit_goal.errors}  (omit_transfers)",
                                  flush=True)
                if (num_docs, cp_size) == (1024, 8):
                    round_trip, work = measure_floor(requests, seconds)
                    print(f"floor docs={num_docs} N={cp_size}: canned gRPC round trip p50 {round_trip:.2f} ms, "
                          f"server work in-process p50 {work:.2f} ms", flush=True)
            tput_requests = make_requests(128, 8, count=8, seed=128)
            local_128 = 1e3 * statistics.median(in_process(tput_requests, seconds, 20))
            throughput = {}
            for label, target, omit in (("grpc", grpc_target, False), (OMIT_LABEL, grpc_target, True),
                                        ("http", http_url, False)):
                run = drive(label.split(",")[0], target, tput_requests, 32, throughput_seconds, 32, omit_transfers=omit)
                latencies, wall, errors = asyncio.run(run)
                throughput[label] = (len(latencies) / wall, errors, 1e3 * statistics.median(latencies))
                print(f"throughput {label}: 128 docs N=8, 32 clients, {throughput_seconds:.0f} s: "
                      f"{throughput[label][0]:.0f} plans/s, errors {errors}", flush=True)
        finally:
            process.terminate()
            process.wait(60)

    rows.append("| transport | docs | N | clients | p50 ms | p99 ms | plans/s | in-process p50 ms | overhead p50 ms "
                "| errors |")
    rows.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in cells:
        base = baseline[c.num_docs, c.cp_size]
        overhead = f"{c.p50_ms - base:.2f}" if c.clients == 1 else ""
        rows.append(f"| {c.transport} | {c.num_docs} | {c.cp_size} | {c.clients} | {c.p50_ms:.2f} | {c.p99_ms:.2f} | "
                    f"{c.plans_per_s:.1f} | {base:.2f} | {overhead} | {c.errors} |")
    goal = next(c for c in cells if (c.transport, c.num_docs, c.cp_size, c.clients) == ("grpc", 1024, 8, 1))
    text = "\n".join([
        "# Planner service benchmark (loopback)",
        "",
        f"`benchmarks/bench_service.py{' --quick' if args.quick else ''}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPU cores shared by server and clients; "
        f"{seconds:.0f} s per cell (at least 3-20 requests); strategy `flashcp`, one micro-batch per request; "
        "server access log on (INFO, to a file); requests list the transfers (the default) unless noted. "
        f"Load average (1/5/15 min) at the start {_load(load_before)}, at the end {_load(os.getloadavg())}.",
        "",
        *rows,
        "",
        *([f"Skipped (32 rounds of in-process planning alone exceed {MAX_CELL_MS / 1e3:.0f} s): "
           + "; ".join(skipped) + ".", ""] if skipped else []),
        f"Sustained throughput, 128-document requests at N=8, 32 clients, {throughput_seconds:.0f} s "
        f"(in-process p50 {local_128:.2f} ms):",
        "",
        *(f"- {t}: {v[0]:.0f} plans/s (p50 {v[2]:.2f} ms), errors {v[1]}" for t, v in throughput.items()),
        "",
        f"gRPC with `omit_transfers` (as `flashcp_client` sends), 1,024 documents at N=8, 1 client, measured "
        f"right after the same cell without it: p50 {omit_goal.p50_ms:.2f} ms, p99 {omit_goal.p99_ms:.2f} ms, "
        f"{omit_goal.plans_per_s:.1f} plans/s, errors {omit_goal.errors}.",
        "",
        f"Floor of the latency goal cell (1,024 documents at N=8, 1 client), measured right after it: a bare "
        f"grpc.aio server answering with a pre-encoded response of the same size, p50 {round_trip:.2f} ms round "
        f"trip; the server's work for the request run in-process (parse, decode, plan, encode, serialize), p50 "
        f"{work:.2f} ms; together {round_trip + work:.2f} ms.",
        "",
        f"Goals: gRPC p50 < 2 ms and p99 < 10 ms for 1,024 documents at N=8 (measured: p50 {goal.p50_ms:.2f} ms, "
        f"p99 {goal.p99_ms:.2f} ms; in-process planning alone: {baseline[1024, 8]:.2f} ms); "
        f">= 500 plans/s for 128-document requests (measured: gRPC {throughput['grpc'][0]:.0f}, "
        f"HTTP {throughput['http'][0]:.0f}).",
        "",
    ])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
