"""PlannerClient: plans from the planner service, with retries, a circuit breaker and an embedded fallback.

::

    client = PlannerClient()                       # embedded planner, in-process
    client = PlannerClient("grpc://planner:50051")  # or "http://planner:8080"
    plans = client.plan([[4096, 517, 12000], [8000, 8000]], cp_size=8)

A remote call that fails for a transient reason (unreachable, timeout, 5xx /
``UNAVAILABLE``) is retried with exponential backoff; when the retries are
spent, or while the circuit breaker is open, the client plans in-process
instead (``fallback=True``). A request the service rejects (4xx,
``INVALID_ARGUMENT``, ``FAILED_PRECONDITION``) raises
:class:`~flashcp_planner.InvalidRequest` / :class:`~flashcp_planner.Infeasible`
and is never retried or hidden. A response that is not a valid plan set for the
request falls back or raises :class:`~flashcp_client.sources.InvalidServiceResponse`
(``fallback_on_bad_response``); a wrong plan is never returned.

The client logs one warning when it starts falling back and one line when the
service recovers (not one per call), and counts everything in :attr:`PlannerClient.stats`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from flashcp_client.resilience import Backoff, BreakerPolicy, BreakerState, CircuitBreaker, call_with_retries
from flashcp_client.sources import (
    EmbeddedSource,
    InvalidServiceResponse,
    PlanSource,
    ServiceUnavailable,
    source_for_address,
)
from flashcp_planner import CostModel, Plan, PlanningError, PlanOptions, PlanRequest
from flashcp_planner.presets import PRESETS, cost_model_from_dict, load_cost_model
from flashcp_planner.strategies import STRATEGIES

__all__ = ["ClientStats", "PlannerClient"]

logger = logging.getLogger(__name__)

CostModelSpec = CostModel | str | dict[str, Any]
"""A :class:`CostModel`, a preset name, the path of a JSON cost-model file, or its parsed JSON object."""


def resolve_cost_model(spec: CostModelSpec) -> CostModel:
    """The :class:`CostModel` ``spec`` stands for.

    Raises:
        InvalidRequest: unknown preset, unreadable file, malformed object.
    """
    if isinstance(spec, CostModel):
        return spec
    if isinstance(spec, dict):
        return cost_model_from_dict(spec)
    if isinstance(spec, str):
        return PRESETS[spec] if spec in PRESETS else load_cost_model(spec)
    raise ValueError(f"cost_model: expected a CostModel, preset name, file path or dict, got {type(spec).__name__}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientStats:
    """A snapshot of a :class:`PlannerClient`'s counters."""

    source: str
    """``"embedded"`` or the service address."""
    requests: int
    """Calls of :meth:`PlannerClient.plan` / :meth:`PlannerClient.plan_request`, whatever their outcome.

    ``remote_ok + embedded + fallbacks`` of them returned plans; the others raised."""
    remote_ok: int
    """Requests answered by the service."""
    embedded: int
    """Requests planned in-process because no service is configured."""
    fallbacks: int
    """Requests planned in-process because the service failed or the breaker was open."""
    errors: int
    """Remote calls that failed (after their retries), whatever happened next."""
    retries: int
    """Remote attempts repeated after a transient failure."""
    rejected: int
    """Requests refused as invalid or infeasible, by local validation or by the service."""
    breaker_state: str
    """``"closed"``, ``"open"`` or ``"half_open"``."""
    breaker_opens: int
    """Times the circuit breaker opened."""
    last_error: str
    """Message of the most recent remote failure, ``""`` if none."""


class PlannerClient:
    """Plans micro-batches, from the planner service or in-process.

    Args:
        address: ``None`` / ``"embedded"`` (plan in-process), ``"grpc://host:port"`` or
            ``"http://host:port"``. :meth:`from_env` reads it from ``FLASHCP_PLANNER_ADDRESS``.
        strategy: default strategy name (see ``flashcp_planner.STRATEGIES``).
        cost_model: default cost model: a :class:`CostModel`, preset name, JSON file path or dict.
        capacity_slack: default per-rank capacity slack.
        options: default :class:`~flashcp_planner.PlanOptions`.
        timeout_s: limit of one remote attempt (connect + answer), seconds. The default, 0.5 s, is
            sized for heuristic planning (milliseconds on the service); exact strategies get their
            solver time limit on top (see :meth:`attempt_timeout_s`).
        deadline_s: limit of one :meth:`plan` call's remote attempts, backoff included (default 1 s,
            plus the solver time limit for exact strategies): a service that accepts and never
            answers costs a call at most this before the in-process fallback.
        retries: extra remote attempts after a transient failure, within ``deadline_s``.
        backoff: delays between attempts.
        fallback: plan in-process when the service is unavailable; if False, raise
            :class:`~flashcp_client.sources.ServiceUnavailable` instead.
        fallback_on_bad_response: plan in-process when the service returns something that is
            not a valid plan set for the request; if False (or ``fallback`` is False), raise
            :class:`~flashcp_client.sources.InvalidServiceResponse`.
        breaker: when the circuit breaker opens and retries.
        seed: seed of the backoff jitter.
        clock: monotonic clock of the breaker (tests inject a fake one).
        sleep: how the client waits between retries (tests inject a recorder).
        source: a ready-made remote :class:`~flashcp_client.sources.PlanSource`, instead of ``address``.

    Raises:
        ValueError: malformed address or option.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        strategy: str = "flashcp",
        cost_model: CostModelSpec = "h100-llama8b",
        capacity_slack: float = 0.25,
        options: PlanOptions | None = None,
        timeout_s: float = 0.5,
        deadline_s: float = 1.0,
        retries: int = 2,
        backoff: Backoff | None = None,
        fallback: bool = True,
        fallback_on_bad_response: bool = True,
        breaker: BreakerPolicy | None = None,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        source: PlanSource | None = None,
    ) -> None:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s: must be a positive number of seconds, got {timeout_s!r}")
        if isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float)) or not deadline_s > 0:
            raise ValueError(f"deadline_s: must be a positive number of seconds, got {deadline_s!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries: must be a non-negative integer, got {retries!r}")
        self._init_args = dict(
            address=address, strategy=strategy, cost_model=cost_model, capacity_slack=capacity_slack,
            options=options, timeout_s=timeout_s, deadline_s=deadline_s, retries=retries, backoff=backoff,
            fallback=fallback, fallback_on_bad_response=fallback_on_bad_response, breaker=breaker, seed=seed,
        )
        self.address = address
        self.strategy = strategy
        self.cost_model = resolve_cost_model(cost_model)
        self.capacity_slack = capacity_slack
        self.options = options if options is not None else PlanOptions()
        self.timeout_s = float(timeout_s)
        self.deadline_s = float(deadline_s)
        self.retries = retries
        self.backoff = backoff if backoff is not None else Backoff()
        self.fallback = bool(fallback)
        self.fallback_on_bad_response = bool(fallback_on_bad_response)
        self._embedded = EmbeddedSource()
        remote = source if source is not None else source_for_address(address)
        self._remote: PlanSource | None = None if isinstance(remote, EmbeddedSource) else remote
        self._rng = random.Random(seed)
        self._sleep = sleep
        self._clock = clock
        self._breaker = CircuitBreaker(breaker, clock=clock, on_transition=self._log_breaker)
        self._lock = threading.Lock()
        self._counts = dict(requests=0, remote_ok=0, embedded=0, fallbacks=0, errors=0, retries=0, rejected=0)
        self._last_error = ""
        self._degraded = False
        # Fail fast on a bad default strategy / options rather than at the first call.
        PlanRequest(micro_batches=((1,),), cp_size=1, cost_model=self.cost_model, strategy=strategy,
                    capacity_slack=capacity_slack, options=self.options)

    @classmethod
    def from_env(cls, **overrides: Any) -> PlannerClient:
        """A client configured from the ``FLASHCP_*`` environment variables (see :mod:`flashcp_client.env`).

        Keyword arguments override the environment.
        """
        from flashcp_client import env

        kwargs: dict[str, Any] = dict(
            address=env.planner_address(),
            timeout_s=env.planner_timeout_s(),
            deadline_s=env.planner_deadline_s(),
            retries=env.planner_retries(),
            fallback=env.planner_fallback(),
            strategy=env.planner_strategy(),
            cost_model=env.planner_cost_model(),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def source_name(self) -> str:
        """``"embedded"`` or the service address."""
        return "embedded" if self._remote is None else self._remote.name

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker guarding the remote source."""
        return self._breaker

    @property
    def stats(self) -> ClientStats:
        """A snapshot of the counters."""
        with self._lock:
            counts = dict(self._counts)
            last_error = self._last_error
        return ClientStats(source=self.source_name, breaker_state=self._breaker.state.value,
                           breaker_opens=self._breaker.times_opened, last_error=last_error, **counts)

    def make_request(
        self,
        micro_batches: Sequence[Sequence[int]],
        *,
        cp_size: int,
        strategy: str | None = None,
        cost_model: CostModelSpec | None = None,
        capacity_slack: float | None = None,
        capacity: int | None = None,
        options: PlanOptions | None = None,
    ) -> PlanRequest:
        """The validated :class:`~flashcp_planner.PlanRequest` :meth:`plan` would send (client defaults filled in).

        Raises:
            InvalidRequest: a malformed field, named.
        """
        return PlanRequest(
            micro_batches=micro_batches,
            cp_size=cp_size,
            cost_model=self.cost_model if cost_model is None else resolve_cost_model(cost_model),
            strategy=self.strategy if strategy is None else strategy,
            capacity_slack=self.capacity_slack if capacity_slack is None else capacity_slack,
            capacity=capacity,
            options=self.options if options is None else options,
        )

    def plan(
        self,
        micro_batches: Sequence[Sequence[int]],
        *,
        cp_size: int,
        strategy: str | None = None,
        cost_model: CostModelSpec | None = None,
        capacity_slack: float | None = None,
        capacity: int | None = None,
        options: PlanOptions | None = None,
    ) -> tuple[Plan, ...]:
        """One plan per micro-batch.

        Args:
            micro_batches: per micro-batch, the document lengths in packed order.
            cp_size: ranks in the CP group.
            strategy, cost_model, capacity_slack, options: override the client's defaults.
            capacity: absolute per-rank token capacity (overrides ``capacity_slack``).

        Returns:
            One verified :class:`~flashcp_planner.Plan` per micro-batch, in order.

        Raises:
            InvalidRequest: malformed input (checked locally before any network call) or rejected by the service.
            Infeasible: a micro-batch does not fit the capacity.
            ServiceUnavailable: the service failed and ``fallback`` is False.
            InvalidServiceResponse: the service returned garbage and bad-response fallback is off.
        """
        try:
            request = self.make_request(micro_batches, cp_size=cp_size, strategy=strategy, cost_model=cost_model,
                                        capacity_slack=capacity_slack, capacity=capacity, options=options)
        except ValueError:
            self._count(requests=1, rejected=1)
            raise
        return self.plan_request(request)

    def plan_request(self, request: PlanRequest) -> tuple[Plan, ...]:
        """Plan a ready-made request (see :meth:`plan`)."""
        self._count(requests=1)
        try:
            request.contexts()  # Infeasible is the caller's error: raise it before any network call.
        except PlanningError:
            self._count(rejected=1)
            raise
        if self._remote is None:
            plans = self._embedded.fetch(request)
            self._count(embedded=1)
            return plans
        if not self._breaker.allow():
            skipped = ServiceUnavailable(f"{self._remote.name}: circuit breaker open after repeated failures")
            if not self.fallback:
                raise skipped
            return self._fall_back(request, skipped, count_error=False)
        timeout_s = self.attempt_timeout_s(request)
        deadline = self._clock() + self.deadline_s + (timeout_s - self.timeout_s)
        remote = self._remote

        def attempt() -> tuple[Plan, ...]:
            return remote.fetch(request, timeout_s=max(0.001, min(timeout_s, deadline - self._clock())))

        try:
            plans = call_with_retries(
                attempt,
                retries=self.retries,
                backoff=self.backoff,
                rng=self._rng,
                retry_on=(ServiceUnavailable,),
                sleep=self._sleep,
                on_retry=self._note_retry,
                deadline=deadline,
                clock=self._clock,
            )
        except (ServiceUnavailable, InvalidServiceResponse) as exc:
            self._breaker.record_failure()
            allowed = self.fallback and (isinstance(exc, ServiceUnavailable) or self.fallback_on_bad_response)
            if not allowed:
                self._count(errors=1, error=str(exc))
                raise
            return self._fall_back(request, exc, count_error=True)
        except PlanningError:
            # The service answered: it rejected the request. It is alive; the request is the caller's error.
            self._breaker.record_success()
            self._count(rejected=1)
            raise
        except BaseException as exc:
            # Not a verdict on the request (a bug, an interrupt): settle a half-open trial as a failure.
            self._breaker.record_failure()
            self._count(errors=1, error=f"{type(exc).__name__}: {exc}")
            raise
        self._breaker.record_success()
        self._count(remote_ok=1)
        if self._set_degraded(False):
            logger.info("planner service %s is answering again; using remote plans", self._remote.name)
        return plans

    def attempt_timeout_s(self, request: PlanRequest) -> float:
        """Limit of one remote attempt for ``request``: ``timeout_s``, plus the solver's wall-clock limit for
        exact strategies (``optimum`` stops on deterministic time; see
        :func:`flashcp_planner.strategies.optimum.wall_limit_s`)."""
        from flashcp_planner.strategies.optimum import wall_limit_s

        impl = STRATEGIES.get(request.strategy)
        if impl is not None and impl.is_optimal:
            return self.timeout_s + wall_limit_s(request.options.time_limit_s)
        return self.timeout_s

    def prefetch(
        self,
        steps: Iterable[Any],
        *,
        cp_size: int,
        depth: int = 2,
        lengths_of: Callable[[Any], Sequence[Sequence[int]]] | None = None,
        **plan_kwargs: Any,
    ) -> Any:
        """Plan ``steps`` ahead of their use in a background thread (see :class:`~flashcp_client.prefetch.Prefetcher`).

        Each item of ``steps`` is a step's micro-batches (lists of document lengths) or, with ``lengths_of``,
        anything those can be read from. Iterating the result yields ``(step, plans)`` in order.
        """
        from flashcp_client.prefetch import Prefetcher

        return Prefetcher(self, steps, cp_size=cp_size, depth=depth, lengths_of=lengths_of, **plan_kwargs)

    def close(self) -> None:
        """Release network connections (the client stays usable; they reopen on demand)."""
        if self._remote is not None:
            self._remote.close()

    def __enter__(self) -> PlannerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PlannerClient({self.source_name!r}, strategy={self.strategy!r}, cost_model={self.cost_model.name!r})"

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the configuration only: a copy in another process opens its own connections."""
        if self._remote is not None and self.address is None:
            raise TypeError("a PlannerClient built with source= cannot be pickled; pass an address instead")
        return dict(self._init_args)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def _fall_back(self, request: PlanRequest, reason: Exception, *, count_error: bool) -> tuple[Plan, ...]:
        plans = self._embedded.fetch(request)
        if count_error:
            self._count(errors=1, error=str(reason))
        self._count(fallbacks=1)
        if self._set_degraded(True):
            logger.warning("planner service unavailable (%s); planning in-process until it recovers", reason)
        return plans

    def _set_degraded(self, degraded: bool) -> bool:
        """Record whether the client is falling back; True if that changed."""
        with self._lock:
            changed = self._degraded != degraded
            self._degraded = degraded
        return changed

    def _note_retry(self, retry: int, error: BaseException, delay_s: float) -> None:
        self._count(retries=1)
        logger.debug("retry %d of %s in %.3f s after: %s", retry + 1, self.source_name, delay_s, error)

    def _count(self, *, error: str | None = None, **increments: int) -> None:
        with self._lock:
            for key, value in increments.items():
                self._counts[key] += value
            if error is not None:
                self._last_error = error

    def _log_breaker(self, old: BreakerState, new: BreakerState) -> None:
        if new is BreakerState.OPEN:
            logger.warning("circuit breaker for %s opened (was %s): skipping the service for %.3g s",
                           self.source_name, old.value, self._breaker.policy.reset_timeout_s)
        else:
            logger.info("circuit breaker for %s: %s -> %s", self.source_name, old.value, new.value)
