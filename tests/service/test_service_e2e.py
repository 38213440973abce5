"""End to end against real server subprocesses on 127.0.0.1: both transports, request ids, SIGTERM drain."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
from service_testing import start_server_process

from flashcp import SERVICE_NAME, codec
from flashcp.v1 import planner_pb2_grpc
from flashcp_planner import PlanOptions, PlanRequest, plan

LENGTHS = [[4096, 100, 8000, 30, 30, 2500], [777, 12]]


def test_both_transports_serve_the_same_plans(server_process) -> None:
    expected = [p.to_dict() for p in plan(PlanRequest(micro_batches=LENGTHS, cp_size=8))]
    http = httpx.post(f"{server_process.http_url}/v1/plan", json={"micro_batches": LENGTHS, "cp_size": 8},
                      headers={"x-request-id": "e2e-http-1"}, timeout=30)
    assert http.status_code == 200
    assert http.headers["x-request-id"] == "e2e-http-1"
    with grpc.insecure_channel(server_process.grpc_target) as channel:
        stub = planner_pb2_grpc.PlannerStub(channel)
        reply = stub.Plan(codec.request_to_pb(PlanRequest(micro_batches=LENGTHS, cp_size=8)),
                          metadata=(("x-request-id", "e2e-grpc-1"),), timeout=30)
    assert http.json()["plans"] == expected
    assert [codec.plan_pb_to_dict(p) for p in reply.plans] == expected

    lines = [line for line in server_process.log_lines() if line.get("logger") == "flashcp_service.access"]
    by_id = {line["request_id"]: line for line in lines}
    assert by_id["e2e-http-1"]["transport"] == "http" and by_id["e2e-http-1"]["status"] == "200"
    assert by_id["e2e-grpc-1"]["transport"] == "grpc" and by_id["e2e-grpc-1"]["status"] == "OK"
    assert by_id["e2e-grpc-1"]["documents"] == 8


def test_bad_input_never_kills_the_server(server_process) -> None:
    url = server_process.http_url
    bodies = (b"", b"null", b"[]", b'{"micro_batches": "x"}', b"\xff\xfe",
              b'{"micro_batches": [[1e400]], "cp_size": 2}')
    for body in bodies:
        response = httpx.post(f"{url}/v1/plan", content=body, headers={"content-type": "application/json"}, timeout=30)
        assert 400 <= response.status_code < 500, (body, response.status_code, response.text)
    with grpc.insecure_channel(server_process.grpc_target) as channel:
        raw = channel.unary_unary(f"/{SERVICE_NAME}/Plan")
        try:
            raw(b"\x0a\xff\xff\xff\xff\xff", timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            raise AssertionError("garbage bytes were accepted")
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    assert 'flashcp_requests_total{route="/v1/plan",status="422",transport="http"}' in httpx.get(
        f"{url}/metrics", timeout=30
    ).text


def _in_flight(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("flashcp_requests_in_flight "):
            return float(line.split()[1])
    return 0.0


def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path: Path) -> None:
    """`flashcp serve` itself; two exact searches (one per transport) are in flight when SIGTERM arrives."""
    entry = ["-c", "import sys; from flashcp_planner.cli import main; sys.exit(main())", "serve"]
    server = start_server_process(tmp_path, "--solver-workers", "2", command=[sys.executable, *entry])
    lengths = [[100 + (487 * i) % 7900 for i in range(40)]]  # CP-SAT cannot prove this one within 3 s
    body = {"micro_batches": lengths, "cp_size": 8, "strategy": "optimum",
            "options": {"time_limit_s": 3, "num_workers": 1}}
    results: dict[str, object] = {}

    def http_call() -> None:
        results["http"] = httpx.post(f"{server.http_url}/v1/plan", json=body, timeout=120)

    def grpc_call() -> None:
        request = PlanRequest(micro_batches=lengths, cp_size=8, strategy="optimum",
                              options=PlanOptions(time_limit_s=3, num_workers=1))
        with grpc.insecure_channel(server.grpc_target) as channel:
            results["grpc"] = planner_pb2_grpc.PlannerStub(channel).Plan(codec.request_to_pb(request), timeout=120)

    threads = [threading.Thread(target=http_call), threading.Thread(target=grpc_call)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while _in_flight(server.http_url) < 3 and time.monotonic() < deadline:  # 2 searches + this scrape
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        rc = server.process.wait(60)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    log = server.log_lines()
    assert rc == 0, server.log_path.read_text()[-3000:]
    assert results["http"].status_code == 200, results["http"].text
    assert results["http"].json()["plans"][0]["optimality"] is not None
    assert results["grpc"].plans[0].HasField("optimality")
    messages = [line.get("message", "") for line in log]
    drain_at = next(i for i, m in enumerate(messages) if m.startswith("draining"))
    served_at = [i for i, line in enumerate(log) if line.get("logger") == "flashcp_service.access"
                 and line.get("strategy") == "optimum"]
    assert len(served_at) == 2 and min(served_at) > drain_at, "both searches finished after the drain began"


def test_bad_settings_and_busy_ports_fail_fast(server_process) -> None:
    base = [sys.executable, "-m", "flashcp_service", "--host", "127.0.0.1"]
    bad = subprocess.run([*base, "--http-port", "99999"], capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "http_port" in bad.stderr
    env = {**os.environ, "FLASHCP_MAX_DOCUMENTS": "0"}
    bad_env = subprocess.run(base, capture_output=True, text=True, timeout=60, check=False, env=env)
    assert bad_env.returncode == 2 and "max_documents" in bad_env.stderr
    taken = server_process.http_url.rsplit(":", 1)[1]
    busy = subprocess.run([*base, "--http-port", taken, "--grpc-port", "0"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert busy.returncode == 1 and "cannot start" in busy.stderr


def test_http_client_disconnect_cancels_its_search(server_process) -> None:
    host, port = server_process.http_url.removeprefix("http://").split(":")
    body = json.dumps({"micro_batches": [[100 + (487 * i) % 7900 for i in range(40)]], "cp_size": 8,
                       "strategy": "optimum", "options": {"time_limit_s": 60, "num_workers": 1}}).encode()
    head = (f"POST /v1/plan HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"x-request-id: gone-1\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        deadline = time.monotonic() + 30
        while _in_flight(server_process.http_url) < 2 and time.monotonic() < deadline:  # the search + this scrape
            time.sleep(0.05)
    # The search had 60 s; its access line (status 499) appears as soon as the server notices the disconnect.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        gone = [line for line in server_process.log_lines() if line.get("request_id") == "gone-1"]
        if gone:
            break
        time.sleep(0.1)
    assert gone and gone[0]["status"] == "499", gone
    assert _in_flight(server_process.http_url) == 1  # only this scrape


def test_http_connections_disable_nagle() -> None:
    """Nagle + delayed ACK would add ~40 ms to every HTTP response (the listening socket must say TCP)."""
    import asyncio

    from flashcp_service.cli import _bind_http_socket

    async def accepted_nodelay() -> int:
        sock = _bind_http_socket("127.0.0.1", 0)
        seen = asyncio.get_running_loop().create_future()

        async def on_client(reader, writer) -> None:
            raw = writer.get_extra_info("socket")
            seen.set_result(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_client, sock=sock)
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        value = await asyncio.wait_for(seen, 30)
        writer.close()
        server.close()
        await server.wait_closed()
        return value

    assert asyncio.run(accepted_nodelay()) != 0
