"""Pydantic models of the HTTP API: strict request bodies and the documented response shapes.

Request models are strict (a length of ``1.5`` or ``"3"`` is a 422 naming the
field) and forbid unknown fields, so the served OpenAPI schema is exact.
Response models only document the JSON (``Plan.to_dict`` output), which the
app serialises directly.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from flashcp_planner.cost import CostModel
from flashcp_planner.errors import InvalidRequest
from flashcp_planner.model import CommMode
from flashcp_planner.presets import cost_model_from_dict, get_preset
from flashcp_planner.request import MAX_CP_SIZE, MAX_DOC_LENGTH, PlanOptions, PlanRequest

__all__ = [
    "CompareBody",
    "CompareResponseModel",
    "CostModelBody",
    "CostModelsResponseModel",
    "ErrorResponseModel",
    "PlanBody",
    "PlanResponseModel",
    "StrategiesResponseModel",
]

DocLength = Annotated[int, Field(ge=1, le=MAX_DOC_LENGTH)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
CommName = Literal["all_gather", "sharding_aware", "exact_need", "node_dedup"]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class CostModelBody(_Strict):
    """A cost model: fields override the preset named by ``base`` (see ``flashcp_planner.cost.CostModel``)."""

    base: str | None = Field(default=None, description="Preset the unset fields come from (default h100-llama8b).")
    name: Annotated[str, Field(min_length=1)] | None = None
    hidden_size: PositiveInt | None = None
    ffn_hidden_size: PositiveInt | None = None
    num_heads: PositiveInt | None = None
    num_kv_heads: PositiveInt | None = Field(default=None, description="Must divide num_heads.")
    head_dim: PositiveInt | None = None
    bytes_per_element: PositiveInt | None = None
    gemm_tflops: PositiveFloat | None = None
    attention_tflops: PositiveFloat | None = None
    # Pairs are lists of two numbers, not tuples: OpenAPI tools mishandle ``prefixItems``.
    # The core checks that query_tokens is a positive integer and efficiency in (0, 1].
    attention_efficiency: (
        Annotated[list[Annotated[list[PositiveInt | PositiveFloat], Field(min_length=2, max_length=2)]],
                  Field(min_length=1)]
        | None
    ) = Field(default=None, description="[query_tokens, efficiency] points, query_tokens strictly increasing.")
    attention_segment_overhead_ms: NonNegativeFloat | None = None
    linear_backward_ratio: NonNegativeFloat | None = None
    attention_backward_ratio: NonNegativeFloat | None = None
    gpus_per_node: PositiveInt | None = None
    intra_node_gbps: PositiveFloat | None = None
    inter_node_gbps: PositiveFloat | None = None
    intra_node_latency_ms: NonNegativeFloat | None = None
    inter_node_latency_ms: NonNegativeFloat | None = None
    overlap_fraction: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None

    def to_cost_model(self) -> CostModel:
        """Raises InvalidRequest for cross-field problems (unknown base, num_kv_heads not dividing num_heads)."""
        return cost_model_from_dict(self.model_dump(exclude_none=True))


class OptionsBody(_Strict):
    """Search knobs; omitted ones take the planner defaults."""

    comm: CommName | None = Field(default=None, description="Override the strategy's communication mode.")
    allow_sub_group: bool = True
    time_limit_s: PositiveFloat = Field(default=10.0, description="Exact-solver limit; capped by the server.")
    num_workers: PositiveInt = 8
    random_seed: NonNegativeInt = 0

    def to_options(self) -> PlanOptions:
        """Only the fields the caller set; the rest take the :class:`PlanOptions` defaults."""
        values = self.model_dump(exclude_unset=True)
        if values.get("comm") is not None:
            values["comm"] = CommMode(values["comm"])
        return PlanOptions(**values)


class _RequestBody(_Strict):
    micro_batches: Annotated[list[Annotated[list[DocLength], Field(min_length=1)]], Field(min_length=1)] = Field(
        description="Per micro-batch, the document lengths (tokens) in packed order."
    )
    cp_size: Annotated[int, Field(ge=1, le=MAX_CP_SIZE)] = Field(description="Ranks in the CP group.")
    cost_model: Annotated[str, Field(min_length=1)] | CostModelBody | None = Field(
        default=None, description="Preset name or cost-model object; default: the server's default preset."
    )
    capacity_slack: NonNegativeFloat = Field(default=0.25, description="Capacity = ceil(T/N) * (1 + slack).")
    capacity: PositiveInt | None = Field(default=None, description="Absolute per-rank capacity; overrides the slack.")
    options: OptionsBody | None = None
    omit_transfers: bool = Field(
        default=False,
        description="Leave the KV transfer lists out of the plans (no 'transfers' key); callers that derive them "
        "from the segments (flashcp_planner.kv_transfers) save their derivation and bytes.",
    )

    def _fields(self, default_cost_model: CostModel) -> dict:
        if self.cost_model is None:
            cost_model = default_cost_model
        elif isinstance(self.cost_model, str):
            cost_model = get_preset(self.cost_model)
        else:
            cost_model = self.cost_model.to_cost_model()
        values = {
            "micro_batches": self.micro_batches,
            "cp_size": self.cp_size,
            "cost_model": cost_model,
            "capacity_slack": self.capacity_slack,
            "capacity": self.capacity,
        }
        if self.options is not None:
            values["options"] = self.options.to_options()
        return values

    @property
    def num_documents(self) -> int:
        return sum(len(mb) for mb in self.micro_batches)


class PlanBody(_RequestBody):
    """``POST /v1/plan``: one plan per micro-batch (mirrors ``flashcp.v1.PlanRequest``)."""

    strategy: str = Field(default="flashcp", description="A name from GET /v1/strategies.")

    def to_request(self, default_cost_model: CostModel) -> PlanRequest:
        """Raises InvalidRequest naming the field."""
        return PlanRequest(strategy=self.strategy, **self._fields(default_cost_model))


class CompareBody(_RequestBody):
    """``POST /v1/compare``: strategies side by side (mirrors ``flashcp.v1.CompareRequest``)."""

    strategies: list[str] | None = Field(default=None, description="Default: every registered strategy.")

    def to_request(self, default_cost_model: CostModel) -> PlanRequest:
        """Raises InvalidRequest naming the field."""
        if self.strategies is not None and not self.strategies:
            raise InvalidRequest("strategies", "must name at least one strategy (omit it for all)")
        return PlanRequest(**self._fields(default_cost_model))


# ---------------------------------------------------------------- responses (documentation only)


class RankJSON(BaseModel):
    rank: int
    segments: list[Annotated[list[int], Field(min_length=3, max_length=3)]] = Field(
        description="[doc, start, end] in local order."
    )
    tokens: int
    linear_ms: float
    attention_ms: float
    comm_ms: float
    exposed_comm_ms: float
    total_ms: float
    recv_bytes: int
    send_bytes: int


class DocumentJSON(BaseModel):
    doc: int
    sharding: Literal["whole", "per_doc", "sub_group", "packed"]
    ranks: list[int]


class OptimalityJSON(BaseModel):
    status: str
    objective_ms: float
    bound_ms: float
    heuristic_ms: float
    heuristic_gap: float
    solve_time_s: float | None = None


class PlanJSON(BaseModel):
    """``Plan.to_dict()``: the same JSON as ``flashcp plan --format json``."""

    version: int
    strategy: str
    cp_size: int
    doc_lengths: list[int]
    capacity: int
    comm: CommName
    cost_model: str
    makespan_ms: float
    lower_bound_ms: float
    ranks: list[RankJSON]
    documents: list[DocumentJSON]
    transfers: list[Annotated[list[int], Field(min_length=5, max_length=5)]] | None = Field(
        default=None,
        description="[src, dst, doc, start, end]; empty for all_gather. Absent when the request set omit_transfers.",
    )
    optimality: OptimalityJSON | None = None
    gpus_per_node: int | None = Field(
        default=None, description="Ranks per node the node_dedup routes were derived with; absent otherwise."
    )


class PlanResponseModel(BaseModel):
    plans: list[PlanJSON]


class StrategyResultJSON(BaseModel):
    strategy: str
    plan: PlanJSON | None
    error: str


class ComparisonJSON(BaseModel):
    results: list[StrategyResultJSON]


class CompareResponseModel(BaseModel):
    comparisons: list[ComparisonJSON] = Field(description="One entry per micro-batch.")


class CostModelJSON(BaseModel):
    """A cost model in the JSON cost-model file form (every field)."""

    name: str
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    bytes_per_element: int
    gemm_tflops: float
    attention_tflops: float
    attention_efficiency: list[Annotated[list[float], Field(min_length=2, max_length=2)]]
    attention_segment_overhead_ms: float
    linear_backward_ratio: float
    attention_backward_ratio: float
    gpus_per_node: int
    intra_node_gbps: float
    inter_node_gbps: float
    intra_node_latency_ms: float
    inter_node_latency_ms: float
    overlap_fraction: float


class CostModelsResponseModel(BaseModel):
    cost_models: list[CostModelJSON]
    default_cost_model: str


class StrategyJSON(BaseModel):
    name: str
    description: str
    is_optimal: bool
    default_comm: CommName


class StrategiesResponseModel(BaseModel):
    strategies: list[StrategyJSON]
    default_strategy: str


class ErrorJSON(BaseModel):
    code: str = Field(description="invalid_request, infeasible, too_large, overloaded, unavailable, ...")
    field: str = Field(description="Offending request field, e.g. micro_batches[0][3], or empty.")
    message: str


class ErrorResponseModel(BaseModel):
    error: ErrorJSON
