"""Hugging Face ``transformers`` drop-in: FlashCP as an attention implementation (``pip install 'flashcp[hf]'``).

::

    from flashcp_client.hf import register_hf_attention

    register_hf_attention()                                    # once, registers "cp_plan"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="cp_plan")
    with cp_context(batch["plan"], cp_group):
        out = model(input_ids=batch["input_ids"][None], position_ids=batch["position_ids"][None])
        loss = cp_loss(out.logits[0], batch["labels"], cp_group)
        loss.backward()
    all_reduce_gradients(model, cp_group)

The model sees a batch of one: this rank's tokens of the packed micro-batch, in
its dispatch order, with their document positions. Attention is the plan's
(causal within each document), so the attention mask transformers would build
is skipped. Like ring-flash-attn's ``substitute_hf_flash_attn``, but through
transformers' own ``AttentionInterface``: models whose attention layers call
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` (Llama, Qwen, Mistral,
...) need no patching.
"""

from __future__ import annotations

from typing import Any

import torch

from flashcp_client.training import cp_sdpa

__all__ = ["flashcp_attention_forward", "register_hf_attention"]


def flashcp_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: ``[1, H, T, D]`` inputs -> ``([1, T, H, D], None)``.

    Raises:
        ValueError: dropout, or a batch of more than one sequence.
    """
    if dropout:
        raise ValueError("flashcp attention: attention dropout is not supported (set attention_dropout=0)")
    layer = getattr(module, "layer_idx", None)
    out = cp_sdpa(query, key, value, scale=scaling, layer=-1 if layer is None else int(layer))
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The plan masks attention: transformers need not build a mask."""
    return None


def register_hf_attention(name: str = "cp_plan") -> str:
    """Register FlashCP as transformers attention implementation ``name`` (and a no-op mask for it).

    The default name avoids "flash": transformers treats any implementation
    whose name contains it as a FlashAttention kernel to load.

    Returns:
        ``name``, for ``attn_implementation=``.

    Raises:
        ImportError: transformers is not installed.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        raise ImportError("the Hugging Face drop-in needs transformers: pip install 'flashcp[hf]'") from None
    AttentionInterface.register(name, flashcp_attention_forward)
    AttentionMaskInterface.register(name, _no_mask)
    return name
