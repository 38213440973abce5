"""Shared launcher helpers of the Triton kernels (imported only when Triton runs).

Kernels are written as plain functions and compiled with :func:`jit_kernel`
on first use, keyed by whether ``TRITON_INTERPRET`` is set *at call time*:
``triton.jit`` decides between the compiler and the CPU interpreter when it
wraps a function, so wrapping at import would freeze that choice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import triton

from flashcp_kernels.env import triton_interpret

__all__ = [
    "BlockConfig", "jit_kernel", "kernel_dtype", "block_d", "dot_precision", "device_context", "launch_with_fallback",
]

_JIT_CACHE: dict[tuple[str, bool], object] = {}


@dataclass(frozen=True, kw_only=True)
class BlockConfig:
    """Tile sizes and launch options of one kernel."""

    block_m: int
    """Queries per tile."""
    block_n: int
    """Keys per tile."""
    num_warps: int = 4
    """Warps per program (ignored by the interpreter)."""
    num_stages: int = 2
    """Software-pipelining stages (ignored by the interpreter)."""


INTERPRETER_CONFIG = BlockConfig(block_m=16, block_n=16)


def jit_kernel(fn: Callable) -> object:
    """``triton.jit(fn)``, built once per (function, interpreter mode)."""
    key = (f"{fn.__module__}.{fn.__qualname__}", triton_interpret())
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = triton.jit(fn)
    return _JIT_CACHE[key]


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels see: bf16 becomes fp32 under the interpreter.

    2026-11: triton 3.7.1's interpreter stores bf16 as uint16 and its ``tl.dot``
    multiplies the raw integers, so bf16 results are wrong there.
    """
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"Triton segment attention supports float16, bfloat16, float32, got {dtype}")
    if dtype == torch.bfloat16 and triton_interpret():
        return torch.float32
    return dtype


def dot_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot`` input precision: full fp32 ("ieee", not TF32) for float32 inputs, the default otherwise."""
    return "ieee" if dtype == torch.float32 else None


def block_d(head_dim: int) -> int:
    """Power-of-two tile width covering ``head_dim`` (at least 16, the smallest ``tl.dot`` size)."""
    if head_dim > 256:
        raise ValueError(f"head_dim must be <= 256 for the Triton kernels, got {head_dim}")
    return max(16, triton.next_power_of_2(head_dim))


@contextlib.contextmanager
def device_context(tensor: torch.Tensor) -> Iterator[None]:
    """Launch on the tensor's CUDA device (no-op on CPU / interpreter)."""
    if tensor.is_cuda:
        with torch.cuda.device(tensor.device):
            yield
    else:
        yield


_WORKING_CONFIG: dict[tuple, BlockConfig] = {}


def launch_with_fallback(key: tuple, configs: list[BlockConfig], launch: Callable[[BlockConfig], None]) -> BlockConfig:
    """Run ``launch(config)`` with the first config whose kernel fits the GPU (shared memory, registers).

    The config that worked is remembered under ``key`` (kernel, head dim, dtype, ...).

    Returns:
        The config that ran. Raises the last ``OutOfResources`` if none fits.
    """
    if triton_interpret():
        configs = [INTERPRETER_CONFIG]
    elif key in _WORKING_CONFIG:
        configs = [_WORKING_CONFIG[key]]
    error: Exception | None = None
    for config in configs:
        try:
            launch(config)
        except triton.runtime.errors.OutOfResources as exc:  # compile-time failure: nothing was launched
            error = exc
            continue
        _WORKING_CONFIG[key] = config
        return config
    assert error is not None
    raise error
