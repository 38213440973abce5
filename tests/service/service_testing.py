"""Helpers of the service tests: small settings, an in-process gRPC server thread, a server subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from flashcp_service import PlannerService, Settings

REPO = Path(__file__).resolve().parents[2]


def small_settings(**overrides) -> Settings:
    """Settings with limits small enough to hit in tests (no environment read for these fields)."""
    values = dict(
        host="127.0.0.1",
        http_port=0,
        grpc_port=0,
        max_documents=2000,
        max_document_ranks=50_000,
        max_micro_batches=16,
        max_request_bytes=256 * 1024,
        max_solver_time_s=5.0,
        solver_workers=1,
        solver_queue=1,
        drain_timeout_s=20.0,
        log_level="warning",
    )
    values.update(overrides)
    return Settings(**values)


class GrpcServerThread:
    """A grpc.aio server over ``service`` on its own event loop in a background thread."""

    def __init__(self, service: PlannerService) -> None:
        from flashcp_service.grpc_server import create_server

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start():
            server, port = await create_server(service, "127.0.0.1:0")
            await server.start()
            return server, port

        self.server, self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        self.target = f"127.0.0.1:{self.port}"

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class ServerProcess:
    """A ``python -m flashcp_service`` subprocess listening on loopback."""

    process: subprocess.Popen
    http_url: str
    grpc_target: str
    log_path: Path

    def log_lines(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"raw": line})
        return out

    def terminate(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def start_server_process(
    tmp_path: Path, *extra_args: str, env: dict[str, str] | None = None, command: list[str] | None = None
) -> ServerProcess:
    """Start the server with OS-chosen ports; the ports are read from its "listening" log line.

    ``command`` defaults to ``python -m flashcp_service``.
    """
    log_path = tmp_path / f"server-{time.monotonic_ns()}.log"
    full_env = {**os.environ, "FLASHCP_LOG_LEVEL": "info", **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*(command or [sys.executable, "-m", "flashcp_service"]),
             "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", *extra_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=REPO,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log_path.read_text()}")
        for line in log_path.read_text().splitlines():
            if '"listening"' in line:
                event = json.loads(line)
                return ServerProcess(
                    process=process,
                    http_url=f"http://127.0.0.1:{event['http_port']}",
                    grpc_target=f"127.0.0.1:{event['grpc_port']}",
                    log_path=log_path,
                )
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"server did not start: {log_path.read_text()}")
