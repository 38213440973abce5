"""Errors raised by the execution side of the client (agreement, dispatch, KV exchange)."""

from __future__ import annotations

__all__ = ["PlanMismatchError"]


class PlanMismatchError(ValueError):
    """A plan does not match the CP group or the batch it is applied to.

    Raised before any collective whose shape depends on the plan is entered,
    and by :func:`flashcp_client.verify_plan_agreement` on every rank of a
    group whose ranks hold different plans.

    Attributes:
        field: what disagrees (``"fingerprint"``, ``"cp_size"``, ``"rank"``,
            ``"x.shape[0]"``, ...).
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)
