"""Registry of every planning strategy, baselines included, behind one interface."""

from __future__ import annotations

from flashcp_planner.strategies.base import Strategy
from flashcp_planner.strategies.baselines import AllPerDoc, Contiguous, StaticZigzag, WholeDocOnly
from flashcp_planner.strategies.flashcp import FlashCPHeuristic
from flashcp_planner.strategies.optimum import OptimumCPSAT

__all__ = ["STRATEGIES", "Strategy", "get_strategy"]

STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (FlashCPHeuristic(), AllPerDoc(), StaticZigzag(), Contiguous(), WholeDocOnly(), OptimumCPSAT())
}
"""Name -> strategy instance. ``"optimum"`` imports OR-Tools only when it plans (extra ``flashcp[ilp]``)."""


def get_strategy(name: str) -> Strategy:
    from flashcp_planner.errors import InvalidRequest

    try:
        return STRATEGIES[name]
    except KeyError:
        raise InvalidRequest("strategy", f"unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}") from None
