"""FlashCP client: plans inside dataloaders and trainers, and their execution.

Execution side (torch, no web stack): :func:`dispatch` / :func:`undispatch`
move token-major tensors between packed order and each rank's local order;
:func:`verify_plan_agreement` checks that every rank holds the same plan;
:func:`cp_attention` runs one layer of context-parallel attention from a plan,
moving only the KV the plan says (:mod:`flashcp_client.kv_exchange`).
Other modules append their exports below (``__all__ += [...]``).
"""

from flashcp_client.agreement import AgreementTimeout, check_plan_matches, verify_plan_agreement
from flashcp_client.cp_attention import cp_attention
from flashcp_client.dispatch import dispatch, undispatch
from flashcp_client.errors import PlanMismatchError
from flashcp_client.kv_exchange import CommStats, exchange_kv
from flashcp_client.layout import RankLayout, packed_order, rank_layout

__all__ = [
    "AgreementTimeout",
    "CommStats",
    "PlanMismatchError",
    "RankLayout",
    "check_plan_matches",
    "cp_attention",
    "dispatch",
    "exchange_kv",
    "packed_order",
    "rank_layout",
    "undispatch",
    "verify_plan_agreement",
]

# Plan sources (plan_client.py, sources.py, resilience.py, prefetch.py, dataloader.py, env.py).
from flashcp_client.dataloader import (  # noqa: E402
    PackedCPDataset,
    PackingStats,
    cp_collate,
    pack_documents,
    packed_labels,
    packed_position_ids,
    rank_batch,
)
from flashcp_client.plan_client import ClientStats, PlannerClient  # noqa: E402
from flashcp_client.prefetch import Prefetcher  # noqa: E402
from flashcp_client.resilience import Backoff, BreakerPolicy, BreakerState, CircuitBreaker  # noqa: E402
from flashcp_client.sharing import broadcast_plans, plan_once, share_plan  # noqa: E402
from flashcp_client.sources import InvalidServiceResponse, PlanSourceError, ServiceUnavailable  # noqa: E402

__all__ += [
    "Backoff",
    "BreakerPolicy",
    "BreakerState",
    "CircuitBreaker",
    "ClientStats",
    "InvalidServiceResponse",
    "PackedCPDataset",
    "PackingStats",
    "PlanSourceError",
    "PlannerClient",
    "Prefetcher",
    "ServiceUnavailable",
    "broadcast_plans",
    "cp_collate",
    "pack_documents",
    "packed_labels",
    "packed_position_ids",
    "plan_once",
    "rank_batch",
    "share_plan",
]

# Model-level API (context.py, training.py).
from flashcp_client.context import CPContext, NoContextError, context_attention, cp_context  # noqa: E402
from flashcp_client.training import (  # noqa: E402
    FlashCPAttention,
    all_reduce_gradients,
    cp_loss,
    cp_sdpa,
    global_mean,
)

__all__ += [
    "CPContext",
    "FlashCPAttention",
    "NoContextError",
    "all_reduce_gradients",
    "context_attention",
    "cp_context",
    "cp_loss",
    "cp_sdpa",
    "global_mean",
]
