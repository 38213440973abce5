from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CommMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMM_MODE_UNSPECIFIED: _ClassVar[CommMode]
    COMM_MODE_ALL_GATHER: _ClassVar[CommMode]
    COMM_MODE_SHARDING_AWARE: _ClassVar[CommMode]
    COMM_MODE_EXACT_NEED: _ClassVar[CommMode]
    COMM_MODE_NODE_DEDUP: _ClassVar[CommMode]

class ShardingKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARDING_KIND_UNSPECIFIED: _ClassVar[ShardingKind]
    SHARDING_KIND_WHOLE: _ClassVar[ShardingKind]
    SHARDING_KIND_PER_DOC: _ClassVar[ShardingKind]
    SHARDING_KIND_SUB_GROUP: _ClassVar[ShardingKind]
    SHARDING_KIND_PACKED: _ClassVar[ShardingKind]
COMM_MODE_UNSPECIFIED: CommMode
COMM_MODE_ALL_GATHER: CommMode
COMM_MODE_SHARDING_AWARE: CommMode
COMM_MODE_EXACT_NEED: CommMode
COMM_MODE_NODE_DEDUP: CommMode
SHARDING_KIND_UNSPECIFIED: ShardingKind
SHARDING_KIND_WHOLE: ShardingKind
SHARDING_KIND_PER_DOC: ShardingKind
SHARDING_KIND_SUB_GROUP: ShardingKind
SHARDING_KIND_PACKED: ShardingKind

class MicroBatch(_message.Message):
    __slots__ = ("doc_lengths",)
    DOC_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    doc_lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, doc_lengths: _Optional[_Iterable[int]] = ...) -> None: ...

class EfficiencyPoint(_message.Message):
    __slots__ = ("query_tokens", "efficiency")
    QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EFFICIENCY_FIELD_NUMBER: _ClassVar[int]
    query_tokens: int
    efficiency: float
    def __init__(self, query_tokens: _Optional[int] = ..., efficiency: _Optional[float] = ...) -> None: ...

class CostModel(_message.Message):
    __slots__ = ("base", "name", "hidden_size", "ffn_hidden_size", "num_heads", "num_kv_heads", "head_dim", "bytes_per_element", "gemm_tflops", "attention_tflops", "attention_efficiency", "attention_segment_overhead_ms", "linear_backward_ratio", "attention_backward_ratio", "gpus_per_node", "intra_node_gbps", "inter_node_gbps", "intra_node_latency_ms", "inter_node_latency_ms", "overlap_fraction")
    BASE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    FFN_HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_ELEMENT_FIELD_NUMBER: _ClassVar[int]
    GEMM_TFLOPS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_TFLOPS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_EFFICIENCY_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_SEGMENT_OVERHEAD_MS_FIELD_NUMBER: _ClassVar[int]
    LINEAR_BACKWARD_RATIO_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKWARD_RATIO_FIELD_NUMBER: _ClassVar[int]
    GPUS_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    INTRA_NODE_GBPS_FIELD_NUMBER: _ClassVar[int]
    INTER_NODE_GBPS_FIELD_NUMBER: _ClassVar[int]
    INTRA_NODE_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    INTER_NODE_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_FRACTION_FIELD_NUMBER: _ClassVar[int]
    base: str
    name: str
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    bytes_per_element: int
    gemm_tflops: float
    attention_tflops: float
    attention_efficiency: _containers.RepeatedCompositeFieldContainer[EfficiencyPoint]
    attention_segment_overhead_ms: float
    linear_backward_ratio: float
    attention_backward_ratio: float
    gpus_per_node: int
    intra_node_gbps: float
    inter_node_gbps: float
    intra_node_latency_ms: float
    inter_node_latency_ms: float
    overlap_fraction: float
    def __init__(self, base: _Optional[str] = ..., name: _Optional[str] = ..., hidden_size: _Optional[int] = ..., ffn_hidden_size: _Optional[int] = ..., num_heads: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., bytes_per_element: _Optional[int] = ..., gemm_tflops: _Optional[float] = ..., attention_tflops: _Optional[float] = ..., attention_efficiency: _Optional[_Iterable[_Union[EfficiencyPoint, _Mapping]]] = ..., attention_segment_overhead_ms: _Optional[float] = ..., linear_backward_ratio: _Optional[float] = ..., attention_backward_ratio: _Optional[float] = ..., gpus_per_node: _Optional[int] = ..., intra_node_gbps: _Optional[float] = ..., inter_node_gbps: _Optional[float] = ..., intra_node_latency_ms: _Optional[float] = ..., inter_node_latency_ms: _Optional[float] = ..., overlap_fraction: _Optional[float] = ...) -> None: ...

class PlanOptions(_message.Message):
    __slots__ = ("comm", "allow_sub_group", "time_limit_s", "num_workers", "random_seed")
    COMM_FIELD_NUMBER: _ClassVar[int]
    ALLOW_SUB_GROUP_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMIT_S_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    RANDOM_SEED_FIELD_NUMBER: _ClassVar[int]
    comm: CommMode
    allow_sub_group: bool
    time_limit_s: float
    num_workers: int
    random_seed: int
    def __init__(self, comm: _Optional[_Union[CommMode, str]] = ..., allow_sub_group: _Optional[bool] = ..., time_limit_s: _Optional[float] = ..., num_workers: _Optional[int] = ..., random_seed: _Optional[int] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("micro_batches", "cp_size", "cost_model_preset", "cost_model_custom", "strategy", "capacity_slack", "capacity", "options", "request_id", "omit_transfers")
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    CP_SIZE_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_PRESET_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_CUSTOM_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_SLACK_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OMIT_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    micro_batches: _containers.RepeatedCompositeFieldContainer[MicroBatch]
    cp_size: int
    cost_model_preset: str
    cost_model_custom: CostModel
    strategy: str
    capacity_slack: float
    capacity: int
    options: PlanOptions
    request_id: str
    omit_transfers: bool
    def __init__(self, micro_batches: _Optional[_Iterable[_Union[MicroBatch, _Mapping]]] = ..., cp_size: _Optional[int] = ..., cost_model_preset: _Optional[str] = ..., cost_model_custom: _Optional[_Union[CostModel, _Mapping]] = ..., strategy: _Optional[str] = ..., capacity_slack: _Optional[float] = ..., capacity: _Optional[int] = ..., options: _Optional[_Union[PlanOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., omit_transfers: _Optional[bool] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("micro_batches", "cp_size", "cost_model_preset", "cost_model_custom", "strategies", "capacity_slack", "capacity", "options", "request_id", "omit_transfers")
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    CP_SIZE_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_PRESET_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_CUSTOM_FIELD_NUMBER: _ClassVar[int]
    STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_SLACK_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OMIT_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    micro_batches: _containers.RepeatedCompositeFieldContainer[MicroBatch]
    cp_size: int
    cost_model_preset: str
    cost_model_custom: CostModel
    strategies: _containers.RepeatedScalarFieldContainer[str]
    capacity_slack: float
    capacity: int
    options: PlanOptions
    request_id: str
    omit_transfers: bool
    def __init__(self, micro_batches: _Optional[_Iterable[_Union[MicroBatch, _Mapping]]] = ..., cp_size: _Optional[int] = ..., cost_model_preset: _Optional[str] = ..., cost_model_custom: _Optional[_Union[CostModel, _Mapping]] = ..., strategies: _Optional[_Iterable[str]] = ..., capacity_slack: _Optional[float] = ..., capacity: _Optional[int] = ..., options: _Optional[_Union[PlanOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., omit_transfers: _Optional[bool] = ...) -> None: ...

class ListCostModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListStrategiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RankPlan(_message.Message):
    __slots__ = ("rank", "segments", "tokens", "linear_ms", "attention_ms", "comm_ms", "exposed_comm_ms", "total_ms", "recv_bytes", "send_bytes")
    RANK_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LINEAR_MS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MS_FIELD_NUMBER: _ClassVar[int]
    COMM_MS_FIELD_NUMBER: _ClassVar[int]
    EXPOSED_COMM_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    RECV_BYTES_FIELD_NUMBER: _ClassVar[int]
    SEND_BYTES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    segments: _containers.RepeatedScalarFieldContainer[int]
    tokens: int
    linear_ms: float
    attention_ms: float
    comm_ms: float
    exposed_comm_ms: float
    total_ms: float
    recv_bytes: int
    send_bytes: int
    def __init__(self, rank: _Optional[int] = ..., segments: _Optional[_Iterable[int]] = ..., tokens: _Optional[int] = ..., linear_ms: _Optional[float] = ..., attention_ms: _Optional[float] = ..., comm_ms: _Optional[float] = ..., exposed_comm_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., recv_bytes: _Optional[int] = ..., send_bytes: _Optional[int] = ...) -> None: ...

class DocShardings(_message.Message):
    __slots__ = ("docs", "shardings", "rank_counts", "ranks")
    DOCS_FIELD_NUMBER: _ClassVar[int]
    SHARDINGS_FIELD_NUMBER: _ClassVar[int]
    RANK_COUNTS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    docs: _containers.RepeatedScalarFieldContainer[int]
    shardings: _containers.RepeatedScalarFieldContainer[ShardingKind]
    rank_counts: _containers.RepeatedScalarFieldContainer[int]
    ranks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, docs: _Optional[_Iterable[int]] = ..., shardings: _Optional[_Iterable[_Union[ShardingKind, str]]] = ..., rank_counts: _Optional[_Iterable[int]] = ..., ranks: _Optional[_Iterable[int]] = ...) -> None: ...

class Optimality(_message.Message):
    __slots__ = ("status", "objective_ms", "bound_ms", "heuristic_ms", "heuristic_gap", "solve_time_s")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_MS_FIELD_NUMBER: _ClassVar[int]
    BOUND_MS_FIELD_NUMBER: _ClassVar[int]
    HEURISTIC_MS_FIELD_NUMBER: _ClassVar[int]
    HEURISTIC_GAP_FIELD_NUMBER: _ClassVar[int]
    SOLVE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    status: str
    objective_ms: float
    bound_ms: float
    heuristic_ms: float
    heuristic_gap: float
    solve_time_s: float
    def __init__(self, status: _Optional[str] = ..., objective_ms: _Optional[float] = ..., bound_ms: _Optional[float] = ..., heuristic_ms: _Optional[float] = ..., heuristic_gap: _Optional[float] = ..., solve_time_s: _Optional[float] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("version", "strategy", "cp_size", "doc_lengths", "capacity", "comm", "cost_model", "makespan_ms", "lower_bound_ms", "ranks", "documents", "transfers", "transfers_omitted", "optimality", "gpus_per_node")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    CP_SIZE_FIELD_NUMBER: _ClassVar[int]
    DOC_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    MAKESPAN_MS_FIELD_NUMBER: _ClassVar[int]
    LOWER_BOUND_MS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    OPTIMALITY_FIELD_NUMBER: _ClassVar[int]
    GPUS_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    version: int
    strategy: str
    cp_size: int
    doc_lengths: _containers.RepeatedScalarFieldContainer[int]
    capacity: int
    comm: CommMode
    cost_model: str
    makespan_ms: float
    lower_bound_ms: float
    ranks: _containers.RepeatedCompositeFieldContainer[RankPlan]
    documents: DocShardings
    transfers: _containers.RepeatedScalarFieldContainer[int]
    transfers_omitted: bool
    optimality: Optimality
    gpus_per_node: int
    def __init__(self, version: _Optional[int] = ..., strategy: _Optional[str] = ..., cp_size: _Optional[int] = ..., doc_lengths: _Optional[_Iterable[int]] = ..., capacity: _Optional[int] = ..., comm: _Optional[_Union[CommMode, str]] = ..., cost_model: _Optional[str] = ..., makespan_ms: _Optional[float] = ..., lower_bound_ms: _Optional[float] = ..., ranks: _Optional[_Iterable[_Union[RankPlan, _Mapping]]] = ..., documents: _Optional[_Union[DocShardings, _Mapping]] = ..., transfers: _Optional[_Iterable[int]] = ..., transfers_omitted: _Optional[bool] = ..., optimality: _Optional[_Union[Optimality, _Mapping]] = ..., gpus_per_node: _Optional[int] = ...) -> None: ...

class PlanResponse(_message.Message):
    __slots__ = ("plans", "request_id", "planner_version")
    PLANS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PLANNER_VERSION_FIELD_NUMBER: _ClassVar[int]
    plans: _containers.RepeatedCompositeFieldContainer[Plan]
    request_id: str
    planner_version: str
    def __init__(self, plans: _Optional[_Iterable[_Union[Plan, _Mapping]]] = ..., request_id: _Optional[str] = ..., planner_version: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "field", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    field: str
    message: str
    def __init__(self, code: _Optional[str] = ..., field: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class PlanStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: PlanResponse
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[PlanResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class StrategyResult(_message.Message):
    __slots__ = ("strategy", "plan", "error")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    strategy: str
    plan: Plan
    error: str
    def __init__(self, strategy: _Optional[str] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class MicroBatchComparison(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[StrategyResult]
    def __init__(self, results: _Optional[_Iterable[_Union[StrategyResult, _Mapping]]] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("comparisons", "request_id", "planner_version")
    COMPARISONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PLANNER_VERSION_FIELD_NUMBER: _ClassVar[int]
    comparisons: _containers.RepeatedCompositeFieldContainer[MicroBatchComparison]
    request_id: str
    planner_version: str
    def __init__(self, comparisons: _Optional[_Iterable[_Union[MicroBatchComparison, _Mapping]]] = ..., request_id: _Optional[str] = ..., planner_version: _Optional[str] = ...) -> None: ...

class ListCostModelsResponse(_message.Message):
    __slots__ = ("cost_models", "default_cost_model")
    COST_MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    cost_models: _containers.RepeatedCompositeFieldContainer[CostModel]
    default_cost_model: str
    def __init__(self, cost_models: _Optional[_Iterable[_Union[CostModel, _Mapping]]] = ..., default_cost_model: _Optional[str] = ...) -> None: ...

class StrategyInfo(_message.Message):
    __slots__ = ("name", "description", "is_optimal", "default_comm")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    IS_OPTIMAL_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_COMM_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    is_optimal: bool
    default_comm: CommMode
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., is_optimal: _Optional[bool] = ..., default_comm: _Optional[_Union[CommMode, str]] = ...) -> None: ...

class ListStrategiesResponse(_message.Message):
    __slots__ = ("strategies", "default_strategy")
    STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    strategies: _containers.RepeatedCompositeFieldContainer[StrategyInfo]
    default_strategy: str
    def __init__(self, strategies: _Optional[_Iterable[_Union[StrategyInfo, _Mapping]]] = ..., default_strategy: _Optional[str] = ...) -> None: ...
