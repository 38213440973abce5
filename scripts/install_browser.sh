#!/usr/bin/env bash
# Headless Chromium + chromedriver for the browser tests (tests/ui/), from Debian apt.
# Idempotent: does nothing when both are installed. Without root (or apt-get) it says so
# and exits 0: the browser tests then skip.
set -euo pipefail
if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
    exit 0
fi
if ! command -v apt-get >/dev/null || [[ "$(id -u)" != 0 ]]; then
    echo "install_browser.sh: no root apt-get here; the browser tests will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
