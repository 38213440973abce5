"""Variable-length causal attention over plan segments (Triton kernels with a plain-torch path).

Main API: :class:`SegmentMeta` describes which query rows attend to which key
rows; :func:`segment_attention` is differentiable; :func:`segment_attention_forward`
/ :func:`segment_attention_backward` are the raw passes (used by the CP executor);
:func:`segment_attention_ref` is the plain-torch reference. Triton is imported
only when a Triton backend is first used, and kernels are wrapped with
``triton.jit`` per interpreter mode at call time, so ``TRITON_INTERPRET`` may be
set any time. Tools: ``flashcp_kernels.profile`` (``flashcp profile``) and
``python -m flashcp_kernels.compile_check`` (compile for sm_90 without a GPU).
"""

from __future__ import annotations

from flashcp_kernels.autograd import (
    resolve_backend,
    segment_attention,
    segment_attention_backward,
    segment_attention_forward,
)
from flashcp_kernels.meta import SegmentMeta
from flashcp_kernels.reference import segment_attention_backward_ref, segment_attention_ref

__all__ = [
    "SegmentMeta",
    "resolve_backend",
    "segment_attention",
    "segment_attention_backward",
    "segment_attention_backward_ref",
    "segment_attention_forward",
    "segment_attention_ref",
]
