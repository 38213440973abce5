"""Environment variables read by this package (one function per variable, read at call time)."""

from __future__ import annotations

import os

__all__ = ["triton_interpret"]


def triton_interpret() -> bool:
    """``TRITON_INTERPRET=1``: run Triton kernels with the CPU interpreter (slow; tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
