"""Draw time of the plan explorer (``/ui/``) in headless Chromium, for plans of 16,384 documents.

Starts ``flashcp serve`` on loopback and Debian's Chromium (``scripts/install_browser.sh``), plans one
micro-batch of 16,384 documents (lengths uniform in [1, 2047], seed 0) per case through the page, and
reports, from the page's own ``performance.now()``: the request (plan + transfer + JSON parse), the
draw (three charts per strategy, synchronous), the time until the next frame is painted, and one
document highlight over every chart. Median of ``--repeats`` runs.

    python benchmarks/bench_explorer.py               # writes benchmarks/results/explorer.md
    python benchmarks/bench_explorer.py --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "explorer.md"
CASES = (  # (strategies, N)
    (["flashcp"], 8),
    (["zigzag"], 8),
    (["whole_doc"], 8),
    (["per_doc"], 8),
    (["flashcp", "zigzag", "contiguous", "whole_doc"], 8),
    (["flashcp"], 64),
)
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
         "--window-size=1280,800")


def _server() -> tuple[subprocess.Popen, str]:
    log = tempfile.NamedTemporaryFile(prefix="flashcp-serve-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from flashcp_planner.cli import main; sys.exit(main())", "serve",
         "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "FLASHCP_LOG_LEVEL": "info"},
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in Path(log.name).read_text().splitlines():
            if '"listening"' in line:
                return process, f"http://127.0.0.1:{json.loads(line)['http_port']}"
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"flashcp serve did not start: {Path(log.name).read_text()}")


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='flashcp-chromium-')}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def _run(driver, url: str, lengths: str, strategies: list[str], cp: int) -> dict[str, float]:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/ui/")
    WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    driver.execute_script(
        """
        const [lengths, strategies, cp] = arguments;
        document.getElementById('lengths').value = lengths;
        document.getElementById('cp').value = String(cp);
        for (const box of document.querySelectorAll('#strategies input')) box.checked = strategies.includes(box.value);
        document.getElementById('plan').click();""",
        lengths, strategies, cp,
    )
    WebDriverWait(driver, 600, poll_frequency=0.05).until(
        lambda d: d.execute_script("return !!(window.flashcpTiming && window.flashcpTiming.painted_ms)")
        or d.find_element("id", "error").is_displayed()
    )
    error = driver.find_element("id", "error")
    if error.is_displayed():
        raise SystemExit(f"{strategies} N={cp}: {error.text}")
    timing = driver.execute_script("return window.flashcpTiming")
    timing["highlight_ms"] = driver.execute_script(
        "const t = performance.now(); window.flashcp.setHighlight(8191); return performance.now() - t;"
    )
    timing["segments"] = driver.execute_script(
        "return window.flashcp.state.view.planned.reduce((a, p) => a + p.seg.doc.length, 0)"
    )
    return timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lengths = " ".join(map(str, np.random.default_rng(0).integers(1, 2048, 16384).tolist()))
    server, url = _server()
    driver = _browser()
    rows = []
    try:
        for strategies, cp in CASES:
            runs = [_run(driver, url, lengths, strategies, cp) for _ in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in runs)
                   for k in ("request_ms", "render_ms", "painted_ms", "highlight_ms")}
            row = (f"| {', '.join(strategies)} | {cp} | {runs[0]['segments']:,} | {med['request_ms']:.0f} | "
                   f"{med['render_ms']:.0f} | {med['painted_ms']:.0f} | {med['highlight_ms']:.1f} |")
            print(row, flush=True)
            rows.append(row)
    finally:
        driver.quit()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    RESULTS.write_text(
        "# Plan explorer draw time (headless Chromium, software rendering)\n\n"
        f"`python benchmarks/bench_explorer.py --repeats {args.repeats}`: 16,384 documents (lengths uniform in "
        "[1, 2047], seed 0), h100-llama8b, window 1280x800; milliseconds measured by the page with "
        "`performance.now()`, median of the repeats. request: POST /v1/compare until its JSON is parsed (planning "
        "included); draw: the three charts of every strategy and the tables; painted: draw until the next frame; "
        "highlight: one document on every chart.\n\n"
        "| strategies | N | segments drawn | request ms | draw ms | painted ms | highlight ms |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
