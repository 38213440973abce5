"""The plan explorer in headless Chromium against a real ``flashcp serve``: what the page shows is what the API says."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flashcp_planner.comm import transfers_and_traffic
from flashcp_planner.model import Plan
from flashcp_planner.presets import cost_model_from_dict

pytestmark = pytest.mark.browser

LENGTHS = [32768, 16384, 8192, 40000, 3000, 700, 2048, 5000]
COST_JSON = {"base": "h100-llama8b", "gpus_per_node": 2}
"""Four ranks on two nodes: some KV crosses nodes."""
CP = 4
MIB = 1024 * 1024


def _by(name: str):
    from selenium.webdriver.common.by import By

    return getattr(By, name)


def _wait(driver, condition, timeout: float = 60) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def _open(driver, server) -> None:
    driver.get(server.url + "/ui")
    _wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    # Keep every /v1/compare response the page receives, to compare the page with them.
    driver.execute_script(
        """
        window.seen = [];
        const fetch0 = window.fetch;
        window.fetch = async (...args) => {
          const response = await fetch0(...args);
          if (String(args[0]).includes('/v1/compare')) window.seen.push(await response.clone().json());
          return response;
        };"""
    )


def _fill(driver, element_id: str, text: str, *, typed: bool = True) -> None:
    element = driver.find_element(_by("ID"), element_id)
    if typed:
        element.clear()
        element.send_keys(text)
    else:  # 16k lengths typed key by key would take minutes
        driver.execute_script(
            "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))", element, text
        )


def _plan(driver, *, lengths: str, cp: str, strategies: list[str], cost: dict | None = COST_JSON,
          typed: bool = True, timeout: float = 120) -> None:
    """Fill the form, press Plan (with the keyboard) and wait for the answer or the error."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    _fill(driver, "lengths", lengths, typed=typed)
    _fill(driver, "cp", cp)
    select = Select(driver.find_element(_by("ID"), "cost-model"))
    if cost is None:
        select.select_by_value("h100-llama8b")
    else:
        select.select_by_value("custom")
        _fill(driver, "cost-json", json.dumps(cost))
    for box in driver.find_elements(_by("CSS_SELECTOR"), "#strategies input"):
        if box.is_selected() != (box.get_attribute("value") in strategies):
            box.send_keys(Keys.SPACE)
    driver.find_element(_by("ID"), "plan").send_keys(Keys.ENTER)
    _wait(driver, lambda d: d.find_element(_by("ID"), "status").text != "Planning…", timeout)


def _body(lengths: list, cp: Any, strategies: list[str], cost: Any = COST_JSON) -> dict:
    """The request the page sends for these form values."""
    return {"micro_batches": [lengths], "cp_size": cp, "cost_model": cost, "strategies": strategies,
            "options": {"time_limit_s": 5}}


def _summary(driver) -> dict[str, dict[str, str]]:
    rows = {}
    for row in driver.find_elements(_by("CSS_SELECTOR"), "#summary tbody tr"):
        cells = row.find_elements(_by("CSS_SELECTOR"), "td[data-field]")
        rows[row.get_attribute("data-strategy")] = {c.get_attribute("data-field"): c.text for c in cells}
    return rows


def _results(response: dict) -> dict[str, dict]:
    return {r["strategy"]: r["plan"] for r in response["comparisons"][0]["results"] if r["plan"]}


def test_plan_shows_the_numbers_the_api_returns(driver, server) -> None:
    _open(driver, server)
    strategies = ["flashcp", "per_doc", "zigzag", "optimum"]
    _plan(driver, lengths=" ".join(map(str, LENGTHS)), cp=str(CP), strategies=strategies)
    assert not driver.find_element(_by("ID"), "error").is_displayed()
    seen = driver.execute_script("return window.seen")
    assert len(seen) == 1
    plans = _results(seen[0])
    assert set(plans) == set(strategies)
    # The heuristics are deterministic: the page sent the request its form describes.
    status, direct = server.post("/v1/compare", _body(LENGTHS, CP, ["flashcp", "per_doc", "zigzag"]))
    assert status == 200
    for name, plan in _results(direct).items():
        assert plan["makespan_ms"] == plans[name]["makespan_ms"]

    optimum = plans["optimum"]["makespan_ms"]
    model = cost_model_from_dict(COST_JSON)
    shown = _summary(driver)
    for name, plan in plans.items():
        row = shown[name]
        assert row["makespan"] == f"{plan['makespan_ms']:.3f}"
        assert row["lower_bound"] == f"{plan['lower_bound_ms']:.3f}"
        assert row["gap_lower_bound"] == f"{100 * (plan['makespan_ms'] / plan['lower_bound_ms'] - 1):.1f} %"
        assert row["gap_optimum"] == f"{100 * (plan['makespan_ms'] / optimum - 1):.1f} %"
        # Intra- vs inter-node KV: the core's own traffic derivation is the reference.
        core = Plan.from_dict(plan)
        _, recv, _ = transfers_and_traffic([rp.segments for rp in core.ranks], core.comm, model.gpus_per_node)
        intra = sum(r[0] for r in recv) * model.kv_bytes_per_token
        inter = sum(r[1] for r in recv) * model.kv_bytes_per_token
        assert intra + inter == sum(r["recv_bytes"] for r in plan["ranks"])
        assert (row["kv_intra"], row["kv_inter"]) == (f"{intra / MIB:.1f}", f"{inter / MIB:.1f}")
    assert any(float(r["kv_inter"]) > 0 for r in shown.values()), "the test should move KV across nodes"

    # Per-rank numbers (opened with the keyboard) equal the API's.
    from selenium.webdriver.common.keys import Keys

    card = driver.find_element(_by("CSS_SELECTOR"), ".card[data-strategy=zigzag]")
    card.find_element(_by("TAG_NAME"), "summary").send_keys(Keys.ENTER)
    rows = _wait(driver, lambda d: card.find_elements(_by("CSS_SELECTOR"), "tr[data-rank]"))
    for row, rank in zip(rows, plans["zigzag"]["ranks"], strict=True):
        cells = [c.text for c in row.find_elements(_by("TAG_NAME"), "td")]
        assert cells[0] == str(rank["rank"]) and cells[1] == str(rank["rank"] // COST_JSON["gpus_per_node"])
        assert cells[2] == f"{rank['tokens']:,}"
        assert cells[3:7] == [f"{rank[k]:.3f}" for k in ("linear_ms", "attention_ms", "exposed_comm_ms", "total_ms")]
        assert cells[9] == f"{rank['recv_bytes']:,}"


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _has_colour(pixels: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    return bool((np.abs(pixels.astype(int) - rgb).sum(axis=2) <= 6).any())


def test_screenshots_at_two_widths_show_the_charts(driver, server, tmp_path: Path) -> None:
    _open(driver, server)
    _plan(driver, lengths=" ".join(map(str, LENGTHS)), cp=str(CP), strategies=["flashcp", "per_doc"])
    out = Path(os.environ.get("FLASHCP_UI_SCREENSHOTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    try:
        for name, (width, height) in (("wide", (1280, 800)), ("phone", (390, 844))):
            driver.set_window_size(width, height)
            time.sleep(0.3)  # the charts redraw 150 ms after a resize
            # Readable: nothing wider than the window, so no sideways scrolling of the page.
            assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
            driver.execute_script("document.querySelector('.card').scrollIntoView()")
            png = driver.get_screenshot_as_png()
            (out / f"explorer-{name}.png").write_bytes(png)
            pixels = _pixels(png)
            assert pixels.std() > 30, f"{name} screenshot looks blank"
            for colour in ((0x00, 0x72, 0xB2), (0xE6, 0x9F, 0x00)):  # linear and attention bars
                assert _has_colour(pixels, colour), f"{name}: no {colour} bar in the screenshot"
    finally:
        driver.set_window_size(1280, 800)


BAD_INPUTS = [
    ("100 -5 300", "4", [100, -5, 300], 4),
    ("100 abc 300", "4", [100, "abc", 300], 4),
    ("100 200 300", "0", [100, 200, 300], 0),
]


def test_bad_input_shows_the_api_error_message(driver, server) -> None:
    _open(driver, server)
    for lengths, cp, sent_lengths, sent_cp in BAD_INPUTS:
        _plan(driver, lengths=lengths, cp=cp, strategies=["flashcp"], cost=None)
        status, answer = server.post("/v1/compare", _body(sent_lengths, sent_cp, ["flashcp"], "h100-llama8b"))
        assert status == 422
        error = driver.find_element(_by("ID"), "error")
        assert error.is_displayed()
        assert error.text == answer["error"]["message"]
    # An unknown preset base in the cost-model JSON: the API's message too.
    _plan(driver, lengths="100 200", cp="2", strategies=["flashcp"], cost={"base": "no-such-gpu"})
    status, answer = server.post("/v1/compare", _body([100, 200], 2, ["flashcp"], {"base": "no-such-gpu"}))
    assert status == 422 and driver.find_element(_by("ID"), "error").text == answer["error"]["message"]
    # The page still works.
    _plan(driver, lengths="100 200", cp="2", strategies=["flashcp"], cost=None)
    assert not driver.find_element(_by("ID"), "error").is_displayed()
    assert set(_summary(driver)) == {"flashcp"}
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "/v1/" not in e["message"]]
    assert not severe, severe


def _black_rows(driver, strategy: str) -> list[bool]:
    """Per rank row of a strategy's document chart: whether any highlighted (black) pixel is on it."""
    return driver.execute_script(
        """
        const card = window.flashcp.state.view.cards.find((c) => c.p.strategy === arguments[0]);
        const canvas = card.docs, dpr = window.devicePixelRatio || 1;
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        const rowH = card.docLayout.rowH * dpr, left = 46 * dpr, out = [];
        for (let r = 0; r < card.p.plan.cp_size; r++) {
          const y = Math.floor(r * rowH + rowH / 2);
          let black = false;
          for (let x = Math.ceil(left); x < canvas.width && !black; x++) {
            const i = 4 * (y * canvas.width + x);
            black = data[i] === 0 && data[i + 1] === 0 && data[i + 2] === 0 && data[i + 3] === 255;
          }
          out.push(black);
        }
        return out;""",
        strategy,
    )


def test_a_document_is_highlighted_on_every_rank_that_holds_it(driver, server) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    _open(driver, server)
    _plan(driver, lengths=" ".join(map(str, LENGTHS)), cp=str(CP), strategies=["flashcp", "per_doc"])
    plans = _results(driver.execute_script("return window.seen[0]"))
    assert _black_rows(driver, "per_doc") == [False] * CP
    # Keyboard: focus the per_doc document chart, arrow right selects document 0.
    chart = driver.find_element(_by("CSS_SELECTOR"), ".card[data-strategy=per_doc] canvas[data-role=docs]")
    chart.send_keys(Keys.ARROW_RIGHT)
    info = driver.find_element(_by("ID"), "doc-info").text
    assert info.startswith(f"Document 0: {LENGTHS[0]:,} tokens.")
    for name, plan in plans.items():
        ranks = plan["documents"][0]["ranks"]
        assert _black_rows(driver, name) == [r in ranks for r in range(CP)]
        kind = plan["documents"][0]["sharding"]
        assert (f"{name}: whole on rank {ranks[0]}" if kind == "whole" else f"{name}: split ({kind}) over") in info
    # Mouse: hover the start of rank 0's row of the per_doc chart: its first segment's document.
    first_doc = plans["per_doc"]["ranks"][0]["segments"][0][0]
    row_h = driver.execute_script(
        "return window.flashcp.state.view.cards.find((c) => c.p.strategy === 'per_doc').docLayout.rowH"
    )
    width = chart.size["width"]
    ActionChains(driver).move_to_element_with_offset(chart, -width // 2 + 48, -chart.size["height"] // 2 + row_h // 2)\
        .perform()
    tooltip = driver.find_element(_by("ID"), "tooltip")
    _wait(driver, lambda d: tooltip.is_displayed())
    assert tooltip.text.startswith(f"Document {first_doc}:")


def test_export_json_and_png(driver, server, downloads: Path) -> None:
    _open(driver, server)
    _plan(driver, lengths=" ".join(map(str, LENGTHS)), cp=str(CP), strategies=["flashcp"])
    plan = _results(driver.execute_script("return window.seen[0]"))["flashcp"]
    card = driver.find_element(_by("CSS_SELECTOR"), ".card[data-strategy=flashcp]")
    for target in downloads.glob("*"):
        target.unlink()
    for button in card.find_elements(_by("CSS_SELECTOR"), ".buttons button"):
        button.click()
    json_path, png_path = downloads / "flashcp-plan-flashcp.json", downloads / "flashcp-plan-flashcp.png"
    _wait(driver, lambda d: json_path.exists() and png_path.exists(), 30)
    _wait(driver, lambda d: json_path.stat().st_size > 0 and png_path.stat().st_size > 0, 30)
    assert json.loads(json_path.read_text()) == plan
    pixels = _pixels(png_path.read_bytes())
    assert pixels.std() > 30 and _has_colour(pixels, (0x00, 0x72, 0xB2))


def test_live_view_lists_the_plans_the_server_returned(driver, server) -> None:
    from selenium.webdriver.common.keys import Keys

    _open(driver, server)
    _plan(driver, lengths=" ".join(map(str, LENGTHS)), cp=str(CP), strategies=["flashcp", "zigzag"])
    driver.find_element(_by("ID"), "tab-explore").send_keys(Keys.ARROW_RIGHT)  # keyboard tab switch
    assert driver.find_element(_by("ID"), "view-live").is_displayed()
    recent = server.get("/v1/recent")["plans"]
    last = recent[-1]
    rows = _wait(driver, lambda d: d.find_elements(_by("CSS_SELECTOR"), f"#live-table tr[data-seq='{last['seq']}']"))
    cells = [c.text for c in rows[0].find_elements(_by("TAG_NAME"), "td")]
    assert cells[2:9] == [last["strategy"], str(last["cp_size"]), f"{last['num_documents']:,}", f"{last['tokens']:,}",
                          f"{last['makespan_ms']:.3f}", f"{last['lower_bound_ms']:.3f}",
                          f"{last['makespan_ms'] / last['lower_bound_ms']:.3f}"]
    _wait(driver, lambda d: "p50" in d.find_element(_by("ID"), "latency-now").text)
    # "Explore" on a recent plan plans its lengths again in the Explore view.
    rows[0].find_element(_by("TAG_NAME"), "button").click()
    _wait(driver, lambda d: d.find_element(_by("ID"), "view-explore").is_displayed())
    _wait(driver, lambda d: len(d.execute_script("return window.seen")) == 2)
    _wait(driver, lambda d: d.find_element(_by("ID"), "status").text.startswith("Planned"))
    assert driver.find_element(_by("ID"), "lengths").get_attribute("value") == " ".join(map(str, LENGTHS))
    assert set(_summary(driver)) == {last["strategy"]}


def test_a_16k_document_plan_renders(driver, server, record_property) -> None:
    """16,384 documents: the page draws every segment; the draw time is reported (not asserted)."""
    lengths = np.random.default_rng(0).integers(1, 2048, 16384).tolist()
    _open(driver, server)
    _plan(driver, lengths=" ".join(map(str, lengths)), cp="8", strategies=["flashcp", "zigzag", "whole_doc"],
          cost=None, typed=False, timeout=300)
    assert not driver.find_element(_by("ID"), "error").is_displayed()
    plans = _results(driver.execute_script("return window.seen[0]"))
    shown = _summary(driver)
    for name, plan in plans.items():
        assert shown[name]["makespan"] == f"{plan['makespan_ms']:.3f}"
        drawn = driver.execute_script(
            "return window.flashcp.state.view.cards.find((c) => c.p.strategy === arguments[0]).p.seg.doc.length", name
        )
        assert drawn == sum(len(r["segments"]) for r in plan["ranks"])
    _wait(driver, lambda d: d.execute_script("return window.flashcpTiming.painted_ms !== undefined"))
    timing = driver.execute_script("return window.flashcpTiming")
    assert timing["documents"] == 16384
    record_property("render_ms", timing["render_ms"])
    print(f"\n16,384 documents x 3 strategies, N=8: request {timing['request_ms']:.0f} ms, "
          f"draw {timing['render_ms']:.0f} ms, until painted {timing['painted_ms']:.0f} ms")
    if os.environ.get("FLASHCP_UI_SCREENSHOTS"):
        driver.execute_script("document.querySelector('.card').scrollIntoView()")
        Path(os.environ["FLASHCP_UI_SCREENSHOTS"], "explorer-16k.png").write_bytes(driver.get_screenshot_as_png())


def test_json_input_of_several_micro_batches_shows_each(driver, server) -> None:
    from selenium.webdriver.support.ui import Select

    _open(driver, server)
    batches = [LENGTHS, [9000, 100, 200, 30000]]
    _plan(driver, lengths=json.dumps(batches), cp=str(CP), strategies=["flashcp", "zigzag"], cost=None)
    response = driver.execute_script("return window.seen[0]")
    assert len(response["comparisons"]) == 2
    for index in (1, 0):
        Select(driver.find_element(_by("ID"), "micro-batch")).select_by_value(str(index))
        plans = {r["strategy"]: r["plan"] for r in response["comparisons"][index]["results"]}
        assert {name: row["makespan"] for name, row in _summary(driver).items()} == {
            name: f"{plan['makespan_ms']:.3f}" for name, plan in plans.items()}
