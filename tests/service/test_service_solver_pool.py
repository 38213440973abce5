"""Exact searches run in bounded, killable processes: heuristics never wait, overload is refused, cancels free slots.
Small heuristic requests are planned on the event loop, larger ones in the heuristic threads.

The search processes run :func:`gated_solve`, which records its pid and waits
for a gate file before calling the real planner, so every ordering below is
forced rather than timed.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from pathlib import Path

import grpc
import pytest
from service_testing import GrpcServerThread, small_settings

import flashcp_planner
from flashcp import codec
from flashcp.v1 import planner_pb2 as pb
from flashcp_planner import PlanOptions, PlanRequest, plan
from flashcp_service import Overloaded, PlannerService, RequestTooLarge
from flashcp_service.errors import DeadlineExceeded
from flashcp_service.service import _solve_in_worker

TINY = [[100, 200, 3000, 50]]


def gated_solve(gate: str, request, strategies, compare):
    """Runs in the search process (importable there: the fork server passes sys.path on)."""
    Path(gate).with_name(f"pid-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return _solve_in_worker(request, strategies, compare)


class GatedService(PlannerService):
    def __init__(self, settings, gate: Path) -> None:
        super().__init__(settings)
        self.solver_entry = functools.partial(gated_solve, str(gate))


def _search_pids(gate: Path) -> list[int]:
    return [int(p.name.removeprefix("pid-")) for p in gate.parent.glob("pid-*")]


def _wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def gate(tmp_path: Path) -> Path:
    return tmp_path / "open"


def _optimum(lengths=TINY, *, time_limit_s: float = 5.0) -> PlanRequest:
    return PlanRequest(micro_batches=lengths, cp_size=2, strategy="optimum",
                       options=PlanOptions(num_workers=1, time_limit_s=time_limit_s))


def test_optimum_through_the_pool_equals_in_process_planning() -> None:
    service = PlannerService(small_settings())
    try:
        served = asyncio.run(service.plan(_optimum()))
    finally:
        service.close()
    expected = plan(_optimum())
    assert [p.to_dict(include_timing=False) for p in served] == [p.to_dict(include_timing=False) for p in expected]
    assert served[0].optimality is not None and served[0].optimality.status == "optimal"


@pytest.mark.parametrize(
    ("inline_max_document_ranks", "expected"),
    [(8, ["MainThread", "flashcp-plan"]), (0, ["flashcp-plan", "flashcp-plan"])],
)
def test_heuristic_requests_up_to_the_inline_limit_plan_on_the_loop(
    monkeypatch, inline_max_document_ranks: int, expected: list[str]
) -> None:
    where: list[str] = []

    def recording_plan(request):
        where.append(threading.current_thread().name.split("_")[0])
        return plan(request)

    monkeypatch.setattr(flashcp_planner, "plan", recording_plan)
    service = PlannerService(small_settings(inline_max_document_ranks=inline_max_document_ranks))
    try:
        for lengths in ([100, 200, 300, 400], [100, 200, 300, 400, 500]):  # 4 x 2 and 5 x 2 document-ranks
            asyncio.run(service.plan(PlanRequest(micro_batches=[lengths], cp_size=2)))
    finally:
        service.close()
    assert where == expected


def test_plans_over_the_inline_limit_are_encoded_in_a_heuristic_thread() -> None:
    service = PlannerService(small_settings(inline_max_document_ranks=8))
    small = plan(PlanRequest(micro_batches=[[100, 200]], cp_size=1))  # 2 segments x 1 rank
    large = plan(PlanRequest(micro_batches=[[100] * 5], cp_size=2))  # at least 5 segments x 2 ranks

    def encoder():
        return threading.current_thread().name.split("_")[0]

    try:
        where = [asyncio.run(service.encode(plans, encoder)) for plans in (small, large)]
    finally:
        service.close()
    assert where == ["MainThread", "flashcp-plan"]


def test_heuristics_do_not_wait_for_a_search_and_overload_is_refused(gate: Path) -> None:
    service = GatedService(small_settings(solver_workers=1, solver_queue=1), gate)

    async def scenario():
        running = asyncio.create_task(service.plan(_optimum()))
        queued = asyncio.create_task(service.plan(_optimum()))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await service.plan(_optimum())
        heuristic = await service.plan(PlanRequest(micro_batches=TINY, cp_size=2))
        assert not running.done() and not queued.done()  # both gated: the heuristic did not wait
        gate.touch()
        return heuristic, await running, await queued

    try:
        heuristic, first, second = asyncio.run(scenario())
    finally:
        gate.touch()
        service.close()
    assert heuristic[0].strategy == "flashcp"
    assert first[0].to_dict(include_timing=False) == second[0].to_dict(include_timing=False)
    assert service.metrics.solver_rejections._value.get() == 1


def test_cancelled_caller_frees_its_queued_slot(gate: Path) -> None:
    service = GatedService(small_settings(solver_workers=1, solver_queue=1), gate)

    async def scenario():
        running = asyncio.create_task(service.plan(_optimum()))
        queued = asyncio.create_task(service.plan(_optimum()))
        await asyncio.sleep(0.2)
        assert service._solver_jobs == 2
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        for _ in range(100):  # the slot is released by a callback scheduled on this loop
            if service._solver_jobs == 1:
                break
            await asyncio.sleep(0.01)
        assert service._solver_jobs == 1
        again = asyncio.create_task(service.plan(_optimum()))  # fits again: the slot was freed
        gate.touch()
        return await running, await again

    try:
        first, again = asyncio.run(scenario())
    finally:
        gate.touch()
        service.close()
    assert first[0].optimality is not None and again[0].optimality is not None


def test_grpc_deadline_is_honoured_and_cancels_queued_work(gate: Path) -> None:
    service = GatedService(small_settings(solver_workers=1, solver_queue=2), gate)
    server = GrpcServerThread(service)
    try:
        with grpc.insecure_channel(server.target) as channel:
            from flashcp.v1 import planner_pb2_grpc

            stub = planner_pb2_grpc.PlannerStub(channel)
            message = codec.request_to_pb(_optimum())
            running = stub.Plan.future(message)
            with pytest.raises(grpc.RpcError) as info:
                stub.Plan(message, timeout=1.0)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(200):
                if service._solver_jobs == 1:
                    break
                time.sleep(0.01)
            assert service._solver_jobs == 1  # the expired call's queued search was cancelled
            gate.touch()
            assert running.result(timeout=120).plans[0].optimality.status == "optimal"
    finally:
        gate.touch()
        server.stop()
        service.close()


def test_time_limits_are_capped_by_settings_and_deadline() -> None:
    service = PlannerService(small_settings(max_solver_time_s=2.0))
    try:
        capped = service._bounded_time_limit(_optimum(time_limit_s=5), None)
        assert capped.options.time_limit_s == 2.0
        assert service._bounded_time_limit(_optimum(time_limit_s=1.5), None).options.time_limit_s == 1.5
        by_deadline = service._bounded_time_limit(_optimum(time_limit_s=5), 1.0)
        assert 0 < by_deadline.options.time_limit_s < 1.0
        with pytest.raises(DeadlineExceeded):
            service._bounded_time_limit(_optimum(), 0.01)
    finally:
        service.close()


def test_compare_with_optimum_runs_in_the_pool(grpc_stub) -> None:
    message = pb.CompareRequest(micro_batches=[pb.MicroBatch(doc_lengths=TINY[0])], cp_size=2,
                                strategies=["flashcp", "optimum"], options=pb.PlanOptions(num_workers=1))
    rows = codec.comparisons_from_pb(grpc_stub.Compare(message).comparisons)
    flashcp, optimum = rows[0]
    assert optimum.plan.optimality is not None
    assert optimum.plan.makespan_ms <= flashcp.plan.makespan_ms * (1 + 1e-9)


def test_cancelling_a_running_search_kills_its_process(gate: Path) -> None:
    service = GatedService(small_settings(solver_workers=1, solver_queue=0), gate)

    async def scenario():
        running = asyncio.create_task(service.plan(_optimum()))
        while not _search_pids(gate):
            await asyncio.sleep(0.02)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert service._solver_jobs == 0 and service._workers_busy == 0
        return _search_pids(gate)[0]

    try:
        pid = asyncio.run(scenario())
        assert _wait_for(lambda: not _alive(pid)), "the cancelled search process is still running"
    finally:
        gate.touch()
        service.close()


def test_a_search_over_its_memory_limit_fails_alone() -> None:
    service = PlannerService(small_settings(solver_memory_bytes=1))  # every allocation in the search fails
    try:
        with pytest.raises(RequestTooLarge, match="memory"):
            asyncio.run(service.plan(_optimum()))
        assert service._solver_jobs == 0 and service._workers_busy == 0
        assert asyncio.run(service.plan(PlanRequest(micro_batches=TINY, cp_size=2)))[0].strategy == "flashcp"
    finally:
        service.close()
