"""Bounded load test on loopback: 32 concurrent clients (16 gRPC, 16 HTTP) for ~10 s, zero errors, right answers."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import httpx
import pytest

from flashcp import codec
from flashcp.v1 import planner_pb2_grpc
from flashcp_planner import PlanRequest, plan

DURATION_S = 10.0
CLIENTS_PER_TRANSPORT = 16


def _workload(seed: int, count: int = 8) -> list[PlanRequest]:
    rng = random.Random(seed)
    return [
        PlanRequest(micro_batches=[[rng.randint(1, 8192) for _ in range(rng.randint(1, 128))]],
                    cp_size=rng.choice([2, 4, 8]))
        for _ in range(count)
    ]


@pytest.mark.slow
def test_32_concurrent_clients_get_correct_plans_without_errors(server_process) -> None:
    requests = _workload(0)
    expected = [[p.to_dict() for p in plan(r)] for r in requests]
    messages = [codec.request_to_pb(r) for r in requests]
    bodies = [{"micro_batches": [list(mb) for mb in r.micro_batches], "cp_size": r.cp_size} for r in requests]

    async def run() -> tuple[int, list[str]]:
        errors: list[str] = []
        served = 0
        stop_at = time.monotonic() + DURATION_S

        async def grpc_client(index: int, stub) -> None:
            nonlocal served
            i = index
            while time.monotonic() < stop_at:
                k = i % len(messages)
                try:
                    reply = await stub.Plan(messages[k], timeout=30)
                    if [codec.plan_pb_to_dict(p) for p in reply.plans] != expected[k]:
                        errors.append(f"grpc: wrong plan for request {k}")
                    served += 1
                except grpc.RpcError as exc:
                    errors.append(f"grpc: {exc.code()} {exc.details()}")
                i += 1

        async def http_client(index: int, client: httpx.AsyncClient) -> None:
            nonlocal served
            i = index
            while time.monotonic() < stop_at:
                k = i % len(bodies)
                try:
                    response = await client.post("/v1/plan", json=bodies[k])
                    if response.status_code != 200:
                        errors.append(f"http: {response.status_code} {response.text[:200]}")
                    elif response.json()["plans"] != expected[k]:
                        errors.append(f"http: wrong plan for request {k}")
                    served += 1
                except httpx.HTTPError as exc:
                    errors.append(f"http: {exc!r}")
                i += 1

        limits = httpx.Limits(max_connections=CLIENTS_PER_TRANSPORT)
        async with (
            grpc.aio.insecure_channel(server_process.grpc_target) as channel,
            httpx.AsyncClient(base_url=server_process.http_url, timeout=30, limits=limits) as client,
        ):
            stub = planner_pb2_grpc.PlannerStub(channel)
            await asyncio.gather(
                *(grpc_client(i, stub) for i in range(CLIENTS_PER_TRANSPORT)),
                *(http_client(i, client) for i in range(CLIENTS_PER_TRANSPORT)),
            )
        return served, errors

    served, errors = asyncio.run(run())
    assert errors == [], errors[:5]
    assert served >= 2 * CLIENTS_PER_TRANSPORT
    assert httpx.get(f"{server_process.http_url}/healthz", timeout=30).status_code == 200
