"""The one service object both transports wrap: limits, threads, search processes and metrics over the core."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar, TypeVar

import flashcp_planner
from flashcp_planner.cost import CostModel
from flashcp_planner.errors import InvalidRequest
from flashcp_planner.model import Plan
from flashcp_planner.planner import Comparison
from flashcp_planner.presets import PRESETS, get_preset
from flashcp_planner.request import MAX_CP_SIZE, PlanRequest
from flashcp_planner.strategies import STRATEGIES, Strategy, get_strategy
from flashcp_service.errors import DeadlineExceeded, Overloaded, RequestTooLarge, ShuttingDown
from flashcp_service.metrics import ServiceMetrics
from flashcp_service.recent import RecentPlans
from flashcp_service.settings import Settings
from flashcp_service.solver_processes import SearchDied, SolverProcess

__all__ = ["PlannerService"]

_log = logging.getLogger("flashcp_service")

_SOLVER_GRACE_S = 15.0
"""Extra wait beyond an exact search's time limit (model building, process start-up)."""
_MIN_SOLVER_TIME_S = 0.05
"""Shortest time limit worth starting a search with."""

Comparisons = tuple[tuple[Comparison, ...], ...]
T = TypeVar("T")


def _solve_in_worker(request: PlanRequest, strategies: tuple[str, ...] | None, compare: bool):
    """Runs in a search process: plan or compare ``request`` with the core."""
    if compare:
        return flashcp_planner.compare(request, strategies)
    return flashcp_planner.plan(request)


def _check_finite(plan: Plan) -> None:
    """Extreme cost-model constants (e.g. 1e-300 TFLOP/s) overflow the predicted times."""
    values = [plan.makespan_ms, plan.lower_bound_ms]
    for rp in plan.ranks:
        c = rp.cost
        values += (c.linear_ms, c.attention_ms, c.comm_ms, c.exposed_comm_ms)
    if not all(math.isfinite(v) for v in values):
        raise InvalidRequest(
            "cost_model", "its constants make the predicted times overflow (not finite); use realistic values"
        )


class PlannerService:
    """Plans requests for any transport, enforcing the server's limits.

    Heuristic strategies run in a thread pool (or, up to
    ``settings.inline_max_document_ranks``, on the event loop); so do the
    transports' encodings of large plans (:meth:`encode`). Exact strategies
    (``is_optimal``, i.e. ``optimum``) run one process per search
    (:class:`SolverProcess`), at most ``settings.solver_workers`` at a time with
    at most ``settings.solver_queue`` more waiting, so heuristic requests never
    queue behind a search. The search time limit is capped by
    ``settings.max_solver_time_s`` and the caller's remaining deadline.
    Cancelling the awaiting task (gRPC cancel or expired deadline) removes a
    waiting search from the queue and kills a running one.

    Args:
        settings: limits and pool sizes; ``Settings()`` (environment) when None.

    Raises:
        InvalidRequest: ``settings.default_cost_model`` is not a preset.
    """

    solver_entry: ClassVar[Callable] = staticmethod(_solve_in_worker)
    """Picklable function each search process runs (tests substitute a gated one)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else Settings()
        self.default_cost_model = get_preset(self.settings.default_cost_model)
        self.metrics = ServiceMetrics()
        self.recent = RecentPlans(capacity=self.settings.recent_plans, sample_every=self.settings.recent_sample_every)
        """Summaries of the last returned plans (the explorer's Live view; off unless ``recent_plans`` > 0)."""
        self._threads = ThreadPoolExecutor(
            max_workers=self.settings.heuristic_threads, thread_name_prefix="flashcp-plan"
        )
        self._lock = threading.Lock()
        self._solver_jobs = 0
        """Admitted exact searches: waiting for a worker, running, or orphaned but still running."""
        self._workers_busy = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._accepting = True
        self._drain_hooks: list[Callable[[], Awaitable[None]]] = []

    # ------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        """True until :meth:`begin_drain` (readiness probes, gRPC health)."""
        return self._accepting

    def add_drain_hook(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Register a coroutine function :meth:`begin_drain` awaits (e.g. gRPC health -> NOT_SERVING)."""
        self._drain_hooks.append(hook)

    async def begin_drain(self) -> None:
        """Refuse new work with :class:`ShuttingDown` and run the drain hooks; admitted work completes."""
        self._accepting = False
        for hook in self._drain_hooks:
            await hook()

    def close(self) -> None:
        """Shut the heuristic threads down (waits for running work); searches die with their tasks."""
        self._accepting = False
        self._threads.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------ listings

    def cost_models(self) -> dict[str, CostModel]:
        """Every preset, by name."""
        return dict(PRESETS)

    def strategies(self) -> dict[str, Strategy]:
        """Every registered strategy, by name."""
        return dict(STRATEGIES)

    # ------------------------------------------------------------ limits

    def check_size(self, *, num_micro_batches: int, num_documents: int, cp_size: int = 1) -> None:
        """Raise :class:`RequestTooLarge` when a request exceeds the count limits.

        Transports call this before decoding the request into core objects.
        """
        if num_micro_batches > self.settings.max_micro_batches:
            raise RequestTooLarge(
                f"micro_batches: {num_micro_batches} micro-batches exceed the server limit of "
                f"{self.settings.max_micro_batches}",
                field="micro_batches",
            )
        if num_documents > self.settings.max_documents:
            raise RequestTooLarge(
                f"micro_batches: {num_documents} documents exceed the server limit of {self.settings.max_documents}",
                field="micro_batches",
            )
        # An out-of-range cp_size is the core's to report (INVALID_ARGUMENT / 422).
        if 1 <= cp_size <= MAX_CP_SIZE and num_documents * cp_size > self.settings.max_document_ranks:
            raise RequestTooLarge(
                f"cp_size: {num_documents} documents x {cp_size} ranks exceed the server limit of "
                f"{self.settings.max_document_ranks} document-ranks (plans grow with both)",
                field="cp_size",
            )

    def _admit(self, request: PlanRequest) -> None:
        if not self._accepting:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        self.check_size(
            num_micro_batches=len(request.micro_batches),
            num_documents=sum(len(mb) for mb in request.micro_batches),
            cp_size=request.cp_size,
        )

    # ------------------------------------------------------------ planning

    async def plan(self, request: PlanRequest, *, time_remaining_s: float | None = None) -> tuple[Plan, ...]:
        """One plan per micro-batch of ``request``.

        Args:
            request: a validated request.
            time_remaining_s: the caller's remaining deadline, if any; caps the
                time limit of exact searches.

        Raises:
            Infeasible: a micro-batch does not fit.
            RequestTooLarge, Overloaded, ShuttingDown, DeadlineExceeded: service limits.
        """
        self._admit(request)
        if get_strategy(request.strategy).is_optimal:
            plans = await self._solve(request, None, compare=False, time_remaining_s=time_remaining_s)
        else:
            plans = await self._heuristic(flashcp_planner.plan, request)
        for p in plans:
            _check_finite(p)
            self._observe(p)
        return plans

    async def compare(
        self,
        request: PlanRequest,
        strategies: Sequence[str] | None = None,
        *,
        time_remaining_s: float | None = None,
    ) -> Comparisons:
        """Every strategy (default: all registered) on every micro-batch.

        Raises:
            InvalidRequest: an unknown strategy name.
            Infeasible: a micro-batch exceeds the total capacity.
            RequestTooLarge, Overloaded, ShuttingDown, DeadlineExceeded: service limits.
        """
        self._admit(request)
        names = tuple(strategies) if strategies else tuple(STRATEGIES)
        if any(get_strategy(name).is_optimal for name in names):
            rows = await self._solve(request, names, compare=True, time_remaining_s=time_remaining_s)
        else:
            rows = await self._heuristic(flashcp_planner.compare, request, names)
        for row in rows:
            for c in row:
                if c.plan is not None:
                    _check_finite(c.plan)
                    self._observe(c.plan)
        return rows

    def _observe(self, plan: Plan) -> None:
        """Every returned plan passes here: metrics and the recent-plans buffer."""
        self.metrics.observe_plan(plan)
        self.recent.record(plan)

    async def encode(self, plans: Iterable[Plan], encoder: Callable[[], T]) -> T:
        """Run ``encoder()``, a transport's encoding of ``plans``, on the event loop when they are small,
        else in the heuristic threads.

        Small: segments x ``cp_size`` over all plans up to ``settings.inline_max_document_ranks``. Listing
        the KV transfers of a plan takes O(segments x N) (about 25 ms for the 94k transfers of 64
        documents split over 64 ranks), too long to hold both servers.
        """
        size = sum(p.cp_size * sum(len(rp.segments) for rp in p.ranks) for p in plans)
        if size <= self.settings.inline_max_document_ranks:
            return encoder()
        return await asyncio.get_running_loop().run_in_executor(self._threads, encoder)

    async def _heuristic(self, fn, request: PlanRequest, *args):
        num_documents = sum(len(mb) for mb in request.micro_batches)
        if num_documents * request.cp_size <= self.settings.inline_max_document_ranks:
            return fn(request, *args)
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, request, *args)

    def _bounded_time_limit(self, request: PlanRequest, time_remaining_s: float | None) -> PlanRequest:
        limit = min(request.options.time_limit_s, self.settings.max_solver_time_s)
        if time_remaining_s is not None:
            # One search per micro-batch, and room to send the answer before the caller gives up.
            limit = min(limit, (0.8 * time_remaining_s - 0.05) / len(request.micro_batches))
            if limit < _MIN_SOLVER_TIME_S:
                raise DeadlineExceeded(f"{time_remaining_s:.3f} s left before the deadline: too little to search")
        if limit == request.options.time_limit_s:
            return request
        return dataclasses.replace(request, options=dataclasses.replace(request.options, time_limit_s=limit))

    # Worker permits: at most ``solver_workers`` search processes at a time; a
    # waiting search is a future in ``_waiters`` and leaves the queue when cancelled.

    async def _acquire_worker(self) -> None:
        with self._lock:
            if self._workers_busy < self.settings.solver_workers:
                self._workers_busy += 1
                return
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                    raise
            if not waiter.cancelled():  # granted just before the cancel: pass the permit on
                self._release_worker()
            raise  # (a grant still in flight sees the cancelled waiter and passes it on itself)

    def _grant(self, waiter: asyncio.Future) -> None:
        if waiter.done():
            self._release_worker()
        else:
            waiter.set_result(None)

    def _release_worker(self) -> None:
        with self._lock:
            if not self._waiters:
                self._workers_busy -= 1
                return
            waiter = self._waiters.popleft()
        try:
            waiter.get_loop().call_soon_threadsafe(self._grant, waiter)
        except RuntimeError:  # the waiter's loop is closed: nobody waits there any more
            self._release_worker()

    async def _solve(self, request, strategies, *, compare: bool, time_remaining_s: float | None):
        loop = asyncio.get_running_loop()
        deadline = None if time_remaining_s is None else loop.time() + time_remaining_s
        capacity = self.settings.solver_workers + self.settings.solver_queue
        with self._lock:
            admitted = self._solver_jobs < capacity
            if admitted:
                self._solver_jobs += 1
        if not admitted:
            self.metrics.solver_rejections.inc()
            raise Overloaded(
                f"all {capacity} solver slots are busy ({self.settings.solver_workers} running, "
                f"{self.settings.solver_queue} queued); retry later or use a heuristic strategy"
            )
        try:
            await self._acquire_worker()
            try:
                remaining = None if deadline is None else deadline - loop.time()
                request = self._bounded_time_limit(request, remaining)
                return await self._run_search(request, strategies, compare)
            finally:
                self._release_worker()
        finally:
            with self._lock:
                self._solver_jobs -= 1

    async def _run_search(self, request: PlanRequest, strategies, compare: bool):
        # Starting a process talks to the fork server (which the very first search
        # also has to start): off the event loop, and never lost if the caller leaves.
        starting = asyncio.ensure_future(
            asyncio.to_thread(
                SolverProcess,
                self.solver_entry,
                (request, strategies, compare),
                memory_bytes=self.settings.solver_memory_bytes,
            )
        )
        try:
            search = await asyncio.shield(starting)
        except asyncio.CancelledError:
            starting.add_done_callback(lambda f: f.exception() is None and f.result().stop())
            raise
        timeout = request.options.time_limit_s * len(request.micro_batches) + _SOLVER_GRACE_S
        try:
            return await asyncio.wait_for(search.result(), timeout=timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"the exact search did not finish within {timeout:.1f} s") from None
        except SearchDied as exc:
            _log.warning("%s (memory limit %d bytes)", exc, self.settings.solver_memory_bytes)
            raise RequestTooLarge(
                "the exact search died, most likely over the solver memory limit; "
                "use fewer documents or a heuristic strategy"
            ) from None
        finally:
            search.stop()  # kills a search whose caller cancelled or timed out
