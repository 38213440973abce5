"""``python -m flashcp_service``: the same server as ``flashcp serve``."""

import sys

from flashcp_service.cli import main

if __name__ == "__main__":
    sys.exit(main())
