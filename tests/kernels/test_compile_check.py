"""The sm_90 compile check: kernels compile for H100/H200 without a GPU, whatever ran before and whatever is cached.

Each test points ``TRITON_CACHE_DIR`` at its own empty folder: a cached binary lets triton skip code
generation and would hide a compile failure (as a warm ``~/.triton/cache`` once did).
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import make_qkv, run_all_ranks

from flashcp_kernels import segment_attention
from flashcp_kernels.compile_check import compile_kernels, main

H100_SHARED_BYTES = 227 * 1024  # shared memory per block on H100/H200


@pytest.fixture(autouse=True)
def _empty_triton_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))


def _assert_all_compiled(results):
    assert [r.kernel for r in results] == ["_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"]
    for r in results:
        assert r.error is None, f"{r.kernel}: {r.error}"
        assert 0 < r.shared_bytes <= H100_SHARED_BYTES


def test_kernels_compile_for_h100():
    _assert_all_compiled(compile_kernels(arch=90, dtypes=("bf16",), head_dims=(128,), first_config_only=True))


def test_compile_check_does_not_depend_on_earlier_interpreter_runs():
    # Run the kernels (forward and backward) in the interpreter in this process first; an in-process
    # compile after this fails on an empty cache (see flashcp_kernels.compile_check).
    q, k, v = make_qkv(9, 2, 1, 16, seed=0)
    out = run_all_ranks(q, k, v, [4, 5], 2, lambda *a: segment_attention(*a, backend="triton"), whole_below=3)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    _assert_all_compiled(compile_kernels(arch=90, dtypes=("bf16",), head_dims=(128,), first_config_only=True))


def test_compile_check_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--head-dims", "64,abc"])
    assert exit_info.value.code == 2
    assert "expected comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--dtypes", "bf16,int4"])
    assert "unknown dtype(s) int4" in capsys.readouterr().err
