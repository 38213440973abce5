"""Kernel tests run Triton on CPU through its interpreter (TRITON_INTERPRET=1).

The variable is set per test (not for the whole pytest process, where it would
also switch other directories' ``backend="auto"`` calls to the slow
interpreter). This works whatever was imported before: flashcp_kernels wraps
its kernels with ``triton.jit`` at first use, keyed by the interpreter flag read
at call time. GPU-marked tests run with the variable removed.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _triton_interpreter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if "gpu" in request.keywords:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
