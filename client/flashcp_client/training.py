"""Model-level API: an attention module, an SDPA-shaped function, CP loss normalisation and gradient reduction.

The ranks of a CP group hold replicas of the model and each computes a part of
every sequence. Training with FlashCP therefore needs, per micro-batch:

1. the plan as the context of the forward and backward (:func:`cp_context`);
2. a loss that every rank computes on its own tokens, divided by the number of
   valid tokens of the *whole* micro-batch (:func:`cp_loss`): the sum of the
   ranks' losses is then the unsharded mean loss;
3. after backward, gradients summed over the CP group (:func:`all_reduce_gradients`):
   each rank's gradient holds only its share of the sum.

Computing a loss on ``undispatch(out)`` on every rank instead counts every token
on every rank: N times the gradient.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flashcp_client.agreement import _collective_device
from flashcp_client.context import context_attention

__all__ = ["FlashCPAttention", "all_reduce_gradients", "cp_loss", "cp_sdpa", "global_mean"]


class FlashCPAttention(nn.Module):
    """Causal, document-masked attention of this rank's tokens under the plan of the current :func:`cp_context`.

    ``forward(q, k, v)`` with ``q`` ``[local_tokens, heads, head_dim]`` and ``k``, ``v``
    ``[local_tokens, kv_heads, head_dim]`` in the rank's dispatch order (as
    :func:`flashcp_client.rank_batch` yields tokens). No parameters.

    Args:
        layer: the layer's index, named in agreement errors (a rank that skipped a layer).
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        backend: kernel backend (``"auto"``, ``"triton"``, ``"torch"``).
    """

    def __init__(self, layer: int = -1, *, softmax_scale: float | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.layer = layer
        self.softmax_scale = softmax_scale
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return context_attention(q, k, v, layer=self.layer, softmax_scale=self.softmax_scale, backend=self.backend)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, backend={self.backend!r}"


def cp_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    layer: int = -1,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=True)``-shaped FlashCP attention (documents masked).

    Args:
        query: ``[1, heads, local_tokens, head_dim]`` (batch of one packed micro-batch).
        key, value: ``[1, kv_heads, local_tokens, head_dim]`` (GQA: kv heads divide heads).

    Returns:
        ``[1, heads, local_tokens, head_dim]``.

    Raises:
        ValueError: a batch dimension other than 1.
    """
    if query.dim() != 4 or query.shape[0] != 1:
        raise ValueError(f"cp_sdpa: expected [1, heads, tokens, head_dim] (one packed micro-batch), got "
                         f"{tuple(query.shape)}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = context_attention(q, k, v, layer=layer, softmax_scale=scale, backend=backend)
    return out.transpose(0, 1).unsqueeze(0)


def cp_loss(
    logits: torch.Tensor, labels: torch.Tensor, group: Any = None, *, ignore_index: int = -100
) -> torch.Tensor:
    """This rank's share of the micro-batch's mean cross-entropy (collective over ``group``).

    ``sum(cross_entropy over local valid tokens) / valid tokens of every rank``:
    summed over the ranks it is the unsharded mean loss. Call ``backward()`` on
    it on every rank, then :func:`all_reduce_gradients`. One ``all_reduce`` of
    one integer.

    Args:
        logits: ``[local_tokens, vocab]``.
        labels: ``[local_tokens]`` (``ignore_index`` where no label).
    """
    local = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum().to(device=_collective_device(group), dtype=torch.int64)
    dist.all_reduce(count, group=group)
    return local / count.to(local.device).clamp(min=1)


def global_mean(loss: torch.Tensor, group: Any = None) -> float:
    """The micro-batch's loss for logging: the sum of the ranks' :func:`cp_loss` values (collective)."""
    total = loss.detach().float().reshape(1).to(_collective_device(group))
    dist.all_reduce(total, group=group)
    return float(total.item())


def all_reduce_gradients(parameters: nn.Module | Iterable[torch.nn.Parameter], group: Any = None) -> None:
    """Sum the gradients of ``parameters`` over ``group`` in place, in one ``all_reduce`` per dtype.

    A parameter without a gradient on this rank contributes zeros (and gets the
    sum), so every rank enters collectives of the same size.
    """
    params = [p for p in (parameters.parameters() if isinstance(parameters, nn.Module) else parameters)
              if p.requires_grad]
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group_params in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group_params])
        dist.all_reduce(flat, group=group)
        offset = 0
        for p in group_params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
