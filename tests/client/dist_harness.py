"""Run a check function on n spawned gloo ranks; each rank records named results the test asserts.

``run_group(checks, n, out_dir)`` spawns ``n`` processes (forkserver, torch
preloaded), initialises a gloo group with a process-group timeout of
``PG_TIMEOUT_S`` and calls ``checks(rank, n, record)`` on each. The parent
waits at most ``join_timeout_s`` (well under the process-group timeout): a rank
still running then is a hang, killed and reported.
"""

from __future__ import annotations

import json
import socket
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

PG_TIMEOUT_S = 600
"""Process-group timeout of the spawned groups: a check that relied on it would blow the join timeout."""


def _worker(checks: Any, rank: int, n: int, port: int, out_dir: str, env: dict[str, str]) -> None:
    import os

    import torch
    import torch.distributed as dist

    os.environ.update(env)
    torch.set_num_threads(1)
    results: dict[str, Any] = {}

    path = Path(out_dir, f"rank{rank}.json")

    def record(name: str, ok: bool, detail: Any = "") -> None:
        results[name] = {"ok": bool(ok), "detail": detail}
        _write(path, results)  # a hang later still leaves what ran

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n,
                                timeout=timedelta(seconds=PG_TIMEOUT_S))
        checks(rank, n, record)
    except BaseException:  # report everything to the parent, which owns the assertions
        results["fatal"] = {"ok": False, "detail": traceback.format_exc()}
    finally:
        _write(path, results)
        # Skip destroy_process_group: a check may leave a timed-out collective behind on purpose.
        os._exit(0)


def _write(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, default=str))
    tmp.replace(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(
    checks: Any, n: int, out_dir: Path, *, join_timeout_s: float = 120, env: dict[str, str] | None = None
) -> tuple[list[int], dict[int, dict[str, Any]]]:
    """Run ``checks`` on ``n`` ranks; returns ``(hung_ranks, results_by_rank)``."""
    import multiprocessing as mp
    import time

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch"])
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(checks, r, n, port, str(out_dir), dict(env or {})), daemon=True)
             for r in range(n)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + join_timeout_s
    hung = []
    for rank, proc in enumerate(procs):
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            hung.append(rank)
            proc.kill()
            proc.join(5)
    results = {}
    for r in range(n):
        path = Path(out_dir, f"rank{r}.json")
        results[r] = json.loads(path.read_text()) if path.exists() else {}
    return hung, results


def describe(results: dict[int, dict[str, Any]]) -> str:
    """The last check each rank recorded (where a hung group stopped)."""
    return "; ".join(f"rank {r}: {list(res)[-1] if res else 'nothing'}" for r, res in results.items())


def assert_group_ok(hung: list[int], results: dict[int, dict[str, Any]], join_timeout_s: float = 120) -> None:
    """No rank hung, every rank wrote results and none crashed."""
    assert not hung, f"ranks {hung} still running after {join_timeout_s}s (hung collective?); {describe(results)}"
    for rank, res in results.items():
        assert res, f"rank {rank} wrote no results"
        assert "fatal" not in res, f"rank {rank} crashed:\n{res['fatal']['detail']}"
