"""Plan upcoming steps in a background thread while the current step trains.

::

    with client.prefetch(steps, cp_size=8) as prefetched:
        for step, plans in prefetched:      # plans for step t+1 are already on their way
            train(step, plans)

The queue is bounded (``depth`` steps ahead), items come out in input order,
an exception raised while reading ``steps`` or planning is re-raised on the
consuming side at the position it happened, and :meth:`Prefetcher.close`
stops the thread promptly.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from flashcp_planner import Plan

__all__ = ["Prefetcher"]

_POLL_S = 0.05
"""How often a blocked producer checks for shutdown."""


class _Planner(Protocol):
    def plan(self, micro_batches: Sequence[Sequence[int]], *, cp_size: int, **kwargs: Any) -> tuple[Plan, ...]: ...


@dataclass(frozen=True, slots=True)
class _Failure:
    error: BaseException


_DONE = object()


def _produce(
    planner: _Planner,
    steps: Iterable[Any],
    lengths_of: Callable[[Any], Sequence[Sequence[int]]],
    plan_kwargs: dict[str, Any],
    out: queue.Queue[Any],
    stop: threading.Event,
) -> None:
    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    try:
        for step in steps:
            if stop.is_set():
                return
            plans = planner.plan(lengths_of(step), **plan_kwargs)
            if not put((step, plans)):
                return
    except BaseException as exc:  # surfaced on the consuming side
        put(_Failure(exc))
        return
    put(_DONE)


class Prefetcher:
    """Iterator of ``(step, plans)`` whose plans were computed ahead by a background thread.

    Args:
        planner: anything with ``plan(micro_batches, *, cp_size, **kwargs)``, normally a
            :class:`~flashcp_client.PlannerClient`.
        steps: the steps, in training order.
        cp_size: ranks in the CP group.
        depth: steps planned ahead at most (queue bound), >= 1.
        lengths_of: reads a step's micro-batches (lists of document lengths) from a step;
            default: the step is its micro-batches.
        **plan_kwargs: passed to ``planner.plan`` (strategy, cost_model, ...).

    Raises:
        ValueError: ``depth`` < 1.
    """

    def __init__(
        self,
        planner: _Planner,
        steps: Iterable[Any],
        *,
        cp_size: int,
        depth: int = 2,
        lengths_of: Callable[[Any], Sequence[Sequence[int]]] | None = None,
        **plan_kwargs: Any,
    ) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth: must be a positive integer, got {depth!r}")
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(
            target=_produce,
            args=(planner, steps, lengths_of or (lambda step: step), dict(plan_kwargs, cp_size=cp_size),
                  self._queue, self._stop),
            name="flashcp-plan-prefetch",
            daemon=True,
        )
        self._thread.start()

    def __iter__(self) -> Iterator[tuple[Any, tuple[Plan, ...]]]:
        return self

    def __next__(self) -> tuple[Any, tuple[Plan, ...]]:
        """The next ``(step, plans)``; re-raises an error of the producer at its position."""
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is _DONE:
            self._finished = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._finished = True
            self._thread.join()
            raise item.error
        return item

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop planning ahead and wait (up to ``timeout_s``) for the thread to exit.

        A producer blocked inside ``steps`` or a remote call finishes that call first; it is a
        daemon thread, so it never keeps the interpreter alive.
        """
        self._finished = True
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        """Whether the background thread is still running."""
        return self._thread.is_alive()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
