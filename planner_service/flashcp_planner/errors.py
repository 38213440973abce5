"""Errors raised by the planning core.

Transports map these once each (HTTP status codes, gRPC status codes, CLI exit
codes); nothing else in the core raises for user input.
"""

from __future__ import annotations

__all__ = ["PlanningError", "InvalidRequest", "Infeasible"]


class PlanningError(Exception):
    """Base class of every error the planner reports to its caller."""


class InvalidRequest(PlanningError, ValueError):
    """The request itself is malformed: a field is missing, of the wrong type or out of range.

    Attributes:
        field: dotted path of the offending field (``"micro_batches[0][3]"``), or ``""``.
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)

    def __reduce__(self) -> tuple[type[InvalidRequest], tuple[str, str]]:
        return (type(self), (self.field, self.problem))


class Infeasible(PlanningError):
    """The request is well-formed but no plan satisfies its constraints (e.g. capacity)."""
