"""Every ``FLASHCP_*`` environment variable the client reads, one function each.

Nothing else in :mod:`flashcp_client` reads the environment; configuration
objects never do. :meth:`flashcp_client.PlannerClient.from_env` combines these.
A malformed value raises ``ValueError`` naming the variable.
"""

from __future__ import annotations

import math
import os

__all__ = [
    "agreement",
    "agreement_timeout_s",
    "planner_address",
    "planner_cost_model",
    "planner_deadline_s",
    "planner_fallback",
    "planner_retries",
    "planner_strategy",
    "planner_timeout_s",
]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _get(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def planner_address() -> str | None:
    """``FLASHCP_PLANNER_ADDRESS``: where plans come from.

    ``grpc://host:port``, ``http://host:port`` or ``embedded``; unset means embedded
    (``None``). The address is checked when the client is built.
    """
    return _get("FLASHCP_PLANNER_ADDRESS")


def _seconds(name: str, default: float) -> float:
    raw = _get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: must be a positive number of seconds, got {raw!r}")
    return value


def planner_timeout_s() -> float:
    """``FLASHCP_PLANNER_TIMEOUT_S``: limit of one remote attempt in seconds (default 0.5)."""
    return _seconds("FLASHCP_PLANNER_TIMEOUT_S", 0.5)


def planner_deadline_s() -> float:
    """``FLASHCP_PLANNER_DEADLINE_S``: limit of one plan call's remote attempts, retries included (default 1)."""
    return _seconds("FLASHCP_PLANNER_DEADLINE_S", 1.0)


def planner_retries() -> int:
    """``FLASHCP_PLANNER_RETRIES``: extra remote attempts after a transient failure (default 2)."""
    raw = _get("FLASHCP_PLANNER_RETRIES")
    if raw is None:
        return 2
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"FLASHCP_PLANNER_RETRIES: must be a non-negative integer, got {raw!r}")
    return value


def planner_fallback() -> bool:
    """``FLASHCP_PLANNER_FALLBACK``: plan in-process when the service fails (default on).

    Accepts 1/0, true/false, yes/no, on/off.
    """
    raw = _get("FLASHCP_PLANNER_FALLBACK")
    if raw is None:
        return True
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"FLASHCP_PLANNER_FALLBACK: expected one of 1/0, true/false, yes/no, on/off, got {raw!r}")


def planner_strategy() -> str:
    """``FLASHCP_PLANNER_STRATEGY``: default strategy name (default ``flashcp``); checked when the client is built."""
    return _get("FLASHCP_PLANNER_STRATEGY") or "flashcp"


def planner_cost_model() -> str:
    """``FLASHCP_PLANNER_COST_MODEL``: preset name or JSON cost-model file (default ``h100-llama8b``)."""
    return _get("FLASHCP_PLANNER_COST_MODEL") or "h100-llama8b"


def agreement() -> str:
    """``FLASHCP_AGREEMENT``: when ``cp_attention`` checks plan agreement (default ``first_use``).

    ``first_use``, ``always`` or ``off``; checked by :func:`flashcp_client.agreement.agreement_mode`.
    """
    return _get("FLASHCP_AGREEMENT") or "first_use"


def agreement_timeout_s() -> float:
    """``FLASHCP_AGREEMENT_TIMEOUT_S``: how long a rank waits for the others at the agreement check (default 300)."""
    return _seconds("FLASHCP_AGREEMENT_TIMEOUT_S", 300.0)
