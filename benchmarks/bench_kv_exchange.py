"""KV bytes moved by the executor per strategy, measured on gloo CPU ranks, against the planner's prediction.

Spawns N gloo processes on this machine. Each plans the same micro-batches
(ProLong-like workload, ``h100-llama8b`` cost model: 8 KV heads x 128 dims,
2-byte elements), fills its local K/V in float16 and runs the forward KV
exchange of :mod:`flashcp_client.kv_exchange` for every strategy. Reported
per strategy: KV bytes each rank received (measured from the tensors that
crossed ``all_to_all_single``), whether every rank's sent and received bytes
equal the plan's ``RankCost``, the total relative to all-per-doc with
all-gather, and the wall time of the exchange over loopback gloo (CPU, for
orientation only: not a GPU interconnect figure).

    python benchmarks/bench_kv_exchange.py             # N=4, context 32K, 2 micro-batches
    python benchmarks/bench_kv_exchange.py --quick     # N=4, context 8K, 1 micro-batch
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "kv_exchange.md"
CASES = (("per_doc", "all_gather"), ("zigzag", "all_gather"), ("contiguous", "all_gather"),
         ("per_doc", "exact_need"), ("whole_doc", "exact_need"), ("flashcp", "sharding_aware"),
         ("flashcp", "exact_need"))


def _worker(rank: int, n: int, port: int, context: int, micro_batches: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from flashcp_client import CommStats, exchange_kv, rank_layout
    from flashcp_planner import Infeasible, PlanOptions, PlanRequest, get_preset, plan
    from flashcp_planner.workloads import generate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n)
    cm = get_preset("h100-llama8b")
    batches = generate("prolong", context=context, seed=0, num_micro_batches=micro_batches)
    rows = []
    for strategy, comm in CASES:
        try:
            plans = plan(PlanRequest(micro_batches=batches, cp_size=n, cost_model=cm, strategy=strategy,
                                     options=PlanOptions(comm=comm)))
        except Infeasible as exc:  # the same on every rank: whole_doc when a document exceeds the capacity
            rows.append({"strategy": strategy, "comm": comm, "infeasible": str(exc)})
            continue
        stats, walls, match = CommStats(), [], True
        for p in plans:
            local = rank_layout(p, rank).num_local_tokens
            k = torch.randn(local, cm.num_kv_heads, cm.head_dim).half()
            v = torch.randn_like(k)
            before = (stats.forward_recv_bytes, stats.forward_send_bytes)
            for rep in range(3):
                dist.barrier()
                t0 = time.perf_counter()
                exchange_kv(k, v, p, stats=stats if rep == 0 else None)
                walls.append(time.perf_counter() - t0)
            got = (stats.forward_recv_bytes - before[0], stats.forward_send_bytes - before[1])
            match &= got == (p.ranks[rank].cost.recv_bytes, p.ranks[rank].cost.send_bytes)
        rows.append({"strategy": strategy, "comm": comm, "recv_bytes": stats.forward_recv_bytes,
                     "send_bytes": stats.forward_send_bytes, "match": match,
                     "wall_ms": 1e3 * statistics.median(walls)})
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cp-size", type=int, default=4)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.context, args.micro_batches = 8192, 1
    n = args.cp_size
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_dir = tempfile.mkdtemp()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, n, port, args.context, args.micro_batches, out_dir))
             for r in range(n)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(600)
        if proc.exitcode != 0:
            print(f"worker failed with exit code {proc.exitcode}", file=sys.stderr)
            return 1
    per_rank = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(n)]
    reference = sum(per_rank[r][0]["recv_bytes"] for r in range(n))
    lines = [
        f"# KV exchange, measured (gloo CPU, N={n}, ProLong-like, context {args.context}, "
        f"{args.micro_batches} micro-batch(es), h100-llama8b: 8 KV heads x 128, fp16)",
        "",
        "| strategy | comm | recv MiB per rank (measured) | = planner on every rank | total vs per_doc all-gather "
        "| exchange wall ms (loopback gloo, median) |",
        "|---|---|---|---|---|---|",
    ]
    for i, (strategy, comm) in enumerate(CASES):
        cells = [per_rank[r][i] for r in range(n)]
        if "infeasible" in cells[0]:
            lines.append(f"| {strategy} | {comm} | infeasible: {cells[0]['infeasible']} | | | |")
            continue
        recv = " / ".join(f"{c['recv_bytes'] / 2**20:.1f}" for c in cells)
        total = sum(c["recv_bytes"] for c in cells)
        match = all(c["match"] for c in cells)
        wall = max(c["wall_ms"] for c in cells)
        lines.append(f"| {strategy} | {comm} | {recv} | {'yes' if match else 'NO'} | "
                     f"{total / reference:.3f} | {wall:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    return 0 if all(c.get("match", True) for rank in per_rank for c in rank) else 1


if __name__ == "__main__":
    sys.exit(main())
