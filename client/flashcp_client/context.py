"""The plan of the current step as a context, and attention as a ``torch.library`` custom op that reads it.

::

    with cp_context(batch["plan"], cp_group):          # once per micro-batch
        loss = model(batch["input_ids"], ...)           # every FlashCPAttention / cp_sdpa inside uses the plan
        loss.backward()                                 # inside the context too

``flashcp::cp_attention`` takes only tensors and constants (the layer index,
softmax scale, backend), so ``torch.compile`` traces it as one opaque node: no
graph break, ``fullgraph=True`` works, and a new plan does not recompile (only
a new local token count can, once, before dynamo marks it dynamic). Its real
implementation runs at execution time, reads the plan from the context, checks
agreement (see :mod:`flashcp_client.agreement`) and runs the same forward as
:func:`flashcp_client.cp_attention`. What the backward needs (received KV,
log-sum-exps) stays in a table owned by the context, named by a small token
tensor the op returns; a context drops what no backward claimed when it exits.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from flashcp_client.agreement import ensure_agreement
from flashcp_client.cp_attention import Saved, attention_backward, attention_forward, checked_layout
from flashcp_client.kv_exchange import CommStats
from flashcp_planner import Plan

__all__ = ["CPContext", "NoContextError", "context_attention", "cp_context", "current_context"]


class NoContextError(RuntimeError):
    """FlashCP attention ran outside ``with cp_context(plan, group):`` (or its backward after the context ended)."""


class CPContext:
    """The plan of one micro-batch and where its layers execute; made by :func:`cp_context`."""

    def __init__(self, plan: Plan, group: Any, *, stats: CommStats | None, agreement: str | None) -> None:
        self.plan = plan
        """The micro-batch's plan."""
        self.group = group
        """The CP process group (``None``: the world)."""
        self.stats = stats
        """Bytes moved by this rank, if given."""
        self.agreement = agreement
        """Agreement mode of the layers (``None``: ``FLASHCP_AGREEMENT``, default ``"first_use"``)."""
        self.saved: dict[int, Saved] = {}


_state = threading.local()
_tokens = itertools.count(1)
_SAVED: dict[int, tuple[CPContext, Saved]] = {}


def current_context() -> CPContext:
    """The innermost active :class:`CPContext`.

    Raises:
        NoContextError: none is active.
    """
    stack = getattr(_state, "stack", None)
    if not stack:
        raise NoContextError("FlashCP attention needs the step's plan: run the model inside "
                             "`with flashcp_client.cp_context(plan, group):`")
    return stack[-1]


@contextmanager
def cp_context(
    plan: Plan, group: Any = None, *, stats: CommStats | None = None, agreement: str | None = None
) -> Iterator[CPContext]:
    """Make ``plan`` the plan of every FlashCP attention layer run inside (forward and backward).

    Args:
        plan: the micro-batch's plan (the same on every rank of ``group``; checked by default).
        group: the CP process group (default: the world).
        stats: if given, bytes moved by this rank are added to it.
        agreement: ``"first_use"`` (default), ``"always"`` or ``"off"`` (see :mod:`flashcp_client.agreement`).
    """
    ctx = CPContext(plan, group, stats=stats, agreement=agreement)
    stack = _state.__dict__.setdefault("stack", [])
    stack.append(ctx)
    try:
        yield ctx
    finally:
        stack.remove(ctx)
        for token in ctx.saved:
            _SAVED.pop(token, None)
        ctx.saved.clear()


@torch.library.custom_op("flashcp::cp_attention", mutates_args=())
def _cp_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    softmax_scale: float | None,
    backend: str,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    ctx = current_context()
    ensure_agreement(ctx.plan, ctx.group, (q, k, v), mode=ctx.agreement, layer=layer)
    layout = checked_layout(q, k, v, ctx.plan, ctx.group)
    out, saved = attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), layout, ctx.group,
                                   softmax_scale, backend, ctx.stats)
    token = 0
    if save:
        token = next(_tokens)
        ctx.saved[token] = saved
        _SAVED[token] = (ctx, saved)
    return out, torch.tensor(token, dtype=torch.int64)


@_cp_attention_op.register_fake
def _cp_attention_fake(q, k, v, layer, softmax_scale, backend, save):  # noqa: ANN001, ANN202
    return q.new_empty(q.shape), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("flashcp::cp_attention_backward", mutates_args=())
def _cp_attention_backward_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    entry = _SAVED.pop(int(token.item()), None)
    if entry is None:
        raise NoContextError("the backward of FlashCP attention ran after its cp_context ended (or twice): "
                             "call loss.backward() inside `with cp_context(...)`")
    ctx, saved = entry
    del ctx.saved[int(token.item())]
    return attention_backward(saved, dout)


@_cp_attention_backward_op.register_fake
def _cp_attention_backward_fake(dout, q, k, v, token):  # noqa: ANN001, ANN202
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v = inputs[:3]
    ctx.save_for_backward(q, k, v, output[1])


def _backward(ctx: Any, dout: torch.Tensor, _dtoken: torch.Tensor) -> tuple[Any, ...]:
    q, k, v, token = ctx.saved_tensors
    dq, dk, dv = _cp_attention_backward_op(dout, q, k, v, token)
    return dq, dk, dv, None, None, None, None


_cp_attention_op.register_autograd(_backward, setup_context=_setup_context)


def context_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layer: int = -1,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`flashcp_client.cp_attention` with the plan of the current :func:`cp_context` (a custom op).

    Args:
        q, k, v: ``[local_tokens, heads, head_dim]`` / ``[local_tokens, kv_heads, head_dim]``, dispatch order.
        layer: index of the calling layer (named in agreement errors).
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        backend: kernel backend (``"auto"``, ``"triton"``, ``"torch"``).

    Raises:
        NoContextError: no :func:`cp_context` is active when the op runs.
        PlanMismatchError: as :func:`flashcp_client.cp_attention`.
    """
    save = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    out, _token = torch.ops.flashcp.cp_attention(q, k, v, layer, softmax_scale, backend, save)
    return out
