"""FlashCP planning core: sharding plans for context-parallel attention.

Pure Python (numpy at most): no web, gRPC, torch or solver imports at module
level, so trainers and dataloaders can plan in-process.

Main API: :func:`plan` on a :class:`PlanRequest` returns one :class:`Plan` per
micro-batch; :data:`STRATEGIES` lists every strategy, baselines included.
"""

from flashcp_planner.comm import kv_transfers
from flashcp_planner.cost import CostModel
from flashcp_planner.errors import Infeasible, InvalidRequest, PlanningError
from flashcp_planner.model import (
    CommMode,
    DocSharding,
    KVTransfer,
    Optimality,
    Plan,
    RankCost,
    RankPlan,
    Segment,
    ShardingKind,
)
from flashcp_planner.planner import Comparison, compare, plan, plan_context
from flashcp_planner.presets import PRESETS, get_preset, load_cost_model
from flashcp_planner.request import PlanContext, PlanOptions, PlanRequest
from flashcp_planner.strategies import STRATEGIES

__all__ = [
    "CommMode",
    "Comparison",
    "CostModel",
    "compare",
    "DocSharding",
    "Infeasible",
    "InvalidRequest",
    "KVTransfer",
    "Optimality",
    "PRESETS",
    "Plan",
    "PlanContext",
    "PlanOptions",
    "PlanRequest",
    "PlanningError",
    "RankCost",
    "RankPlan",
    "STRATEGIES",
    "Segment",
    "ShardingKind",
    "get_preset",
    "kv_transfers",
    "load_cost_model",
    "plan",
    "plan_context",
]

__version__ = "0.1.0"
