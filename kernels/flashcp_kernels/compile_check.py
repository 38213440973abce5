"""Compile the Triton kernels for a CUDA architecture without a GPU (catches GPU-only compile errors).

The CPU interpreter runs kernel bodies as Python and accepts code that the
compiler rejects (e.g. reading a non-constexpr global). This compiles every
tile config of every kernel to a cubin with the ptxas bundled in triton and
reports shared memory per program::

    python -m flashcp_kernels.compile_check [--arch 90] [--dtypes bf16,fp16,fp32] [--head-dims 64,128]

:func:`compile_kernels` always compiles in a fresh Python process. A process that
has run Triton's interpreter cannot compile for real: ``triton.jit`` reads
``TRITON_INTERPRET`` when it decorates, so triton's own library functions
(``tl.zeros`` ...) stay interpreted functions once triton was imported under the
interpreter, and ``InterpretedFunction.__call__`` (triton 3.7) leaves
``triton.language`` patched after a kernel calls another jitted function. The
code generator then fails on interpreter objects -- unless a cached binary lets
it skip code generation, which hid the failure on warm machines. A child
process makes the result independent of what ran before and of the cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["CompileResult", "compile_kernels"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_INT_TABLES = {"QStart", "QLen", "QPos", "KStart", "Blocks", "GroupPtr", "GroupSegments", "GroupEnd"}
_FLOAT32_BUFFERS = {"Lse", "Delta"}
_FLOAT_SCALARS = {"qk_scale_log2", "softmax_scale"}


@dataclass(frozen=True, kw_only=True)
class CompileResult:
    """Outcome of compiling one kernel for one (dtype, head_dim, tile config)."""

    kernel: str
    """Kernel function name."""
    dtype: str
    """Input dtype: bf16, fp16 or fp32."""
    head_dim: int
    """Head dimension (BLOCK_D is its next power of two)."""
    block_m: int
    """Queries per tile."""
    block_n: int
    """Keys per tile."""
    shared_bytes: int | None
    """Shared memory per program; None when compilation failed."""
    error: str | None
    """The compiler's error, or None."""


def _signature(fn, dtype: torch.dtype, constexprs: dict) -> dict[str, str]:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _INT_TABLES:
            signature[name] = "*i32"
        elif name in _FLOAT32_BUFFERS:
            signature[name] = "*fp32"
        elif name[0].isupper():
            signature[name] = "*" + _TRITON_DTYPES[dtype]
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def compile_kernels(*, arch: int = 90, dtypes=("bf16",), head_dims=(128,), first_config_only: bool = False,
                    timeout_s: float = 600.0) -> list[CompileResult]:
    """Compile each (kernel, dtype, head_dim, config) for ``sm_<arch>``; one result per compilation.

    Runs in a child process with ``TRITON_INTERPRET`` cleared (see the module docstring), so the result does
    not depend on interpreter runs earlier in this process. Raises ``RuntimeError`` when the child fails.
    """
    argv = [sys.executable, "-m", "flashcp_kernels.compile_check", "--json", f"--arch={arch}",
            f"--dtypes={','.join(dtypes)}", f"--head-dims={','.join(str(d) for d in head_dims)}"]
    if first_config_only:
        argv.append("--first-config-only")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    results = [CompileResult(**json.loads(line)) for line in child.stdout.splitlines() if line.startswith("{")]
    if child.returncode != 0 and not any(r.error for r in results):  # it failed before reporting a compilation
        raise RuntimeError(f"compile check exited with {child.returncode}: {child.stderr.strip()[-2000:]}")
    return results


def _compile_all(arch, dtypes, head_dims, first_config_only) -> Iterator[CompileResult]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction  # never the interpreter, whatever TRITON_INTERPRET says

    from flashcp_kernels import triton_bwd, triton_fwd
    from flashcp_kernels.triton_common import block_d, dot_precision

    target = GPUTarget("cuda", arch, 32)
    for dtype_name in dtypes:
        dtype = _DTYPES[dtype_name]
        for head_dim in head_dims:
            kernels = [
                (JITFunction(triton_fwd._fwd_kernel), triton_fwd.forward_configs(head_dim, dtype)),
                (JITFunction(triton_bwd._bwd_dkdv_kernel), triton_bwd.backward_configs("dkdv", head_dim, dtype)),
                (JITFunction(triton_bwd._bwd_dq_kernel), triton_bwd.backward_configs("dq", head_dim, dtype)),
            ]
            for fn, configs in kernels:
                for config in configs[:1] if first_config_only else configs:
                    constexprs = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                                  "BLOCK_D": block_d(head_dim), "DOT_PRECISION": dot_precision(dtype)}
                    source = ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs),
                                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
                    shared, error = None, None
                    try:
                        compiled = triton.compile(source, target=target, options={
                            "num_warps": config.num_warps, "num_stages": config.num_stages})
                        shared = compiled.metadata.shared
                    except Exception as exc:  # report every failure, keep compiling the rest
                        error = f"{type(exc).__name__}: {exc}"
                    yield CompileResult(kernel=fn.__name__, dtype=dtype_name, head_dim=head_dim,
                                        block_m=config.block_m, block_n=config.block_n,
                                        shared_bytes=shared, error=error)


def _head_dims(text: str) -> list[int]:
    try:
        dims = [int(d) for d in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"head dims must be positive, got {text!r}")
    return dims


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default: 90 = H100/H200)")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--head-dims", default="64,128", type=_head_dims, help="comma-separated, e.g. 64,128")
    parser.add_argument("--first-config-only", action="store_true", help="one tile config per kernel")
    parser.add_argument("--json", action="store_true", help="one JSON object per compilation")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.dtypes.split(",")) - set(_DTYPES))
    if unknown:
        parser.error(f"unknown dtype(s) {', '.join(unknown)}; choose from {', '.join(_DTYPES)}")
    os.environ.pop("TRITON_INTERPRET", None)  # triton's code generator consults it
    failures = 0
    for r in _compile_all(args.arch, args.dtypes.split(","), args.head_dims, args.first_config_only):
        if args.json:
            print(json.dumps(dataclasses.asdict(r)), flush=True)
        else:
            status = f"shared {r.shared_bytes} B" if r.error is None else f"FAILED {r.error}"
            print(f"{r.kernel:<18} {r.dtype:<5} D={r.head_dim:<4} BLOCK_M={r.block_m:<4} BLOCK_N={r.block_n:<4} "
                  f"{status}", flush=True)
        failures += r.error is not None
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
