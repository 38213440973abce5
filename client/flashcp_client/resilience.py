"""Retries with exponential backoff and a circuit breaker for remote plan sources.

Both take their time and randomness from the caller (a clock function, a
sleep function, a seeded :class:`random.Random`) so tests drive them without
sleeping and every run draws the same jitter.

Breaker states::

    CLOSED --(failure_threshold consecutive failures)--> OPEN
    OPEN --(reset_timeout_s elapsed)--> HALF_OPEN   (one trial call is let through)
    HALF_OPEN --(trial succeeds)--> CLOSED
    HALF_OPEN --(trial fails)--> OPEN               (timer restarts)
"""

from __future__ import annotations

import enum
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Backoff", "BreakerPolicy", "BreakerState", "CircuitBreaker", "call_with_retries"]

T = TypeVar("T")


def _check_number(name: str, value: object, *, minimum: float, strict: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        relation = ">" if strict else ">="
        raise ValueError(f"{name}: must be a finite number {relation} {minimum}, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Exponential backoff between retries, with multiplicative jitter.

    The delay before retry ``k`` (0-based) is
    ``min(max_s, base_s * multiplier**k) * u`` with ``u`` drawn uniformly from
    ``[1 - jitter, 1]``.
    """

    base_s: float = 0.05
    """Delay before the first retry, before jitter."""
    multiplier: float = 2.0
    """Growth factor of the delay per retry."""
    max_s: float = 2.0
    """Cap on any single delay."""
    jitter: float = 0.5
    """Fraction of the delay that is randomised (0: none, 1: anywhere in [0, delay])."""

    def __post_init__(self) -> None:
        _check_number("base_s", self.base_s, minimum=0.0, strict=False)
        _check_number("multiplier", self.multiplier, minimum=1.0, strict=False)
        _check_number("max_s", self.max_s, minimum=0.0, strict=False)
        _check_number("jitter", self.jitter, minimum=0.0, strict=False)
        if self.jitter > 1.0:
            raise ValueError(f"jitter: must be in [0, 1], got {self.jitter!r}")

    def delay_s(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first retry)."""
        nominal = min(self.max_s, self.base_s * self.multiplier**retry)
        return nominal * (1.0 - self.jitter * rng.random())

    def delays(self, rng: random.Random) -> Iterator[float]:
        """The endless sequence of delays before retries 0, 1, 2, ..."""
        retry = 0
        while True:
            yield self.delay_s(retry, rng)
            retry += 1


def call_with_retries(
    fn: Callable[[], T],
    *,
    retries: int,
    backoff: Backoff,
    rng: random.Random,
    retry_on: tuple[type[BaseException], ...],
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call ``fn``; on an exception in ``retry_on``, wait and call again, up to ``retries`` more times.

    With ``deadline`` (a ``clock()`` value), no retry starts whose backoff would end past it:
    the last error is raised instead.

    Args:
        fn: the call to make.
        retries: extra attempts after the first (0: call once).
        backoff: delays between attempts.
        rng: source of the jitter.
        retry_on: exception types worth retrying; anything else propagates at once.
        sleep: how to wait (tests pass a recorder).
        on_retry: called as ``on_retry(retry_index, error, delay_s)`` before each wait.

    Returns:
        The first successful result.

    Raises:
        The last exception once the retries are spent, or any exception not in ``retry_on``.
    """
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries: must be a non-negative integer, got {retries!r}")
    delays = backoff.delays(rng)
    for attempt in range(retries + 1):
        try:
            return fn()
        except retry_on as exc:
            if attempt == retries:
                raise
            delay = next(delays)
            if deadline is not None and clock() + delay >= deadline:
                raise
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")


class BreakerState(enum.StrEnum):
    """State of a :class:`CircuitBreaker`."""

    CLOSED = "closed"
    """Calls go through; consecutive failures are counted."""
    OPEN = "open"
    """Calls are refused until the reset timeout has elapsed."""
    HALF_OPEN = "half_open"
    """One trial call is let through; its outcome closes or re-opens the breaker."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerPolicy:
    """When a circuit breaker opens and when it tries again."""

    failure_threshold: int = 3
    """Consecutive failed calls that open the breaker."""
    reset_timeout_s: float = 10.0
    """Seconds the breaker stays open before letting one trial call through."""

    def __post_init__(self) -> None:
        t = self.failure_threshold
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"failure_threshold: must be a positive integer, got {t!r}")
        _check_number("reset_timeout_s", self.reset_timeout_s, minimum=0.0, strict=False)


class CircuitBreaker:
    """Thread-safe circuit breaker (see the module docstring for the state machine).

    Usage: ask :meth:`allow` before a call; report the outcome with
    :meth:`record_success` or :meth:`record_failure`. Every call that was
    allowed must report exactly one outcome, or a half-open breaker stays
    waiting for its trial.

    Args:
        policy: thresholds.
        clock: monotonic time in seconds (tests inject a fake one).
        on_transition: called as ``on_transition(old, new)`` on every state change,
            outside the lock.
    """

    def __init__(
        self,
        policy: BreakerPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.policy = policy if policy is not None else BreakerPolicy()
        self._clock = clock
        self._on_transition = on_transition
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self.times_opened = 0
        """How many times the breaker went to OPEN."""

    @property
    def state(self) -> BreakerState:
        """Current state; an OPEN breaker whose timeout has elapsed reads as HALF_OPEN."""
        with self._lock:
            change = self._maybe_half_open()
            state = self._state
        self._notify(change)
        return state

    @property
    def consecutive_failures(self) -> int:
        """Failures since the last success (or since the breaker last closed)."""
        return self._failures

    def allow(self) -> bool:
        """Whether a call may go through now. In HALF_OPEN only one trial is allowed at a time."""
        with self._lock:
            change = self._maybe_half_open()
            if self._state is BreakerState.CLOSED:
                allowed = True
            elif self._state is BreakerState.HALF_OPEN and not self._trial_in_flight:
                self._trial_in_flight = True
                allowed = True
            else:
                allowed = False
        self._notify(change)
        return allowed

    def record_success(self) -> None:
        """An allowed call succeeded: reset the failure count and close the breaker."""
        with self._lock:
            self._failures = 0
            self._trial_in_flight = False
            change = self._set(BreakerState.CLOSED)
        self._notify(change)

    def record_failure(self) -> None:
        """An allowed call failed: count it; open the breaker at the threshold or after a failed trial."""
        with self._lock:
            self._failures += 1
            change = None
            if self._state is BreakerState.HALF_OPEN or (
                self._state is BreakerState.CLOSED and self._failures >= self.policy.failure_threshold
            ):
                self._trial_in_flight = False
                self._opened_at = self._clock()
                self.times_opened += 1
                change = self._set(BreakerState.OPEN)
        self._notify(change)

    def _maybe_half_open(self) -> tuple[BreakerState, BreakerState] | None:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.policy.reset_timeout_s:
            self._trial_in_flight = False
            return self._set(BreakerState.HALF_OPEN)
        return None

    def _set(self, new: BreakerState) -> tuple[BreakerState, BreakerState] | None:
        old = self._state
        self._state = new
        return None if old is new else (old, new)

    def _notify(self, change: tuple[BreakerState, BreakerState] | None) -> None:
        if change is not None and self._on_transition is not None:
            self._on_transition(*change)
