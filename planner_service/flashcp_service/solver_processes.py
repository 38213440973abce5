"""One process per exact search, forked from a preloaded fork server, so a search can be killed.

A ``concurrent.futures.ProcessPoolExecutor`` cannot stop a call once a worker
has taken it; a caller that cancels (gRPC cancel, expired deadline, client
gone) would leave its CP-SAT search burning a core until its time limit. Here
each search runs in its own child of the ``forkserver`` context (the server
process runs gRPC threads, so plain ``fork`` is unsafe; ``spawn`` would pay
the imports on every search): the fork server preloads the planner and
OR-Tools once, a search starts in milliseconds, and cancelling it kills its
process at once. Each child caps its own address space.
"""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from flashcp_planner.errors import Infeasible, InvalidRequest

__all__ = ["SearchDied", "SolverProcess", "start_fork_server"]

_PRELOAD = ["flashcp_planner", "flashcp_planner.strategies", "ortools.sat.python.cp_model"]
_context = None


def _mp_context():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)  # modules that fail to import are skipped
    return _context


def start_fork_server() -> None:
    """Start the fork server now (it imports OR-Tools: seconds), not on the first search."""
    _mp_context()
    from multiprocessing import forkserver

    forkserver.ensure_running()


class SearchDied(Exception):
    """The search process ended without an answer (killed, usually by its memory limit)."""


def _child_main(conn: Connection, entry: Callable[..., Any], args: tuple, memory_bytes: int) -> None:
    # Normally a no-op (the fork server preloaded them), but a fork server started earlier by
    # other code in this process has no preload: import before the memory limit applies.
    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    if memory_bytes:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    # Core errors are sent as plain data: InvalidRequest does not survive pickling.
    try:
        outcome: tuple = ("ok", entry(*args))
    except InvalidRequest as exc:
        outcome = ("invalid", exc.field, exc.problem)
    except Infeasible as exc:
        outcome = ("infeasible", str(exc))
    except MemoryError:
        outcome = ("memory",)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which logs it
        outcome = ("error", f"{type(exc).__name__}: {exc}")
    conn.send(outcome)
    conn.close()


class SolverProcess:
    """One running search. Use :meth:`result` once, then :meth:`stop` (always)."""

    def __init__(self, entry: Callable[..., Any], args: tuple, *, memory_bytes: int) -> None:
        context = _mp_context()
        self._conn, child_conn = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_child_main, args=(child_conn, entry, args, memory_bytes), daemon=True, name="flashcp-solver"
        )
        self._process.start()
        child_conn.close()

    async def result(self) -> Any:
        """Wait for the answer without blocking the event loop.

        Raises:
            InvalidRequest, Infeasible: raised by the search.
            SearchDied: the process died (memory limit) or failed unexpectedly.
        """
        loop = asyncio.get_running_loop()
        readable = loop.create_future()
        fd = self._conn.fileno()
        loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
        try:
            await readable
        finally:
            loop.remove_reader(fd)
        try:
            outcome = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(1)
            raise SearchDied(f"the search process died (exit code {self._process.exitcode})") from None
        kind = outcome[0]
        if kind == "ok":
            return outcome[1]
        if kind == "invalid":
            raise InvalidRequest(outcome[1], outcome[2])
        if kind == "infeasible":
            raise Infeasible(outcome[1])
        if kind == "memory":
            raise SearchDied("the search ran out of memory")
        raise RuntimeError(f"the search failed: {outcome[1]}")

    def stop(self) -> None:
        """Kill the process if it still runs and reap it (idempotent, fast)."""
        if self._process.is_alive():
            self._process.kill()
        self._process.join(5)
        self._conn.close()
