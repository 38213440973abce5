"""The explorer's server side without a browser: static files, /v1/workloads, /v1/recent and `flashcp explore`."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from importlib import resources
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from ui_testing import FLASHCP

import flashcp_planner
from flashcp_planner.presets import get_preset
from flashcp_planner.request import PlanRequest
from flashcp_planner.workloads import WORKLOADS, generate
from flashcp_service import PlannerService, recent
from flashcp_service.http_app import create_app
from flashcp_service.recent import RecentPlans
from flashcp_service.settings import Settings

UI_FILES = ("index.html", "app.js", "app.css")


def _plan(lengths: list[int], strategy: str = "flashcp"):
    request = PlanRequest(micro_batches=[lengths], cp_size=4, cost_model=get_preset("h100-llama8b"), strategy=strategy)
    return flashcp_planner.plan(request)[0]


def _client(**settings) -> TestClient:
    service = PlannerService(Settings(host="127.0.0.1", http_port=0, grpc_port=0, log_level="warning", **settings))
    return TestClient(create_app(service))


def test_recent_plans_is_off_by_default_bounded_and_sampled(monkeypatch: pytest.MonkeyPatch) -> None:
    plans = [_plan([1000 * (i + 1), 500, 7000]) for i in range(5)]
    off = RecentPlans(capacity=0)
    for p in plans:
        off.record(p)
    assert not off.enabled and off.after() == []

    kept = RecentPlans(capacity=2)
    for p in plans:
        kept.record(p)
    assert [s.seq for s in kept.after()] == [4, 5]
    assert [s.seq for s in kept.after(4)] == [5]
    last = kept.after()[-1]
    assert (last.makespan_ms, last.lower_bound_ms, last.num_documents, last.tokens) == (
        plans[4].makespan_ms, plans[4].lower_bound_ms, 3, 12500)
    assert last.to_dict(with_lengths=True)["lengths"] == [5000, 500, 7000]
    assert "lengths" not in last.to_dict(with_lengths=False)

    sampled = RecentPlans(capacity=10, sample_every=2)
    for p in plans:
        sampled.record(p)
    assert [s.seq for s in sampled.after()] == [2, 4]

    assert kept.max_lengths == recent.MAX_KEPT_LENGTHS
    assert RecentPlans(capacity=recent.LENGTHS_BUDGET // 2).max_lengths == 2  # the budget is shared
    monkeypatch.setattr(recent, "MAX_KEPT_LENGTHS", 2)  # plans of more documents keep no lengths
    short = RecentPlans(capacity=2)
    short.record(plans[0])
    assert short.after()[-1].lengths is None and short.after()[-1].num_documents == 3

    with pytest.raises(ValueError, match="capacity"):
        RecentPlans(capacity=-1)
    with pytest.raises(ValueError, match="sample_every"):
        RecentPlans(capacity=1, sample_every=0)


def test_ui_is_served_from_the_package_with_no_outside_url() -> None:
    with _client() as client:
        redirect = client.get("/ui", follow_redirects=False)
        assert redirect.status_code == 307 and redirect.headers["location"] == "/ui/"
        page = client.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for name in UI_FILES:
            served = client.get(f"/ui/{name}")
            assert served.status_code == 200
            assert served.text == resources.files("flashcp_service").joinpath("ui", name).read_text()
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", served.text), f"{name} loads from outside"
        assert client.get("/ui/missing.js").status_code == 404
        # Static files stay out of the API schema.
        assert not any(path.startswith("/ui") for path in client.get("/openapi.json").json()["paths"])


def test_workloads_route_serves_the_cli_generators() -> None:
    with _client() as client:
        listed = client.get("/v1/workloads").json()["workloads"]
        assert [w["name"] for w in listed] == list(WORKLOADS)
        got = client.get("/v1/workloads/prolong", params={"context": 65536, "seed": 3}).json()
        assert got["lengths"] == generate("prolong", context=65536, seed=3)[0]
        unknown = client.get("/v1/workloads/nope", params={"context": 1000})
        assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "workload"
        assert "nope" in unknown.json()["error"]["message"]
        assert client.get("/v1/workloads/web", params={"context": 0}).status_code == 422


def test_recent_route_lists_the_plans_returned_over_http() -> None:
    with _client() as client:
        assert client.get("/v1/recent").json() == {"enabled": False, "capacity": 0, "sample_every": 1, "plans": []}
    with _client(recent_plans=3) as client:
        body = {"micro_batches": [[4000, 300, 9000], [100, 200]], "cp_size": 2}
        plans = client.post("/v1/plan", json=body).json()["plans"]
        compared = client.post("/v1/compare", json={**body, "strategies": ["zigzag"]}).json()["comparisons"]
        returned = [*plans, *(row["results"][0]["plan"] for row in compared)]
        got = client.get("/v1/recent").json()
        assert got["enabled"] and got["capacity"] == 3
        assert [p["seq"] for p in got["plans"]] == [2, 3, 4]
        for summary, plan in zip(got["plans"], returned[1:], strict=True):
            assert (summary["strategy"], summary["makespan_ms"], summary["lower_bound_ms"], summary["cp_size"]) == (
                plan["strategy"], plan["makespan_ms"], plan["lower_bound_ms"], 2)
            assert summary["lengths"] is None
        with_lengths = client.get("/v1/recent", params={"after": 3, "lengths": True}).json()["plans"]
        assert [(p["seq"], p["lengths"]) for p in with_lengths] == [(4, [100, 200])]
        assert client.get("/v1/recent", params={"after": -1}).status_code == 422


def test_flashcp_explore_serves_the_page_on_loopback(tmp_path: Path) -> None:
    err_path = tmp_path / "explore.err"
    with err_path.open("wb") as err:
        process = subprocess.Popen([*FLASHCP, "explore", "--no-browser"], stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        match = None
        while match is None and time.monotonic() < deadline and process.poll() is None:
            match = re.search(r"(http://127\.0\.0\.1:\d+)/ui/", err_path.read_text())
            time.sleep(0.05)
        assert match, err_path.read_text()
        with urllib.request.urlopen(match.group(0), timeout=30) as page:
            assert b"FlashCP plan explorer" in page.read()
        with urllib.request.urlopen(match.group(1) + "/v1/recent", timeout=30) as got:
            assert json.load(got)["enabled"] is True
    finally:
        process.send_signal(signal.SIGINT)
        rc = process.wait(timeout=60)
    assert rc == 0, err_path.read_text()


def test_explore_rejects_bad_flags_in_one_line() -> None:
    done = subprocess.run([*FLASHCP, "explore", "--no-browser", "--port", "70000"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "invalid setting" in done.stderr and "http_port" in done.stderr and "Traceback" not in done.stderr


def test_explore_needs_the_server_extra_and_the_core_stays_web_free(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from flashcp_planner.cli import main

    monkeypatch.setitem(sys.modules, "flashcp_service.cli", None)  # as if the server extra were missing
    assert main(["explore"]) == 2
    assert "pip install 'flashcp[server]'" in capsys.readouterr().err
    # The command line imports no web framework until `serve` / `explore` runs.
    probe = "import sys, flashcp_planner.cli as c; c.build_parser(['plan']); print(sorted({'fastapi', 'uvicorn', " \
            "'starlette', 'flashcp_service'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr
