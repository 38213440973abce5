"""Retries with backoff and the circuit breaker, driven by a fake clock (no sleeping)."""

from __future__ import annotations

import random

import pytest

from flashcp_client.resilience import Backoff, BreakerPolicy, BreakerState, CircuitBreaker, call_with_retries


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Flaky(Exception):
    pass


def test_backoff_without_jitter_is_exponential_and_capped() -> None:
    backoff = Backoff(base_s=0.1, multiplier=2.0, max_s=0.5, jitter=0.0)
    rng = random.Random(0)
    delays = [backoff.delay_s(k, rng) for k in range(5)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


def test_backoff_jitter_stays_in_range_and_is_reproducible() -> None:
    backoff = Backoff(base_s=0.1, multiplier=3.0, max_s=10.0, jitter=0.5)
    gen = backoff.delays(random.Random(7))
    first = [next(gen) for _ in range(6)]
    gen = backoff.delays(random.Random(7))
    assert [next(gen) for _ in range(6)] == first
    gen = backoff.delays(random.Random(8))
    assert [next(gen) for _ in range(6)] != first
    for k, delay in enumerate(first):
        nominal = min(10.0, 0.1 * 3.0**k)
        assert 0.5 * nominal <= delay <= nominal


@pytest.mark.parametrize(
    "kwargs, field",
    [({"base_s": -1.0}, "base_s"), ({"multiplier": 0.5}, "multiplier"), ({"jitter": 1.5}, "jitter"),
     ({"max_s": float("nan")}, "max_s")],
)
def test_backoff_rejects_bad_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Backoff(**kwargs)


def test_breaker_policy_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        BreakerPolicy(failure_threshold=0)
    with pytest.raises(ValueError, match="reset_timeout_s"):
        BreakerPolicy(reset_timeout_s=-1)


def test_retries_then_success_waits_the_backoff_delays() -> None:
    calls = []
    waits: list[float] = []
    retried = []

    def fn() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise Flaky(f"attempt {len(calls)}")
        return "ok"

    backoff = Backoff(base_s=0.01, jitter=0.0)
    result = call_with_retries(fn, retries=4, backoff=backoff, rng=random.Random(0), retry_on=(Flaky,),
                               sleep=waits.append, on_retry=lambda k, exc, d: retried.append((k, str(exc))))
    assert result == "ok"
    assert len(calls) == 3
    assert waits == pytest.approx([0.01, 0.02])
    assert retried == [(0, "attempt 1"), (1, "attempt 2")]


def test_retries_exhausted_raise_the_last_error() -> None:
    calls = []

    def fn() -> None:
        calls.append(1)
        raise Flaky(f"attempt {len(calls)}")

    with pytest.raises(Flaky, match="attempt 3"):
        call_with_retries(fn, retries=2, backoff=Backoff(), rng=random.Random(0), retry_on=(Flaky,),
                          sleep=lambda s: None)
    assert len(calls) == 3


def test_errors_outside_retry_on_propagate_at_once() -> None:
    calls = []

    def fn() -> None:
        calls.append(1)
        raise KeyError("bug")

    with pytest.raises(KeyError):
        call_with_retries(fn, retries=5, backoff=Backoff(), rng=random.Random(0), retry_on=(Flaky,),
                          sleep=lambda s: pytest.fail("must not wait"))
    assert len(calls) == 1


def test_zero_retries_calls_once_and_negative_is_rejected() -> None:
    calls = []

    def fn() -> None:
        calls.append(1)
        raise Flaky()

    with pytest.raises(Flaky):
        call_with_retries(fn, retries=0, backoff=Backoff(), rng=random.Random(0), retry_on=(Flaky,),
                          sleep=lambda s: pytest.fail("must not wait"))
    assert len(calls) == 1
    with pytest.raises(ValueError, match="retries"):
        call_with_retries(fn, retries=-1, backoff=Backoff(), rng=random.Random(0), retry_on=(Flaky,))


def test_breaker_opens_after_threshold_and_half_opens_after_reset_timeout() -> None:
    clock = FakeClock()
    transitions = []
    breaker = CircuitBreaker(BreakerPolicy(failure_threshold=3, reset_timeout_s=30.0), clock=clock,
                             on_transition=lambda old, new: transitions.append((old.value, new.value)))
    # Two failures, a success (resets the count), two failures: still closed.
    for outcome in ("fail", "fail", "ok", "fail", "fail"):
        assert breaker.allow()
        breaker.record_failure() if outcome == "fail" else breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.consecutive_failures == 2
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.times_opened == 1
    assert not breaker.allow()
    clock.advance(29.9)
    assert not breaker.allow()
    assert breaker.state is BreakerState.OPEN
    clock.advance(0.1)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()              # the trial
    assert not breaker.allow()          # only one trial at a time
    breaker.record_failure()            # trial failed: open again, timer restarted
    assert breaker.state is BreakerState.OPEN
    assert breaker.times_opened == 2
    clock.advance(29.0)
    assert not breaker.allow()
    clock.advance(1.0)
    assert breaker.allow()
    breaker.record_success()            # trial succeeded: closed
    assert breaker.state is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0
    assert breaker.allow() and breaker.allow()
    assert transitions == [
        ("closed", "open"), ("open", "half_open"), ("half_open", "open"), ("open", "half_open"),
        ("half_open", "closed"),
    ]


def test_breaker_threshold_one_opens_on_first_failure() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(BreakerPolicy(failure_threshold=1, reset_timeout_s=0.0), clock=clock)
    assert breaker.allow()
    breaker.record_failure()
    # A zero reset timeout goes straight to half-open: the very next call is a trial.
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()


def test_no_retry_starts_past_the_deadline() -> None:
    now = [0.0]
    calls = []

    def failing() -> None:
        calls.append(now[0])
        now[0] += 0.4  # each attempt times out after 0.4 s
        raise TimeoutError(f"attempt {len(calls)}")

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(TimeoutError, match="attempt 2"):
        call_with_retries(failing, retries=5, backoff=Backoff(base_s=0.1, jitter=0.0), rng=random.Random(0),
                          retry_on=(TimeoutError,), sleep=sleep, deadline=1.0, clock=lambda: now[0])
    # attempt 1 at 0.0, retry after 0.1 s at 0.5; the next would start at 0.9 + 0.2 = 1.1 > 1.0
    assert calls == pytest.approx([0.0, 0.5])
