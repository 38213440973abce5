"""PlannerClient against real ``python -m flashcp_service`` processes on 127.0.0.1, over HTTP and gRPC.

Covers: remote plans equal embedded ones; the service's rejections are typed errors and never fall back;
the service SIGKILLed mid-run (calls fall back, are counted, plans stay identical; the breaker opens, then
closes again once a restarted service answers the half-open trial); an unreachable port; a server that
accepts connections but never answers (timeout path).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import flashcp_planner as fp
from flashcp_client import Backoff, BreakerPolicy, PlannerClient, ServiceUnavailable
from flashcp_client.sources import GrpcSource, HttpSource

BATCHES = [[4096, 517, 12000], [300, 200, 100, 50], [7000, 1, 1]]
CP = 4
MAX_DOCUMENTS = 64
"""Server-side document limit the service is started with (the client has none)."""
TRANSPORTS = ("http", "grpc")


def _service_missing() -> str | None:
    try:
        if importlib.util.find_spec("flashcp_service.__main__") is None:
            return "flashcp_service has no __main__ yet (python -m flashcp_service)"
    except ImportError as exc:
        return f"flashcp_service is not importable: {exc}"
    return None


needs_service = pytest.mark.skipif(_service_missing() is not None, reason=str(_service_missing()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Service:
    """One ``python -m flashcp_service`` process."""

    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log: Any = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    def address(self, transport: str) -> str:
        return self.http if transport == "http" else self.grpc

    def start(self, timeout_s: float = 45.0) -> Service:
        self.log = tempfile.TemporaryFile()
        env = dict(os.environ, FLASHCP_MAX_DOCUMENTS=str(MAX_DOCUMENTS), FLASHCP_LOG_LEVEL="warning",
                   PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "flashcp_service", "--http-port", str(self.http_port),
               "--grpc-port", str(self.grpc_port)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while not (_accepts(self.http_port) and _accepts(self.grpc_port)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                self.log.seek(0)
                pytest.fail(f"planner service did not start: {self.log.read().decode(errors='replace')[-2000:]}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.log is not None:
            self.log.close()
            self.log = None


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    svc = Service().start()
    yield svc
    svc.stop()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def embedded(batches: list[list[int]], **kwargs: Any) -> tuple[fp.Plan, ...]:
    return fp.plan(fp.PlanRequest(micro_batches=batches, cp_size=CP, **kwargs))


def unchecked_request(**kwargs: Any) -> fp.PlanRequest:
    """A request whose fields bypass the local validation, to see what the service says about them."""
    request = fp.PlanRequest(micro_batches=[[10]], cp_size=CP)
    for name, value in kwargs.items():
        object.__setattr__(request, name, value)
    return request


# ---------------------------------------------------------------- a healthy service


@needs_service
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_remote_plans_equal_embedded_plans(service: Service, transport: str) -> None:
    client = PlannerClient(service.address(transport), fallback=False)
    custom = {"base": "h100-llama8b", "name": "slow-net", "inter_node_gbps": 5.0, "gpus_per_node": 2}
    for kwargs in ({}, {"strategy": "per_doc"}, {"strategy": "zigzag", "capacity_slack": 0.5},
                   {"cost_model": custom}, {"options": fp.PlanOptions(comm=fp.CommMode.EXACT_NEED)}):
        plans = client.plan(BATCHES, cp_size=CP, **kwargs)
        request = client.make_request(BATCHES, cp_size=CP, **kwargs)
        assert plans == fp.plan(request), kwargs
        assert [p.fingerprint() for p in plans] == [p.fingerprint() for p in fp.plan(request)]
    stats = client.stats
    assert (stats.requests, stats.remote_ok, stats.fallbacks, stats.errors) == (5, 5, 0, 0)


@needs_service
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_remote_optimum_equals_embedded_optimum(service: Service, transport: str) -> None:
    options = fp.PlanOptions(time_limit_s=5.0, num_workers=1, random_seed=3)
    client = PlannerClient(service.address(transport), fallback=False, strategy="optimum", options=options)
    batches = [[300, 200, 100, 40], [500, 20]]
    plans = client.plan(batches, cp_size=2)
    reference = fp.plan(client.make_request(batches, cp_size=2))
    assert [p.optimality.status for p in plans] == ["optimal", "optimal"]
    # Fingerprints leave out the solver wall time, the one field that differs between runs.
    assert [p.fingerprint() for p in plans] == [p.fingerprint() for p in reference]
    assert client.stats.remote_ok == 1


@needs_service
@pytest.mark.parametrize(
    "transport",
    ["http", "grpc"],
)
def test_custom_efficiency_curve_reaches_the_service(service: Service, transport: str) -> None:
    curve = {"name": "curve", "attention_efficiency": [[256, 0.2], [8192, 0.9]]}
    client = PlannerClient(service.address(transport), fallback=False, cost_model=curve)
    plans = client.plan(BATCHES, cp_size=CP)
    assert plans[0].cost_model == "curve"
    assert plans == fp.plan(client.make_request(BATCHES, cp_size=CP))


@needs_service
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_service_rejections_are_typed_and_never_fall_back(service: Service, transport: str) -> None:
    client = PlannerClient(service.address(transport))
    too_many = [[8] * (MAX_DOCUMENTS + 1)]  # fine locally, over the server's limit
    with pytest.raises(fp.InvalidRequest, match="exceed the server limit") as info:
        client.plan(too_many, cp_size=CP)
    assert info.value.field == "micro_batches"
    stats = client.stats
    assert (stats.fallbacks, stats.errors, stats.rejected, stats.breaker_state) == (0, 0, 1, "closed")

    source = HttpSource(service.http) if transport == "http" else GrpcSource(f"127.0.0.1:{service.grpc_port}")
    with pytest.raises(fp.InvalidRequest, match="1") as info:
        source.fetch(unchecked_request(micro_batches=((10, 0),)), timeout_s=5.0)
    assert info.value.field == "micro_batches[0][1]"
    with pytest.raises(fp.InvalidRequest) as info:
        source.fetch(unchecked_request(strategy="no-such-strategy"), timeout_s=5.0)
    assert info.value.field == "strategy"
    with pytest.raises(fp.Infeasible, match="fit"):
        source.fetch(unchecked_request(micro_batches=((100, 100),), capacity=10), timeout_s=5.0)
    source.close()


@needs_service
def test_prefetch_from_the_service(service: Service) -> None:
    client = PlannerClient(service.http, fallback=False)
    steps = [[[100 * (i + 1), 37], [513]] for i in range(6)]
    with client.prefetch(steps, cp_size=CP, depth=2) as prefetched:
        got = list(prefetched)
    assert [s for s, _ in got] == steps
    assert all(plans == embedded(step) for step, plans in got)
    assert client.stats.remote_ok == 6


# ---------------------------------------------------------------- the service dies mid-run


@needs_service
def test_service_killed_mid_run_falls_back_then_recovers() -> None:
    svc = Service().start()
    clock = FakeClock()
    clients = {
        transport: PlannerClient(svc.address(transport), timeout_s=5.0, retries=1, backoff=Backoff(base_s=0.01),
                                 breaker=BreakerPolicy(failure_threshold=2, reset_timeout_s=30.0), clock=clock,
                                 sleep=lambda s: None)
        for transport in TRANSPORTS
    }
    steps = [[[1000 + 10 * i, 200, 3000 - i], [64] * 8] for i in range(7)]
    try:
        for step in steps[:2]:
            for client in clients.values():
                assert client.plan(step, cp_size=CP) == embedded(step)
        svc.kill()
        for step in steps[2:5]:
            for client in clients.values():
                assert client.plan(step, cp_size=CP) == embedded(step)
        for transport, client in clients.items():
            stats = client.stats
            # Two failed calls (each retried once) opened the breaker; the third call skipped the service.
            assert (stats.requests, stats.remote_ok, stats.fallbacks) == (5, 2, 3), transport
            assert (stats.errors, stats.retries, stats.breaker_state, stats.breaker_opens) == (2, 2, "open", 1)
            assert stats.last_error

        svc = Service(http_port=svc.http_port, grpc_port=svc.grpc_port).start()
        step = steps[5]
        for client in clients.values():
            assert client.plan(step, cp_size=CP) == embedded(step)  # still open: planned in-process
        clock.now += 30.0
        for transport, client in clients.items():
            assert client.stats.breaker_state == "half_open"
            assert client.plan(steps[6], cp_size=CP) == embedded(steps[6])  # the trial reaches the new service
            stats = client.stats
            assert (stats.remote_ok, stats.fallbacks, stats.breaker_state) == (3, 4, "closed"), transport
    finally:
        svc.stop()
        for client in clients.values():
            client.close()


# ---------------------------------------------------------------- unreachable and silent services


class SilentServer:
    """Accepts TCP connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unreachable_service_falls_back_after_retries(transport: str) -> None:
    address = f"{transport}://127.0.0.1:{free_port()}"
    client = PlannerClient(address, retries=2, backoff=Backoff(base_s=0.001))
    assert client.plan(BATCHES, cp_size=CP) == embedded(BATCHES)
    stats = client.stats
    assert (stats.requests, stats.fallbacks, stats.errors, stats.retries, stats.remote_ok) == (1, 1, 1, 2, 0)
    strict = PlannerClient(address, retries=0, fallback=False)
    with pytest.raises(ServiceUnavailable, match="127.0.0.1"):
        strict.plan(BATCHES, cp_size=CP)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_silent_service_times_out_then_falls_back(silent: SilentServer, transport: str) -> None:
    address = f"{transport}://127.0.0.1:{silent.port}"
    client = PlannerClient(address, timeout_s=0.3, retries=0)
    assert client.plan(BATCHES, cp_size=CP) == embedded(BATCHES)
    stats = client.stats
    assert (stats.fallbacks, stats.errors, stats.remote_ok) == (1, 1, 0)
    assert "no answer within 0.3 s" in stats.last_error
    strict = PlannerClient(address, timeout_s=0.3, retries=0, fallback=False)
    with pytest.raises(ServiceUnavailable, match="no answer within 0.3 s"):
        strict.plan(BATCHES, cp_size=CP)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_hung_service_costs_a_call_at_most_the_default_deadline(silent: SilentServer, transport: str) -> None:
    client = PlannerClient(f"{transport}://127.0.0.1:{silent.port}")  # default timeouts, retries and deadline
    assert client.timeout_s < 1.0 and client.deadline_s <= 1.0
    started = time.monotonic()
    assert client.plan(BATCHES, cp_size=CP) == embedded(BATCHES)
    elapsed = time.monotonic() - started
    stats = client.stats
    assert (stats.fallbacks, stats.errors, stats.remote_ok) == (1, 1, 0)
    assert "no answer within" in stats.last_error
    # The deadline bounds attempts plus backoff; the slack covers the in-process plan and a loaded machine.
    assert elapsed < client.deadline_s + 2.0, f"a hung service stalled the call {elapsed:.2f} s"
