"""The strategy interface every planner (heuristic, exact, baseline) implements."""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

from flashcp_planner.layout import Layout
from flashcp_planner.model import CommMode
from flashcp_planner.request import PlanContext

__all__ = ["Strategy"]


@runtime_checkable
class Strategy(Protocol):
    """Decides which rank owns which tokens of one micro-batch.

    Implementations are stateless; :func:`flashcp_planner.plan` derives the
    transfers and costs of the returned layout with the shared evaluator.
    """

    name: ClassVar[str]
    """Registry key, e.g. ``"flashcp"``."""
    description: ClassVar[str]
    """One line for listings."""
    is_optimal: ClassVar[bool]
    """True for exact solvers whose plans minimise the cost model."""
    default_comm: ClassVar[CommMode]
    """Communication mechanism used unless the request overrides it."""

    def layout(self, ctx: PlanContext) -> Layout:
        """Return the layout for ``ctx``.

        Raises:
            Infeasible: no layout of this strategy fits the capacity.
        """
        ...
