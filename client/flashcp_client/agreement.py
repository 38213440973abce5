"""Plan agreement: every rank of a CP group must execute the identical plan on a matching batch.

A collective whose shapes come from the plan (the KV exchange) would hang or
corrupt data if ranks disagreed; :func:`verify_plan_agreement` exchanges a
fixed-size record (plan fingerprint plus a local-validity flag) that is safe to
gather whatever the plans say, and raises on every rank when anything differs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from flashcp_client.errors import PlanMismatchError
from flashcp_planner import Plan
from flashcp_planner.model import PLAN_FORMAT_VERSION

__all__ = ["verify_plan_agreement", "check_plan_matches"]

_DIGEST_WORDS = 4  # 32 bytes of the SHA-256 fingerprint as int64 words
_OK, _LOCAL_PROBLEM = 0, 1


def check_plan_matches(
    plan: Plan, *, group_size: int, rank: int, local_tokens: int | None = None, total_tokens: int | None = None
) -> None:
    """Local checks of a plan against the group and the batch (no communication).

    Raises:
        PlanMismatchError: wrong plan format version, CP size, rank, local or
            total token count.
    """
    if plan.version != PLAN_FORMAT_VERSION:
        raise PlanMismatchError(
            "version", f"plan format version {plan.version}, this client executes {PLAN_FORMAT_VERSION}"
        )
    if plan.cp_size != group_size:
        raise PlanMismatchError("cp_size", f"plan is for {plan.cp_size} ranks but the process group has {group_size}")
    if not 0 <= rank < plan.cp_size:
        raise PlanMismatchError("rank", f"rank {rank} is outside the plan's CP group of size {plan.cp_size}")
    if total_tokens is not None and total_tokens != plan.num_tokens:
        raise PlanMismatchError("total_tokens", f"batch has {total_tokens} tokens, plan covers {plan.num_tokens}")
    if local_tokens is not None and local_tokens != plan.ranks[rank].num_tokens:
        raise PlanMismatchError(
            "local_tokens", f"rank {rank} holds {local_tokens} tokens, plan gives it {plan.ranks[rank].num_tokens}"
        )


def _digest_words(plan: Plan) -> list[int]:
    raw = bytes.fromhex(plan.fingerprint())
    return [int.from_bytes(raw[8 * i: 8 * i + 8], "little", signed=True) for i in range(_DIGEST_WORDS)]


def _collective_device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def verify_plan_agreement(
    plan: Plan,
    group: Any = None,
    *,
    local_tokens: int | None = None,
    total_tokens: int | None = None,
) -> str:
    """Check that every rank of ``group`` holds the same plan and that it fits each rank's batch.

    Collective over ``group``; call it once per micro-batch before the first
    ``cp_attention``. It always enters exactly one fixed-size ``all_gather``,
    even when the local checks fail, so a problem on one rank raises on every
    rank instead of leaving the others blocked in a later collective.

    Args:
        plan: the plan this rank is about to execute.
        group: the CP process group (default: the world).
        local_tokens: tokens this rank holds (checked against the plan if given).
        total_tokens: tokens of the packed micro-batch (checked if given).

    Returns:
        The agreed plan fingerprint.

    Raises:
        PlanMismatchError: on every rank, if any rank's plan differs (field
            ``"fingerprint"``) or fails its local checks (the failing rank
            raises its own error, the others name it).
        RuntimeError: torch.distributed is not initialised.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    local_error: PlanMismatchError | None = None
    try:
        check_plan_matches(plan, group_size=size, rank=rank, local_tokens=local_tokens, total_tokens=total_tokens)
    except PlanMismatchError as exc:
        local_error = exc
    record = torch.tensor([*_digest_words(plan), _OK if local_error is None else _LOCAL_PROBLEM],
                          dtype=torch.int64, device=_collective_device(group))
    records = [torch.empty_like(record) for _ in range(size)]
    dist.all_gather(records, record, group=group)
    rows = [tuple(r.tolist()) for r in records]

    if local_error is not None:
        raise local_error
    failed = [r for r, row in enumerate(rows) if row[-1] != _OK]
    if failed:
        raise PlanMismatchError("plan", f"rank(s) {failed} reported a plan that does not match their group or batch")
    digests: dict[tuple[int, ...], list[int]] = {}
    for r, row in enumerate(rows):
        digests.setdefault(row[:_DIGEST_WORDS], []).append(r)
    if len(digests) > 1:
        mine = rows[rank][:_DIGEST_WORDS]
        others = sorted(r for d, ranks in digests.items() if d != mine for r in ranks)
        groups = "; ".join(f"ranks {ranks}" for ranks in digests.values())
        raise PlanMismatchError(
            "fingerprint",
            f"ranks of the CP group hold different plans ({groups}); rank {rank} disagrees with ranks {others}",
        )
    return plan.fingerprint()
