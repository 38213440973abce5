"""Fixtures of the browser tests: a real ``flashcp serve`` on loopback, headless Chromium driven by Selenium.

The tests skip when Debian's ``chromium`` / ``chromium-driver`` (``scripts/install_browser.sh``, which
``.ci/run`` runs) or the selenium package is missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ui_testing import FLASHCP

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
WIDE = (1280, 800)
PHONE = (390, 844)


@dataclass(frozen=True, slots=True, kw_only=True)
class Server:
    """A ``flashcp serve`` subprocess on loopback."""

    process: subprocess.Popen
    url: str
    log_path: Path

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        """POST JSON; returns (status, decoded body), errors included."""
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return json.load(response)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``flashcp serve`` with OS-chosen ports and the recent-plans buffer on (the Live view)."""
    log_path = tmp_path_factory.mktemp("ui-server") / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*FLASHCP, "serve", "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", "--recent-plans", "64"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "FLASHCP_LOG_LEVEL": "info"},
        )
    url = None
    deadline = time.monotonic() + 60
    while url is None and time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flashcp serve exited with {process.returncode}: {log_path.read_text()}")
        for line in log_path.read_text().splitlines():
            if '"listening"' in line:
                url = f"http://127.0.0.1:{json.loads(line)['http_port']}"
                break
        time.sleep(0.05)
    if url is None:
        process.kill()
        raise RuntimeError(f"flashcp serve did not start: {log_path.read_text()}")
    yield Server(process=process, url=url, log_path=log_path)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, log_path.read_text()[-2000:]


@pytest.fixture(scope="session")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="session")
def driver(downloads: Path) -> Iterator[Any]:
    """Headless Chromium (Debian's) at 1280x800 with a fresh profile; downloads go to ``downloads``."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs /usr/bin/chromium and /usr/bin/chromedriver (scripts/install_browser.sh)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="flashcp-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={WIDE[0]},{WIDE[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    yield browser
    browser.quit()
