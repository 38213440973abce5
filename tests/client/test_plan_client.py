"""PlannerClient: embedded planning, the HTTP source against a scripted local server, bad responses, 4xx,
retries, the breaker, logging, pickling and prefetch. Only 127.0.0.1 traffic, no sleeping on retries."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

import flashcp_planner as fp
from flashcp_client import (
    Backoff,
    BreakerPolicy,
    InvalidServiceResponse,
    PlannerClient,
    Prefetcher,
    ServiceUnavailable,
)
from flashcp_client.sources import request_to_wire
from flashcp_planner.presets import cost_model_from_dict

BATCHES = [[4096, 517, 12000], [300, 200, 100, 50], [7000]]

Responder = Callable[[dict[str, Any]], tuple[int, bytes]]


class ScriptedServer:
    """A local HTTP server whose answer to ``POST /v1/plan`` is set by the test."""

    def __init__(self) -> None:
        self.hits = 0
        self.bodies: list[dict[str, Any]] = []
        self.responder: Responder = lambda body: (500, b"not scripted")
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length))
                outer.hits += 1
                outer.bodies.append(body)
                status, payload = outer.responder(body)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def plan_with_core(body: dict[str, Any]) -> list[dict[str, Any]]:
    """What a correct service answers: the core's plans for the wire body."""
    cm = body["cost_model"]
    request = fp.PlanRequest(
        micro_batches=body["micro_batches"], cp_size=body["cp_size"], strategy=body["strategy"],
        cost_model=fp.get_preset(cm) if isinstance(cm, str) else cost_model_from_dict(cm),
        capacity_slack=body["capacity_slack"],
    )
    return [p.to_dict() for p in fp.plan(request)]


def ok(plans: list[dict[str, Any]]) -> tuple[int, bytes]:
    return 200, json.dumps({"plans": plans}).encode()


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    s = ScriptedServer()
    yield s
    s.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def http_client(server: ScriptedServer, **kwargs: Any) -> PlannerClient:
    kwargs.setdefault("sleep", lambda s: None)
    kwargs.setdefault("timeout_s", 5.0)
    return PlannerClient(server.url, **kwargs)


def embedded(batches: list[list[int]], cp_size: int, **kwargs: Any) -> tuple[fp.Plan, ...]:
    return fp.plan(fp.PlanRequest(micro_batches=batches, cp_size=cp_size, **kwargs))


# ---------------------------------------------------------------- embedded


@pytest.mark.parametrize("strategy", ["flashcp", "per_doc", "zigzag", "contiguous", "whole_doc"])
def test_embedded_plans_equal_the_core(strategy: str) -> None:
    client = PlannerClient(strategy=strategy, capacity_slack=3.0)  # whole_doc needs room for 12000 tokens
    plans = client.plan(BATCHES, cp_size=4)
    assert plans == embedded(BATCHES, 4, strategy=strategy, capacity_slack=3.0)
    assert [p.doc_lengths for p in plans] == [tuple(b) for b in BATCHES]
    stats = client.stats
    assert (stats.source, stats.requests, stats.embedded, stats.remote_ok, stats.fallbacks) == ("embedded", 1, 1, 0, 0)


def test_per_call_overrides_and_cost_model_specs() -> None:
    client = PlannerClient(cost_model={"base": "h100-llama8b", "name": "slow-net", "inter_node_gbps": 5.0})
    plans = client.plan(BATCHES, cp_size=8, capacity_slack=0.5)
    assert plans[0].cost_model == "slow-net"
    assert plans == embedded(BATCHES, 8, capacity_slack=0.5, cost_model=client.cost_model)
    h200 = client.plan(BATCHES, cp_size=8, cost_model="h200-llama8b", strategy="per_doc")
    assert h200 == embedded(BATCHES, 8, cost_model=fp.get_preset("h200-llama8b"), strategy="per_doc")


@pytest.mark.parametrize(
    "kwargs, field",
    [({"micro_batches": [[10, 0]], "cp_size": 2}, "micro_batches[0][1]"),
     ({"micro_batches": [], "cp_size": 2}, "micro_batches"),
     ({"micro_batches": [[10]], "cp_size": 0}, "cp_size"),
     ({"micro_batches": [[10]], "cp_size": 2, "strategy": "nope"}, "strategy"),
     ({"micro_batches": [[10]], "cp_size": 2, "cost_model": "no-such-preset"}, "cost_model")],
)
def test_bad_input_is_rejected_locally_before_any_network_call(
    server: ScriptedServer, kwargs: dict[str, Any], field: str
) -> None:
    client = http_client(server, fallback=False)
    batches = kwargs.pop("micro_batches")
    with pytest.raises(fp.InvalidRequest) as info:
        client.plan(batches, **kwargs)
    assert info.value.field == field
    assert server.hits == 0
    assert (client.stats.requests, client.stats.rejected, client.stats.errors) == (1, 1, 0)


def test_infeasible_request_is_raised_locally(server: ScriptedServer) -> None:
    client = http_client(server)
    with pytest.raises(fp.Infeasible, match="do not fit"):
        client.plan([[100, 100]], cp_size=2, capacity=10)
    assert server.hits == 0
    assert client.stats.rejected == 1


@pytest.mark.parametrize("address", ["ftp://host:1", "grpc://host", "http://:80", "host:50051", "grpc://h:1/x"])
def test_malformed_addresses_are_rejected(address: str) -> None:
    with pytest.raises(ValueError, match="address"):
        PlannerClient(address)


def test_exact_strategies_get_their_solver_time_on_top_of_the_timeout() -> None:
    client = PlannerClient(timeout_s=2.0)
    assert client.attempt_timeout_s(client.make_request([[10]], cp_size=2)) == 2.0
    exact = client.make_request([[10]], cp_size=2, strategy="optimum", options=fp.PlanOptions(time_limit_s=30.0))
    assert client.attempt_timeout_s(exact) == 42.0  # 2 + the solver's wall-clock backstop (30 + 10)


@pytest.mark.parametrize("kwargs, field", [({"timeout_s": 0}, "timeout_s"), ({"retries": -1}, "retries"),
                                           ({"strategy": "nope"}, "strategy")])
def test_bad_client_options_are_rejected(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PlannerClient(**kwargs)


def test_import_needs_neither_grpc_nor_httpx() -> None:
    code = (
        "import sys\n"
        "sys.modules['grpc'] = None; sys.modules['httpx'] = None\n"
        "import flashcp_client\n"
        "plans = flashcp_client.PlannerClient().plan([[100, 20]], cp_size=2)\n"
        "assert len(plans) == 1\n"
        "try:\n"
        "    flashcp_client.PlannerClient('http://127.0.0.1:9', fallback=False).plan([[100]], cp_size=2)\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "needs httpx" in result.stdout


# ---------------------------------------------------------------- HTTP source, scripted server


def test_http_plans_come_from_the_service_and_are_verified(server: ScriptedServer) -> None:
    server.responder = lambda body: ok(plan_with_core(body))
    client = http_client(server, strategy="per_doc")
    plans = client.plan(BATCHES, cp_size=4)
    assert plans == embedded(BATCHES, 4, strategy="per_doc")
    assert server.hits == 1
    assert server.bodies[0] == request_to_wire(client.make_request(BATCHES, cp_size=4))
    assert server.bodies[0]["micro_batches"] == BATCHES and server.bodies[0]["cost_model"] == "h100-llama8b"
    stats = client.stats
    assert (stats.requests, stats.remote_ok, stats.fallbacks, stats.errors) == (1, 1, 0, 0)


def test_custom_cost_model_travels_as_an_object(server: ScriptedServer) -> None:
    server.responder = lambda body: ok(plan_with_core(body))
    client = http_client(server, cost_model={"name": "mine", "gemm_tflops": 300.0})
    plans = client.plan(BATCHES, cp_size=2)
    assert server.bodies[0]["cost_model"]["gemm_tflops"] == 300.0
    assert plans == embedded(BATCHES, 2, cost_model=client.cost_model)


def test_http_source_asks_for_plans_without_transfer_lists(server: ScriptedServer) -> None:
    def honour_omit(body: dict[str, Any]) -> tuple[int, bytes]:
        plans = plan_with_core(body)
        if body.get("omit_transfers"):
            for p in plans:
                del p["transfers"]
        return ok(plans)

    server.responder = honour_omit
    client = http_client(server, strategy="per_doc", options=fp.PlanOptions(comm=fp.CommMode.EXACT_NEED))
    plans = client.plan(BATCHES, cp_size=4)
    assert server.bodies[0]["omit_transfers"] is True
    expected = embedded(BATCHES, 4, strategy="per_doc", options=fp.PlanOptions(comm=fp.CommMode.EXACT_NEED))
    assert plans == expected
    assert all(p.transfers is None for p in plans)
    assert [fp.kv_transfers(p) for p in plans] == [fp.kv_transfers(p) for p in expected]
    assert any(fp.kv_transfers(p) for p in plans)


def _wrong_lengths(body: dict[str, Any]) -> tuple[int, bytes]:
    body = dict(body, micro_batches=[[n + 1 for n in mb] for mb in body["micro_batches"]])
    return ok(plan_with_core(body))


def _wrong_cp_size(body: dict[str, Any]) -> tuple[int, bytes]:
    return ok(plan_with_core(dict(body, cp_size=body["cp_size"] * 2)))


def _wrong_strategy(body: dict[str, Any]) -> tuple[int, bytes]:
    return ok(plan_with_core(dict(body, strategy="zigzag")))


def _one_plan_missing(body: dict[str, Any]) -> tuple[int, bytes]:
    return ok(plan_with_core(body)[:-1])


def _token_dropped(body: dict[str, Any]) -> tuple[int, bytes]:
    plans = plan_with_core(body)
    rank = plans[0]["ranks"][0]
    doc, start, end = rank["segments"][0]
    rank["segments"][0] = [doc, start, end - 1]
    rank["tokens"] -= 1
    return ok(plans)


def _future_version(body: dict[str, Any]) -> tuple[int, bytes]:
    plans = plan_with_core(body)
    plans[1]["version"] = 99
    return ok(plans)


GARBAGE: dict[str, tuple[Responder, str]] = {
    "invalid_json": (lambda body: (200, b"{plans: [oops"), "not valid JSON"),
    "no_plans_field": (lambda body: (200, b'{"result": []}'), "no 'plans' field"),
    "plans_not_list": (lambda body: (200, b'{"plans": 3}'), "not a list"),
    "wrong_lengths": (_wrong_lengths, "doc_lengths"),
    "wrong_cp_size": (_wrong_cp_size, "cp_size"),
    "wrong_strategy": (_wrong_strategy, "strategy"),
    "one_plan_missing": (_one_plan_missing, "returned 2 plans for 3 micro-batches"),
    "token_dropped": (_token_dropped, "not a valid plan"),
    "future_version": (_future_version, "version"),
    "not_found": (lambda body: (404, b"{}"), "HTTP 404"),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_garbage_raises_when_bad_response_fallback_is_off(server: ScriptedServer, case: str) -> None:
    server.responder, message = GARBAGE[case]
    client = http_client(server, strategy="per_doc", fallback_on_bad_response=False)
    with pytest.raises(InvalidServiceResponse, match=message):
        client.plan(BATCHES, cp_size=4)
    assert server.hits == 1  # garbage is not retried
    stats = client.stats
    assert (stats.requests, stats.errors, stats.fallbacks, stats.retries) == (1, 1, 0, 0)


@pytest.mark.parametrize("case", ["invalid_json", "wrong_lengths", "token_dropped"])
def test_garbage_falls_back_to_correct_plans_by_default(server: ScriptedServer, case: str) -> None:
    server.responder, message = GARBAGE[case]
    client = http_client(server, strategy="per_doc")
    plans = client.plan(BATCHES, cp_size=4)
    assert plans == embedded(BATCHES, 4, strategy="per_doc")
    stats = client.stats
    assert (stats.requests, stats.remote_ok, stats.fallbacks, stats.errors) == (1, 0, 1, 1)
    assert message in stats.last_error


def test_http_400_raises_invalid_request_with_the_servers_field(server: ScriptedServer) -> None:
    error = {"error": {"code": "INVALID_ARGUMENT", "field": "micro_batches[0]", "message": "too many documents"}}
    server.responder = lambda body: (400, json.dumps(error).encode())
    client = http_client(server)
    for _ in range(2):
        with pytest.raises(fp.InvalidRequest, match="too many documents") as info:
            client.plan(BATCHES, cp_size=4)
        assert info.value.field == "micro_batches[0]"
    assert server.hits == 2  # never retried
    stats = client.stats
    assert (stats.fallbacks, stats.errors, stats.rejected, stats.breaker_state) == (0, 0, 2, "closed")


def test_http_422_fastapi_validation_detail_names_the_field(server: ScriptedServer) -> None:
    detail = {"detail": [{"loc": ["body", "cp_size"], "msg": "Input should be a valid integer", "type": "int"}]}
    server.responder = lambda body: (422, json.dumps(detail).encode())
    with pytest.raises(fp.InvalidRequest, match="valid integer") as info:
        http_client(server).plan(BATCHES, cp_size=4)
    assert info.value.field == "cp_size"


def test_http_409_raises_infeasible(server: ScriptedServer) -> None:
    error = {"error": {"code": "FAILED_PRECONDITION", "message": "micro_batches[0]: does not fit"}}
    server.responder = lambda body: (409, json.dumps(error).encode())
    with pytest.raises(fp.Infeasible, match="does not fit"):
        http_client(server).plan(BATCHES, cp_size=4)


def test_5xx_is_retried_with_backoff_then_falls_back(server: ScriptedServer) -> None:
    server.responder = lambda body: (503, b"overloaded")
    waits: list[float] = []
    client = http_client(server, retries=3, backoff=Backoff(base_s=0.01, jitter=0.0), sleep=waits.append)
    plans = client.plan(BATCHES, cp_size=4)
    assert plans == embedded(BATCHES, 4)
    assert server.hits == 4
    assert waits == pytest.approx([0.01, 0.02, 0.04])
    stats = client.stats
    assert (stats.retries, stats.errors, stats.fallbacks, stats.remote_ok) == (3, 1, 1, 0)
    assert "HTTP 503" in stats.last_error


def test_transient_failure_then_success_is_a_remote_answer(server: ScriptedServer) -> None:
    answers = iter([(502, b"bad gateway"), None])
    server.responder = lambda body: next(answers) or ok(plan_with_core(body))
    client = http_client(server, retries=2)
    assert client.plan(BATCHES, cp_size=4) == embedded(BATCHES, 4)
    stats = client.stats
    assert (stats.retries, stats.remote_ok, stats.fallbacks, stats.errors) == (1, 1, 0, 0)


def test_without_fallback_service_failure_raises(server: ScriptedServer) -> None:
    server.responder = lambda body: (500, b"boom")
    client = http_client(server, retries=1, fallback=False)
    with pytest.raises(ServiceUnavailable, match="HTTP 500"):
        client.plan(BATCHES, cp_size=4)
    assert server.hits == 2
    # The breaker (threshold 3) opens after two more failed calls; then calls are refused without a request.
    with pytest.raises(ServiceUnavailable):
        client.plan(BATCHES, cp_size=4)
    with pytest.raises(ServiceUnavailable):
        client.plan(BATCHES, cp_size=4)
    hits = server.hits
    with pytest.raises(ServiceUnavailable, match="circuit breaker open"):  # open: raised without a call
        client.plan(BATCHES, cp_size=4)
    assert server.hits == hits
    assert client.stats.fallbacks == 0
    # fallback=False also turns off the bad-response fallback.
    server.responder = GARBAGE["invalid_json"][0]
    with pytest.raises(InvalidServiceResponse):
        http_client(server, fallback=False).plan(BATCHES, cp_size=4)


def test_breaker_opens_skips_the_service_and_recovers_after_reset(server: ScriptedServer) -> None:
    healthy = False
    server.responder = lambda body: ok(plan_with_core(body)) if healthy else (503, b"down")
    clock = FakeClock()
    client = http_client(server, retries=0, clock=clock,
                         breaker=BreakerPolicy(failure_threshold=2, reset_timeout_s=60.0))
    expected = embedded(BATCHES, 4)
    for _ in range(5):
        assert client.plan(BATCHES, cp_size=4) == expected
    assert server.hits == 2  # the breaker opened after two failures; three calls never reached the service
    stats = client.stats
    assert (stats.breaker_state, stats.breaker_opens, stats.fallbacks, stats.errors) == ("open", 1, 5, 2)
    healthy = True
    clock.now += 59.0
    client.plan(BATCHES, cp_size=4)
    assert server.hits == 2
    clock.now += 1.0
    assert client.stats.breaker_state == "half_open"
    assert client.plan(BATCHES, cp_size=4) == expected  # the trial call reaches the healthy service
    assert server.hits == 3
    stats = client.stats
    assert (stats.breaker_state, stats.remote_ok, stats.fallbacks) == ("closed", 1, 6)


def test_fallback_warns_once_per_transition_not_per_call(
    server: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    healthy = False
    server.responder = lambda body: ok(plan_with_core(body)) if healthy else (503, b"down")
    client = http_client(server, retries=0, breaker=BreakerPolicy(failure_threshold=100))
    with caplog.at_level(logging.INFO, logger="flashcp_client"):
        for _ in range(4):
            client.plan(BATCHES, cp_size=4)
        healthy = True
        client.plan(BATCHES, cp_size=4)
        client.plan(BATCHES, cp_size=4)
        healthy = False
        client.plan(BATCHES, cp_size=4)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(warnings) == 2 and all("planning in-process" in w for w in warnings)
    assert len([m for m in infos if "answering again" in m]) == 1
    assert client.stats.fallbacks == 5


def test_concurrent_calls_share_one_client(server: ScriptedServer) -> None:
    server.responder = lambda body: ok(plan_with_core(body))
    client = http_client(server)
    steps = [[[64 * (i + 1), 100 + i], [300]] for i in range(12)]
    results: dict[int, tuple[fp.Plan, ...]] = {}

    def work(indices: range) -> None:
        for i in indices:
            results[i] = client.plan(steps[i], cp_size=2)

    threads = [threading.Thread(target=work, args=(range(k, 12, 3),)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i] == embedded(steps[i], 2) for i in range(12))
    stats = client.stats
    assert (stats.requests, stats.remote_ok, stats.fallbacks) == (12, 12, 0)


def test_client_pickles_as_configuration(server: ScriptedServer) -> None:
    server.responder = lambda body: ok(plan_with_core(body))
    client = http_client(server, strategy="per_doc", retries=1)
    client.plan(BATCHES, cp_size=2)
    copy = pickle.loads(pickle.dumps(client))
    assert copy.address == server.url and copy.strategy == "per_doc" and copy.retries == 1
    assert copy.stats.requests == 0  # fresh counters and connections
    assert copy.plan(BATCHES, cp_size=2) == embedded(BATCHES, 2, strategy="per_doc")
    assert copy.stats.remote_ok == 1


def test_from_env_reads_flashcp_variables(monkeypatch: pytest.MonkeyPatch, server: ScriptedServer) -> None:
    monkeypatch.setenv("FLASHCP_PLANNER_ADDRESS", server.url)
    monkeypatch.setenv("FLASHCP_PLANNER_TIMEOUT_S", "1.5")
    monkeypatch.setenv("FLASHCP_PLANNER_RETRIES", "0")
    monkeypatch.setenv("FLASHCP_PLANNER_FALLBACK", "off")
    monkeypatch.setenv("FLASHCP_PLANNER_STRATEGY", "zigzag")
    client = PlannerClient.from_env(cost_model="h200-llama8b")
    assert (client.source_name, client.timeout_s, client.retries, client.fallback, client.strategy) == (
        server.url, 1.5, 0, False, "zigzag")
    assert client.cost_model.name == "h200-llama8b"
    monkeypatch.setenv("FLASHCP_PLANNER_RETRIES", "many")
    with pytest.raises(ValueError, match="FLASHCP_PLANNER_RETRIES"):
        PlannerClient.from_env()
    monkeypatch.setenv("FLASHCP_PLANNER_RETRIES", "1")
    monkeypatch.setenv("FLASHCP_PLANNER_FALLBACK", "maybe")
    with pytest.raises(ValueError, match="FLASHCP_PLANNER_FALLBACK"):
        PlannerClient.from_env()
    monkeypatch.setenv("FLASHCP_PLANNER_FALLBACK", "1")
    for bad in ("0", "-2", "nan", "soon"):
        monkeypatch.setenv("FLASHCP_PLANNER_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="FLASHCP_PLANNER_TIMEOUT_S"):
            PlannerClient.from_env()
    monkeypatch.setenv("FLASHCP_PLANNER_TIMEOUT_S", "2")
    monkeypatch.setenv("FLASHCP_PLANNER_ADDRESS", "tcp://nowhere")
    with pytest.raises(ValueError, match="address"):
        PlannerClient.from_env()
    for name in ("FLASHCP_PLANNER_ADDRESS", "FLASHCP_PLANNER_TIMEOUT_S", "FLASHCP_PLANNER_RETRIES",
                 "FLASHCP_PLANNER_FALLBACK", "FLASHCP_PLANNER_STRATEGY"):
        monkeypatch.delenv(name)
    default = PlannerClient.from_env()
    assert (default.source_name, default.timeout_s, default.retries, default.fallback, default.strategy) == (
        "embedded", 0.5, 2, True, "flashcp")


# ---------------------------------------------------------------- gRPC source, scripted server


class ScriptedGrpcServer:
    """A local gRPC Planner whose ``Plan`` behaviour is set by the test: ``handler(request_pb, context)``."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import grpc

        from flashcp.v1 import planner_pb2_grpc

        outer = self
        self.hits = 0
        self.handler: Callable[[Any, Any], Any] = lambda request, context: None

        class Servicer(planner_pb2_grpc.PlannerServicer):
            def Plan(self, request: Any, context: Any) -> Any:  # noqa: N802
                outer.hits += 1
                return outer.handler(request, context)

        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        planner_pb2_grpc.add_PlannerServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.address = f"grpc://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.stop(grace=None)


@pytest.fixture
def grpc_server() -> Iterator[ScriptedGrpcServer]:
    s = ScriptedGrpcServer()
    yield s
    s.close()


def grpc_reply(mutate: Callable[[list[fp.Plan]], list[fp.Plan]] | None = None) -> Callable[[Any, Any], Any]:
    from flashcp import codec
    from flashcp.v1 import planner_pb2 as pb

    def handler(request: Any, context: Any) -> Any:
        plans = list(fp.plan(codec.request_from_pb(request)))
        if mutate is not None:
            plans = mutate(plans)
        return pb.PlanResponse(plans=[codec.plan_to_pb(p, list_transfers=not request.omit_transfers) for p in plans])

    return handler


def grpc_abort(code_name: str, message: str, field: str = "") -> Callable[[Any, Any], Any]:
    import grpc

    def handler(request: Any, context: Any) -> Any:
        if field:
            context.set_trailing_metadata((("flashcp-error-field", field),))
        context.abort(getattr(grpc.StatusCode, code_name), message)

    return handler


def _drop_token(plans: list[fp.Plan]) -> list[fp.Plan]:
    """Rank 0 loses the last token of its first segment (a plan that no longer covers its documents)."""
    rank = plans[0].ranks[0]
    segment = rank.segments[0]
    broken = dataclasses.replace(
        rank,
        segments=(segment._replace(end=segment.end - 1), *rank.segments[1:]),
        cost=dataclasses.replace(rank.cost, tokens=rank.cost.tokens - 1),
    )
    return [dataclasses.replace(plans[0], ranks=(broken, *plans[0].ranks[1:])), *plans[1:]]


def test_grpc_plans_come_from_the_service(grpc_server: ScriptedGrpcServer) -> None:
    grpc_server.handler = grpc_reply()
    client = PlannerClient(grpc_server.address, fallback=False, strategy="per_doc")
    assert client.plan(BATCHES, cp_size=4) == embedded(BATCHES, 4, strategy="per_doc")
    assert client.stats.remote_ok == 1


def test_grpc_source_asks_for_plans_without_transfer_lists(grpc_server: ScriptedGrpcServer) -> None:
    requests = []
    reply = grpc_reply()

    def recording(request: Any, context: Any) -> Any:
        requests.append(request)
        return reply(request, context)

    grpc_server.handler = recording
    options = fp.PlanOptions(comm=fp.CommMode.EXACT_NEED)
    plans = PlannerClient(grpc_server.address, fallback=False, strategy="per_doc", options=options).plan(
        BATCHES, cp_size=4
    )
    assert requests[0].omit_transfers
    expected = embedded(BATCHES, 4, strategy="per_doc", options=options)
    assert plans == expected
    assert all(p.transfers is None for p in plans)
    assert [fp.kv_transfers(p) for p in plans] == [fp.kv_transfers(p) for p in expected]
    assert any(fp.kv_transfers(p) for p in plans)


@pytest.mark.parametrize(
    "mutate, message",
    [(lambda plans: plans[:-1], "returned 2 plans for 3 micro-batches"),
     (lambda plans: [plans[1], plans[0], plans[2]], "doc_lengths"),
     (_drop_token, "not a valid plan")],
)
def test_grpc_garbage_is_detected(grpc_server: ScriptedGrpcServer, mutate: Any, message: str) -> None:
    grpc_server.handler = grpc_reply(mutate)
    with pytest.raises(InvalidServiceResponse, match=message):
        PlannerClient(grpc_server.address, fallback_on_bad_response=False).plan(BATCHES, cp_size=4)
    client = PlannerClient(grpc_server.address)
    assert client.plan(BATCHES, cp_size=4) == embedded(BATCHES, 4)
    assert (client.stats.fallbacks, client.stats.errors) == (1, 1)


@pytest.mark.parametrize(
    "code, field, error, retried",
    [("INVALID_ARGUMENT", "micro_batches[0][2]", fp.InvalidRequest, False),
     ("FAILED_PRECONDITION", "", fp.Infeasible, False),
     ("RESOURCE_EXHAUSTED", "micro_batches", fp.InvalidRequest, False),  # over the server's size limit
     ("RESOURCE_EXHAUSTED", "", ServiceUnavailable, True),  # overloaded
     ("UNAVAILABLE", "", ServiceUnavailable, True),
     ("UNIMPLEMENTED", "", InvalidServiceResponse, False)],
)
def test_grpc_status_codes_map_to_typed_errors(
    grpc_server: ScriptedGrpcServer, code: str, field: str, error: type, retried: bool
) -> None:
    grpc_server.handler = grpc_abort(code, f"{field}: the problem" if field else "the problem", field)
    client = PlannerClient(grpc_server.address, fallback=False, retries=1, sleep=lambda s: None)
    with pytest.raises(error, match="the problem") as info:
        client.plan(BATCHES, cp_size=4)
    if error is fp.InvalidRequest:
        assert info.value.field == field
        assert str(info.value) == f"{field}: the problem"
    assert grpc_server.hits == (2 if retried else 1)
    assert client.stats.rejected == (1 if error in (fp.InvalidRequest, fp.Infeasible) else 0)


# ---------------------------------------------------------------- prefetch


class RecordingPlanner:
    """Wraps a client; records which thread planned each step and how many steps were planned."""

    def __init__(self, client: PlannerClient) -> None:
        self.client = client
        self.threads: list[str] = []

    def plan(self, micro_batches: Any, **kwargs: Any) -> tuple[fp.Plan, ...]:
        self.threads.append(threading.current_thread().name)
        return self.client.plan(micro_batches, **kwargs)


def steps(n: int) -> list[list[list[int]]]:
    return [[[100 + 7 * i, 50 + i], [30 * (i + 1)]] for i in range(n)]


def test_prefetch_yields_plans_in_order_from_a_background_thread() -> None:
    client = PlannerClient(strategy="per_doc")
    recorder = RecordingPlanner(client)
    data = steps(12)
    with Prefetcher(recorder, iter(data), cp_size=4, depth=2) as prefetched:
        got = list(prefetched)
    assert [step for step, _ in got] == data
    for step, plans in got:
        assert plans == embedded(step, 4, strategy="per_doc")
    assert set(recorder.threads) == {"flashcp-plan-prefetch"}
    assert not prefetched.alive


def test_client_prefetch_with_lengths_of_and_plan_options() -> None:
    client = PlannerClient()
    batches = [{"id": i, "lengths": s} for i, s in enumerate(steps(5))]
    with client.prefetch(batches, cp_size=2, lengths_of=lambda b: b["lengths"], strategy="zigzag") as prefetched:
        got = list(prefetched)
    assert [b["id"] for b, _ in got] == list(range(5))
    assert all(plans == embedded(b["lengths"], 2, strategy="zigzag") for b, plans in got)


def test_prefetch_stays_bounded_ahead_of_the_consumer() -> None:
    recorder = RecordingPlanner(PlannerClient())

    def endless() -> Iterator[list[list[int]]]:
        i = 0
        while True:
            yield [[64 + i]]
            i += 1

    with Prefetcher(recorder, endless(), cp_size=2, depth=3) as prefetched:
        next(prefetched)
        time.sleep(0.3)  # give the producer every chance to run ahead
        # depth queued + one planned and waiting to be queued + the one consumed.
        assert len(recorder.threads) <= 1 + 3 + 1
    assert not prefetched.alive


def test_prefetch_surfaces_a_planning_error_at_its_position() -> None:
    data = steps(6)
    data[3] = [[10, -1]]
    with Prefetcher(PlannerClient(), data, cp_size=2) as prefetched:
        got = [next(prefetched) for _ in range(3)]
        with pytest.raises(fp.InvalidRequest) as info:
            next(prefetched)
        assert info.value.field == "micro_batches[0][1]"
        with pytest.raises(StopIteration):
            next(prefetched)
    assert [s for s, _ in got] == data[:3]


def test_prefetch_surfaces_an_error_of_the_step_iterator() -> None:
    def broken() -> Iterator[list[list[int]]]:
        yield [[10]]
        yield [[20]]
        raise OSError("shard file vanished")

    prefetched = PlannerClient().prefetch(broken(), cp_size=1)
    assert [s for s, _ in (next(prefetched), next(prefetched))] == [[[10]], [[20]]]
    with pytest.raises(OSError, match="shard file vanished"):
        next(prefetched)
    prefetched.close()
    assert not prefetched.alive


def test_prefetch_close_stops_an_unfinished_producer() -> None:
    def endless() -> Iterator[list[list[int]]]:
        while True:
            yield [[32, 32]]

    prefetched = PlannerClient().prefetch(endless(), cp_size=2, depth=1)
    next(prefetched)
    prefetched.close()
    assert not prefetched.alive
    with pytest.raises(StopIteration):
        next(prefetched)
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(PlannerClient(), [], cp_size=1, depth=0)
