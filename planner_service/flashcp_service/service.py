"""The one service object both transports wrap: limits, pools and metrics over the planning core."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import flashcp_planner
from flashcp_planner.cost import CostModel
from flashcp_planner.model import Plan
from flashcp_planner.planner import Comparison
from flashcp_planner.presets import PRESETS, get_preset
from flashcp_planner.request import PlanRequest
from flashcp_planner.strategies import STRATEGIES, Strategy, get_strategy

from flashcp_service.errors import DeadlineExceeded, Overloaded, RequestTooLarge, ServiceError, ShuttingDown
from flashcp_service.metrics import ServiceMetrics
from flashcp_service.settings import Settings

__all__ = ["PlannerService"]

_log = logging.getLogger("flashcp_service")

_SOLVER_GRACE_S = 15.0
"""Extra wait beyond an exact search's time limit (model building, process start-up)."""
_MIN_SOLVER_TIME_S = 0.05
"""Shortest time limit worth starting a search with."""

Comparisons = tuple[tuple[Comparison, ...], ...]


def _solve_in_worker(request: PlanRequest, strategies: tuple[str, ...] | None, compare: bool):
    """Runs in a solver process: plan or compare ``request`` with the core."""
    if compare:
        return flashcp_planner.compare(request, strategies)
    return flashcp_planner.plan(request)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: the service is gone
        pass


def _warm_worker() -> None:
    """Solver-process initializer: import the core (and the exact strategy) before the first job."""
    import flashcp_planner.strategies  # noqa: F401


class PlannerService:
    """Plans requests for any transport, enforcing the server's limits.

    Heuristic strategies run on the event loop (small requests) or in a thread
    pool (large ones); exact strategies (``is_optimal``, i.e. ``optimum``) run
    in a process pool of ``settings.solver_workers`` processes with at most
    ``settings.solver_queue`` more searches waiting, so heuristic requests never
    queue behind a search. Cancelling the awaiting task (client cancel or
    deadline) cancels queued searches; a running one stops at its time limit,
    which the server caps at ``settings.max_solver_time_s`` and the caller's
    remaining deadline, and keeps its slot until then.

    Args:
        settings: limits and pool sizes; ``Settings()`` (environment) when None.

    Raises:
        InvalidRequest: ``settings.default_cost_model`` is not a preset.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else Settings()
        self.default_cost_model = get_preset(self.settings.default_cost_model)
        self.metrics = ServiceMetrics()
        self._threads = ThreadPoolExecutor(
            max_workers=self.settings.heuristic_threads, thread_name_prefix="flashcp-plan"
        )
        self._solver_pool: ProcessPoolExecutor | None = None
        self._solver_jobs = 0
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
        """Shut the pools down (waits for running work)."""
        self._accepting = False
        self._threads.shutdown(wait=True, cancel_futures=True)
        if self._solver_pool is not None:
            self._solver_pool.shutdown(wait=True, cancel_futures=True)
            self._solver_pool = None

    # ------------------------------------------------------------ listings

    def cost_models(self) -> dict[str, CostModel]:
        """Every preset, by name."""
        return dict(PRESETS)

    def strategies(self) -> dict[str, Strategy]:
        """Every registered strategy, by name."""
        return dict(STRATEGIES)

    # ------------------------------------------------------------ limits

    def check_size(self, *, num_micro_batches: int, num_documents: int) -> None:
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

    def _admit(self, request: PlanRequest) -> None:
        if not self._accepting:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        self.check_size(
            num_micro_batches=len(request.micro_batches),
            num_documents=sum(len(mb) for mb in request.micro_batches),
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
            self.metrics.observe_plan(p)
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
                    self.metrics.observe_plan(c.plan)
        return rows

    async def _heuristic(self, fn, request: PlanRequest, *args):
        num_documents = sum(len(mb) for mb in request.micro_batches)
        if num_documents <= self.settings.inline_max_documents:
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

    def _pool(self) -> ProcessPoolExecutor:
        if self._solver_pool is None:
            # spawn, not fork: forking a process that runs gRPC threads is unsafe.
            self._solver_pool = ProcessPoolExecutor(
                max_workers=self.settings.solver_workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_warm_worker,
            )
        return self._solver_pool

    def _release_solver_slot(self, _future: Future) -> None:
        self._solver_jobs -= 1

    async def _solve(self, request, strategies, *, compare: bool, time_remaining_s: float | None):
        capacity = self.settings.solver_workers + self.settings.solver_queue
        if self._solver_jobs >= capacity:
            self.metrics.solver_rejections.inc()
            raise Overloaded(
                f"all {capacity} solver slots are busy ({self.settings.solver_workers} running, "
                f"{self.settings.solver_queue} queued); retry later or use a heuristic strategy"
            )
        request = self._bounded_time_limit(request, time_remaining_s)
        loop = asyncio.get_running_loop()
        try:
            future = self._pool().submit(_solve_in_worker, request, strategies, compare)
        except BrokenProcessPool:
            self._solver_pool = None
            future = self._pool().submit(_solve_in_worker, request, strategies, compare)
        self._solver_jobs += 1
        # The slot is freed when the search really ends, even if its caller left.
        future.add_done_callback(lambda f: _call_soon(loop, self._release_solver_slot, f))
        timeout = request.options.time_limit_s * len(request.micro_batches) + _SOLVER_GRACE_S
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future, loop=loop), timeout=timeout)
        except TimeoutError:
            future.cancel()
            raise DeadlineExceeded(f"the exact search did not finish within {timeout:.1f} s") from None
        except BrokenProcessPool:
            _log.error("solver process died; starting a new pool")
            self._solver_pool = None
            raise ServiceError("the solver process died; retry") from None
