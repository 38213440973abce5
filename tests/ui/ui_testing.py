"""Helpers of the explorer tests."""

from __future__ import annotations

import sys

FLASHCP = (sys.executable, "-c", "import sys; from flashcp_planner.cli import main; sys.exit(main())")
"""The ``flashcp`` command of this interpreter's installation."""
