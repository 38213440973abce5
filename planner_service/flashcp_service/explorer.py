"""The plan explorer's part of the HTTP app: the static page at ``/ui/`` and the two small reads it needs.

The page (``flashcp_service/ui/``: plain HTML, JS and CSS, no build step, no CDN) plans through the
ordinary ``/v1/compare`` endpoint. Besides it, this module adds ``GET /v1/workloads/{name}`` (the
CLI's workload generators, so the page draws the same micro-batches as ``flashcp compare --workload``)
and ``GET /v1/recent`` (the Live view: :class:`flashcp_service.recent.RecentPlans`, off unless
``Settings.recent_plans`` > 0).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Query
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from flashcp_planner.workloads import MAX_CONTEXT, WORKLOADS, generate
from flashcp_service.http_models import ErrorResponseModel
from flashcp_service.service import PlannerService

__all__ = ["add_explorer"]

UI_PATH = "/ui"


class WorkloadJSON(BaseModel):
    name: str
    description: str


class WorkloadsResponseModel(BaseModel):
    workloads: list[WorkloadJSON]


class LengthsResponseModel(BaseModel):
    lengths: list[int] = Field(description="Document lengths of one micro-batch, summing to the context.")


class RecentPlanJSON(BaseModel):
    seq: int
    unix_time_s: float
    strategy: str
    cp_size: int
    cost_model: str
    num_documents: int
    tokens: int
    makespan_ms: float
    lower_bound_ms: float
    lengths: list[int] | None = Field(
        default=None, description="With ?lengths=true, unless the plan had too many documents; else null."
    )


class RecentResponseModel(BaseModel):
    enabled: bool = Field(description="False unless the server runs with --recent-plans K > 0.")
    capacity: int
    sample_every: int
    plans: list[RecentPlanJSON] = Field(description="Oldest first.")


def add_explorer(api: FastAPI, service: PlannerService) -> None:
    """Add the explorer's routes and static files to ``api``."""

    @api.get("/v1/workloads", response_model=WorkloadsResponseModel)
    async def workloads() -> dict[str, Any]:
        """Every workload generator (``flashcp workloads``)."""
        return {"workloads": [{"name": w.name, "description": w.description} for w in WORKLOADS.values()]}

    @api.get(
        "/v1/workloads/{name}",
        response_model=LengthsResponseModel,
        responses={422: {"model": ErrorResponseModel, "description": "Unknown workload or context out of range."}},
    )
    async def workload(
        name: str,
        context: Annotated[int, Query(ge=1, le=MAX_CONTEXT, description="Tokens of the micro-batch.")],
        seed: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    ) -> dict[str, Any]:
        """One micro-batch of workload ``name``: the lengths ``flashcp compare --workload`` plans."""
        return {"lengths": generate(name, context=context, seed=seed)[0]}

    @api.get("/v1/recent", response_model=RecentResponseModel)
    async def recent(
        after: Annotated[int, Query(ge=0, description="Only plans recorded after this seq.")] = 0,
        lengths: Annotated[bool, Query(description="Include each plan's document lengths.")] = False,
    ) -> dict[str, Any]:
        """The last plans this server returned (summaries only; see ``--recent-plans``)."""
        kept = service.recent
        return {
            "enabled": kept.enabled,
            "capacity": kept.capacity,
            "sample_every": kept.sample_every,
            "plans": [p.to_dict(with_lengths=lengths) for p in kept.after(after)],
        }

    @api.get(UI_PATH, include_in_schema=False)
    async def ui_root() -> RedirectResponse:
        return RedirectResponse(f"{UI_PATH}/")

    api.mount(f"{UI_PATH}/", StaticFiles(packages=[("flashcp_service", "ui")], html=True), name="ui")
