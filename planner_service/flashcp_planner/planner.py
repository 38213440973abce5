"""Entry points of the planning core: plan a request, compare strategies."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from flashcp_planner.cost import makespan_of_sums, node_dedup_proxy, rank_costs_of_sums
from flashcp_planner.errors import Infeasible
from flashcp_planner.layout import build_plan, layout_crosses_nodes, layout_pricing
from flashcp_planner.model import CommMode, Plan
from flashcp_planner.request import PlanContext, PlanRequest
from flashcp_planner.strategies import STRATEGIES, get_strategy

__all__ = ["Comparison", "auto_comms", "compare", "plan", "plan_context"]


def plan_context(ctx: PlanContext, strategy: str) -> Plan:
    """Plan one micro-batch with the named strategy.

    Without ``options.comm``, a strategy whose default is ``EXACT_NEED`` gets its layout priced
    under ``NODE_DEDUP`` too when the group spans nodes, and the plan takes the faster mode (the
    same keys reach the same ranks; only the routes differ). When its layout splits a document
    across nodes, a searching heuristic (exact-need default, not exact) also searches under
    :func:`~flashcp_planner.cost.node_dedup_proxy`, and the fastest (layout, mode) pair is kept,
    ties to the first. ``options.comm="node_dedup"`` does the same with that one mode (baselines:
    their own layout, re-scored).
    """
    impl = get_strategy(strategy)
    comm = ctx.options.comm or impl.default_comm
    layout = impl.layout(ctx)
    modes = auto_comms(ctx.options.comm, impl.default_comm, ctx.cp_size, ctx.cost_model.gpus_per_node)
    if CommMode.NODE_DEDUP not in modes or not layout_crosses_nodes(ctx, layout):
        return build_plan(ctx, layout, strategy=impl.name, comm=comm)
    candidates = [(layout, mode, priced) for mode, priced in layout_pricing(ctx, layout, modes).items()]
    # Baselines are re-scored as they are; an exact strategy's optimum is of its own model.
    if impl.default_comm is CommMode.EXACT_NEED and not impl.is_optimal:
        proxy = dataclasses.replace(ctx, cost_model=node_dedup_proxy(ctx.cost_model),
                                    options=dataclasses.replace(ctx.options, comm=CommMode.EXACT_NEED))
        other = impl.layout(proxy)  # (searched for node_dedup: priced under it only)
        dedup = CommMode.NODE_DEDUP
        candidates.append((other, dedup, layout_pricing(ctx, other, (dedup,))[dedup]))
    layout, comm, priced = min(candidates, key=lambda c: makespan_of_sums(*c[2], ctx.cost_model))
    return build_plan(ctx, layout, strategy=impl.name, comm=comm, costs=rank_costs_of_sums(*priced, ctx.cost_model))


def auto_comms(requested: CommMode | None, default: CommMode, cp_size: int, gpus_per_node: int) -> tuple[CommMode, ...]:
    """The modes a plan may come back with: ``requested`` if given; else the strategy's ``default``,
    and ``NODE_DEDUP`` when the default is ``EXACT_NEED`` and the group spans nodes."""
    if requested is not None:
        return (requested,)
    if default is CommMode.EXACT_NEED and cp_size > gpus_per_node:
        return (default, CommMode.NODE_DEDUP)
    return (default,)


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
