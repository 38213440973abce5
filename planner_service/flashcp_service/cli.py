"""``flashcp serve`` / ``python -m flashcp_service``: both transports in one process and one event loop.

``flashcp_planner.cli`` adds the ``serve`` subcommand with
:func:`add_serve_arguments` and runs it with :func:`run_serve`. Flags override
``FLASHCP_*`` environment variables (:class:`Settings`). SIGTERM (or SIGINT)
drains: readiness and gRPC health turn NOT_SERVING, new requests get
UNAVAILABLE / 503, in-flight requests complete (up to ``drain_timeout_s``),
then the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

from pydantic import ValidationError

from flashcp_service.access_log import JsonFormatter
from flashcp_service.settings import Settings

__all__ = ["add_explore_arguments", "add_serve_arguments", "main", "run_explore", "run_serve", "serve",
           "settings_from_args"]

_log = logging.getLogger("flashcp_service")

# (flag, Settings field, type, help)
_FLAGS = (
    ("--host", "host", str, "interface to bind (env FLASHCP_HOST; default 127.0.0.1)"),
    ("--http-port", "http_port", int, "HTTP port, 0 = any free port (env FLASHCP_HTTP_PORT; default 8080)"),
    ("--grpc-port", "grpc_port", int, "gRPC port, 0 = any free port (env FLASHCP_GRPC_PORT; default 50051)"),
    ("--max-documents", "max_documents", int, "most documents per request (env FLASHCP_MAX_DOCUMENTS)"),
    ("--max-request-bytes", "max_request_bytes", int, "largest request accepted (env FLASHCP_MAX_REQUEST_BYTES)"),
    ("--max-solver-time", "max_solver_time_s", float, "cap on solver time limits, s (env FLASHCP_MAX_SOLVER_TIME_S)"),
    ("--solver-workers", "solver_workers", int, "processes for exact searches (env FLASHCP_SOLVER_WORKERS)"),
    ("--solver-queue", "solver_queue", int, "exact searches allowed to wait (env FLASHCP_SOLVER_QUEUE)"),
    ("--drain-timeout", "drain_timeout_s", float, "SIGTERM grace, s (env FLASHCP_DRAIN_TIMEOUT_S)"),
    ("--recent-plans", "recent_plans", int, "keep the last N plans for /ui Live, 0 = off (env FLASHCP_RECENT_PLANS)"),
    ("--log-level", "log_level", str, "debug, info, warning or error (env FLASHCP_LOG_LEVEL)"),
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` flags to ``parser``; every flag defaults to the environment / built-in value."""
    for flag, dest, kind, help_text in _FLAGS:
        metavar = {int: "N", float: "SECONDS" if dest.endswith("_s") else "X", str: dest.upper()}[kind]
        parser.add_argument(flag, dest=f"serve_{dest}", type=kind, default=None, metavar=metavar, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags that were given.

    Raises:
        pydantic.ValidationError: a value is out of range (the message names it).
    """
    overrides = {dest: getattr(args, f"serve_{dest}", None) for _, dest, _, _ in _FLAGS}
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # JsonFormatter writes none of the caller, thread or process fields, so every log record
    # (one per request: the access log) skips collecting them (the logging HOWTO's "Optimization"
    # switches; about a third of the cost of an access line).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


_GC_GEN0_THRESHOLD = 10_000
"""Allocations between young-generation collections in a server process (CPython's default: 700)."""


def _tune_gc_for_serving() -> None:
    """Take start-up objects out of the collector's sight and collect the young generation less often.

    Server processes only (:func:`run_serve`), never the planning core or client library. A server
    that imported gRPC, FastAPI, pydantic and the planner holds about 70,000 long-lived tracked
    objects, and every full collection walked all of them: a pause of about 30 ms on this project's
    2-core test machine, landing on whichever request was running (loopback gRPC, 1,024-document
    requests, one client: p99 about halved with this, p50 unchanged). ``gc.freeze()`` moves
    everything alive now to the permanent generation, which collections skip. A plan under
    construction holds thousands of young tracked objects (segments, lists), which every young
    collection walks; collecting every 10,000 allocations instead of 700 walks them fewer times.
    Acyclic garbage is still freed at once by reference counting; cycles wait a little longer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


def run_serve(args: argparse.Namespace) -> int:
    """Run both servers until SIGTERM / SIGINT; return the process exit code.

    0 after a clean drain; 2 for invalid settings; 1 when a port cannot be bound.
    """
    try:
        settings = settings_from_args(args)
        _configure_logging(settings.log_level)
    except (ValidationError, ValueError) as exc:
        print(f"flashcp serve: invalid setting: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(settings, tune_gc=True))
    except (OSError, RuntimeError) as exc:  # a port is taken or the address is invalid
        _log.error("cannot start: %s", exc)
        return 1


def _bind_http_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say
    # so, and without it Nagle + delayed ACK add ~40 ms to every HTTP response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.contextmanager
def _signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> Iterator[None]:
    handled = (signal.SIGTERM, signal.SIGINT)
    for sig in handled:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


async def serve(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    tune_gc: bool = False,
    on_listening: Callable[[int], None] | None = None,
) -> int:
    """Serve gRPC and HTTP on the running loop until ``stop`` is set or a signal arrives, then drain.

    Args:
        settings: ports and limits.
        stop: set it to shut down (tests); SIGTERM / SIGINT set it too.
        tune_gc: once started, tune the garbage collector of this process for serving
            (:func:`_tune_gc_for_serving`; :func:`run_serve`, which owns the process, does).
        on_listening: called with the HTTP port once its socket is bound (``flashcp explore``);
            the HTTP server accepts connections a moment later.

    Returns:
        0 after a clean drain, 1 when the HTTP server died on its own.

    Raises:
        OSError: the HTTP port cannot be bound.
        RuntimeError: the gRPC port cannot be bound.
    """
    import uvicorn

    from flashcp_service.grpc_server import create_server
    from flashcp_service.http_app import create_app
    from flashcp_service.service import PlannerService

    class _EmbeddedUvicorn(uvicorn.Server):
        """uvicorn without its own signal handling: this loop owns SIGTERM."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    loop = asyncio.get_running_loop()
    stop = stop if stop is not None else asyncio.Event()
    service = PlannerService(settings)
    http_socket = _bind_http_socket(settings.host, settings.http_port)
    grpc_server, grpc_port = await create_server(service, _grpc_address(settings.host, settings.grpc_port))
    config = uvicorn.Config(
        create_app(service),
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )
    http_server = _EmbeddedUvicorn(config)
    await grpc_server.start()
    from flashcp_service.solver_processes import start_fork_server

    warm_up = asyncio.create_task(asyncio.to_thread(start_fork_server))
    if tune_gc:
        _tune_gc_for_serving()  # after start-up: the servers, the app and every import are long-lived
    with _signals(loop, stop):
        http_task = asyncio.create_task(http_server.serve(sockets=[http_socket]))
        stop_task = asyncio.create_task(stop.wait())
        _log.info(
            json.dumps(
                {
                    "event": "listening",
                    "host": settings.host,
                    "http_port": http_socket.getsockname()[1],
                    "grpc_port": grpc_port,
                }
            )
        )
        if on_listening is not None:
            on_listening(http_socket.getsockname()[1])
        await asyncio.wait((http_task, stop_task), return_when=asyncio.FIRST_COMPLETED)
        failed = http_task.done() and not stop.is_set()
        if failed:
            _log.error("the HTTP server stopped unexpectedly: %r", http_task.exception())
        _log.info("draining: refusing new work, waiting for in-flight requests")
        await service.begin_drain()
        http_server.should_exit = True
        await asyncio.gather(grpc_server.stop(grace=settings.drain_timeout_s), http_task, return_exceptions=True)
        stop_task.cancel()
    await warm_up
    await asyncio.to_thread(service.close)
    http_socket.close()
    _log.info("stopped")
    return 1 if failed else 0


def add_explore_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``explore`` flags to ``parser``."""
    parser.add_argument("--port", type=int, default=0, metavar="N", help="HTTP port on 127.0.0.1 (default: any free)")
    parser.add_argument("--recent-plans", type=int, default=256, metavar="K",
                        help="plans kept for the Live view (default: %(default)s)")
    parser.add_argument("--no-browser", action="store_true", help="print the page's address, open no browser")


def run_explore(args: argparse.Namespace) -> int:
    """Serve the plan explorer on loopback (any free port) and open it in a browser; Ctrl-C stops it.

    Returns the exit code of :func:`serve`; 2 for invalid flags, 1 when the port cannot be bound.
    """
    import webbrowser

    try:
        settings = Settings(host="127.0.0.1", http_port=args.port, grpc_port=0, recent_plans=args.recent_plans,
                            log_level="warning")
    except ValidationError as exc:
        print(f"flashcp explore: invalid setting: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)

    def announce(port: int) -> None:
        # The socket is bound, but uvicorn starts listening a moment later: wait until it answers.
        url = f"http://127.0.0.1:{port}/ui/"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.02)
        print(f"FlashCP plan explorer: {url} (Ctrl-C stops it)", file=sys.stderr, flush=True)
        if not args.no_browser:
            webbrowser.open(url)

    def bound(port: int) -> None:
        threading.Thread(target=announce, args=(port,), daemon=True).start()

    try:
        return asyncio.run(serve(settings, on_listening=bound))
    except (OSError, RuntimeError) as exc:
        print(f"flashcp explore: cannot start: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """``python -m flashcp_service [flags]``."""
    parser = argparse.ArgumentParser(
        prog="python -m flashcp_service", description="Run the FlashCP planner (gRPC + HTTP) until SIGTERM."
    )
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))
