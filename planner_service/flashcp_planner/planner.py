"""Entry points of the planning core: plan a request, compare strategies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flashcp_planner.errors import Infeasible
from flashcp_planner.layout import build_plan
from flashcp_planner.model import Plan
from flashcp_planner.request import PlanContext, PlanRequest
from flashcp_planner.strategies import STRATEGIES, get_strategy

__all__ = ["Comparison", "compare", "plan", "plan_context"]


def plan_context(ctx: PlanContext, strategy: str) -> Plan:
    """Plan one micro-batch with the named strategy."""
    impl = get_strategy(strategy)
    comm = ctx.options.comm or impl.default_comm
    return build_plan(ctx, impl.layout(ctx), strategy=impl.name, comm=comm)


def plan(request: PlanRequest) -> tuple[Plan, ...]:
    """One plan per micro-batch of ``request``.

    Raises:
        InvalidRequest: malformed request (already raised at construction).
        Infeasible: a micro-batch cannot be planned under its capacity.
    """
    return tuple(plan_context(ctx, request.strategy) for ctx in request.contexts())


@dataclass(frozen=True, slots=True, kw_only=True)
class Comparison:
    """One strategy's result on one micro-batch: a plan, or why there is none."""

    strategy: str
    plan: Plan | None
    """None when the strategy reported the micro-batch infeasible."""
    error: str = ""
    """The :class:`Infeasible` message when ``plan`` is None."""


def compare(request: PlanRequest, strategies: Sequence[str] | None = None) -> tuple[tuple[Comparison, ...], ...]:
    """Plan every micro-batch with every strategy (default: all registered), side by side.

    Returns one tuple of :class:`Comparison` per micro-batch, in ``strategies`` order.
    Infeasibility of one strategy is recorded, not raised.
    """
    names = list(STRATEGIES) if strategies is None else list(strategies)
    for name in names:
        get_strategy(name)
    out = []
    for ctx in request.contexts():
        row = []
        for name in names:
            try:
                row.append(Comparison(strategy=name, plan=plan_context(ctx, name)))
            except Infeasible as exc:
                row.append(Comparison(strategy=name, plan=None, error=str(exc)))
        out.append(tuple(row))
    return tuple(out)
