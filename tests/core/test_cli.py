"""The ``flashcp`` command line, run in-process through ``main`` (plus one real console-script run)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest

from flashcp_planner.cli import main
from flashcp_planner.layout import Layout
from flashcp_planner.model import CommMode
from flashcp_planner.presets import PRESETS
from flashcp_planner.request import PlanContext
from flashcp_planner.strategies import STRATEGIES

LENGTHS = [3000, 1000, 200, 5000, 40000, 7]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def assert_covers_every_token(plan: dict[str, Any]) -> None:
    owned: dict[int, list[tuple[int, int]]] = {}
    for rank in plan["ranks"]:
        for doc, start, end in rank["segments"]:
            owned.setdefault(doc, []).append((start, end))
    assert sorted(owned) == list(range(len(plan["doc_lengths"])))
    for doc, pieces in owned.items():
        pos = 0
        for start, end in sorted(pieces):
            assert start == pos and end > start
            pos = end
        assert pos == plan["doc_lengths"][doc]


@pytest.fixture
def lengths_file(tmp_path: Path) -> Path:
    path = tmp_path / "lengths.txt"
    path.write_text("# one micro-batch\n3000, 1000 200\n5000\t40000 7\n")
    return path


# -- plan ----------------------------------------------------------------------------------------------


def test_plan_json_shape(capsys: pytest.CaptureFixture[str], lengths_file: Path) -> None:
    code, out, err = run(capsys, "plan", "--lengths", str(lengths_file), "--cp", "4", "--format", "json")
    assert code == 0, err
    (plan,) = json.loads(out)["plans"]
    assert plan["doc_lengths"] == LENGTHS
    assert plan["strategy"] == "flashcp" and plan["cp_size"] == 4 and len(plan["ranks"]) == 4
    assert_covers_every_token(plan)
    for rank in plan["ranks"]:
        assert rank["tokens"] == sum(e - s for _, s, e in rank["segments"])
        assert rank["total_ms"] == pytest.approx(rank["linear_ms"] + rank["attention_ms"] + rank["exposed_comm_ms"])
    assert plan["makespan_ms"] == pytest.approx(max(r["total_ms"] for r in plan["ranks"]))
    assert plan["lower_bound_ms"] <= plan["makespan_ms"]


def test_plan_several_micro_batches_from_stdin(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    batches = [[100, 2000, 30], [5, 6, 7, 8, 9000], [64]]
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(batches)))
    code, out, err = run(capsys, "plan", "--lengths", "-", "--cp", "2", "--strategy", "per_doc", "--format", "json")
    assert code == 0, err
    plans = json.loads(out)["plans"]
    assert [p["doc_lengths"] for p in plans] == batches
    for p in plans:
        assert p["strategy"] == "per_doc" and p["comm"] == STRATEGIES["per_doc"].default_comm.value
        assert_covers_every_token(p)


def test_plan_comm_and_capacity_options(capsys: pytest.CaptureFixture[str], lengths_file: Path) -> None:
    code, out, err = run(capsys, "plan", "--lengths", str(lengths_file), "--cp", "4", "--strategy", "per_doc",
                         "--comm", "exact_need", "--capacity", "20000", "--format", "json")
    assert code == 0, err
    (plan,) = json.loads(out)["plans"]
    assert plan["comm"] == "exact_need" and plan["capacity"] == 20000
    assert plan["transfers"]  # exact-need transfers are listed


def test_plan_table(capsys: pytest.CaptureFixture[str], lengths_file: Path) -> None:
    code, out, err = run(capsys, "plan", "--lengths", str(lengths_file), "--cp", "4", "--strategy", "per_doc")
    assert code == 0, err
    for needle in ("rank", "attention_ms", "linear_ms", "exposed_comm_ms", "total_ms", "makespan", "lower bound",
                   "ratio", "documents:", "per_doc"):
        assert needle in out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    assert sum(int(r[1]) for r in rows) == sum(LENGTHS)


def test_plan_generated_workload(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "plan", "--workload", "equal", "--context", "16384", "--micro-batches", "2",
                         "--cp", "4", "--format", "json")
    assert code == 0, err
    plans = json.loads(out)["plans"]
    assert [p["doc_lengths"] for p in plans] == [[4096] * 4] * 2


# -- compare ---------------------------------------------------------------------------------------------


def test_compare_table_and_plot(capsys: pytest.CaptureFixture[str], lengths_file: Path, tmp_path: Path) -> None:
    png = tmp_path / "cmp.png"
    code, out, err = run(capsys, "compare", "--lengths", str(lengths_file), "--cp", "4", "--strategies",
                         "flashcp,per_doc,zigzag,whole_doc", "--plot", str(png))
    assert code == 0, err
    for needle in ("makespan_ms", "vs_per_doc", "vs_zigzag", "/lower_bound", "kv_MiB_total", "kv_MiB_max_rank"):
        assert needle in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert rows["per_doc"][3] == "1.00x" and rows["zigzag"][4] == "1.00x"
    assert rows["whole_doc"][1] == "infeasible"  # the 40000-token document exceeds the capacity
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_json_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "compare", "--workload", "web", "--context", "32768", "--seed", "1",
                         "--micro-batches", "2", "--cp", "4", "--strategies", "flashcp,contiguous", "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    assert data["strategies"] == ["flashcp", "contiguous"] and data["workload"]["name"] == "web"
    assert len(data["micro_batches"]) == 2
    for mb in data["micro_batches"]:
        assert mb["num_tokens"] == 32768
        for res in mb["results"]:
            assert res["status"] == "ok"
            assert res["ratio_to_lower_bound"] == pytest.approx(res["makespan_ms"] / mb["lower_bound_ms"])
            assert res["ratio_to_lower_bound"] >= 1.0
            assert res["comm_bytes_total"] == sum(res["ranks"]["recv_bytes"])
            assert res["comm_bytes_max_rank"] == max(res["ranks"]["recv_bytes"])
            # references are computed even though per_doc and zigzag are not displayed
            assert res["speedup_vs_per_doc"] > 0 and res["speedup_vs_zigzag"] > 0
    summary = {s["strategy"]: s for s in data["summary"]}
    assert summary["flashcp"]["makespan_ms_total"] == pytest.approx(
        sum(mb["results"][0]["makespan_ms"] for mb in data["micro_batches"]))


def test_compare_many_micro_batches_prints_summary(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "compare", "--workload", "code", "--context", "16384", "--micro-batches", "5",
                         "--cp", "2", "--strategies", "flashcp,per_doc")
    assert code == 0, err
    assert "makespan (ms) per micro-batch" in out and "summary over 5 micro-batches" in out


class _FakeExact:
    """An 'exact' strategy for the skip rule: per-doc layout flagged optimal."""

    name: ClassVar[str] = "fake_exact"
    description: ClassVar[str] = "test double"
    is_optimal: ClassVar[bool] = True
    default_comm: ClassVar[CommMode] = CommMode.EXACT_NEED
    calls = 0

    def layout(self, ctx: PlanContext) -> Layout:
        type(self).calls += 1
        return STRATEGIES["per_doc"].layout(ctx)


def test_compare_skips_exact_strategies_on_big_micro_batches(capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(STRATEGIES, "fake_exact", _FakeExact())
    _FakeExact.calls = 0
    code, out, err = run(capsys, "compare", "--workload", "ones", "--context", "80", "--cp", "2", "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    assert "fake_exact" in data["strategies"]
    (res,) = [r for r in data["micro_batches"][0]["results"] if r["strategy"] == "fake_exact"]
    assert res["status"] == "skipped" and _FakeExact.calls == 0
    assert any("fake_exact" in n for n in data["notes"])
    code, out, err = run(capsys, "compare", "--workload", "ones", "--context", "80", "--cp", "2", "--strategies",
                         "fake_exact", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["micro_batches"][0]["results"][0]["status"] == "ok" and _FakeExact.calls == 1


@pytest.mark.skipif("optimum" not in STRATEGIES, reason="optimum strategy not registered")
def test_compare_reports_the_optimum_gap(capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("300 1200 50 700"))
    code, out, err = run(capsys, "compare", "--lengths", "-", "--cp", "2", "--strategies", "flashcp,optimum",
                         "--time-limit", "5", "--format", "json")
    assert code == 0, err
    flashcp, optimum = json.loads(out)["micro_batches"][0]["results"]
    opt = optimum["optimality"]
    assert opt["status"] in ("optimal", "feasible")
    assert opt["heuristic_ms"] == pytest.approx(flashcp["makespan_ms"])
    assert optimum["makespan_ms"] <= flashcp["makespan_ms"] * (1 + 1e-9)


# -- listings and delegated commands -----------------------------------------------------------------


def test_strategies_and_presets_listings(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "strategies", "--format", "json")
    assert code == 0
    assert [s["name"] for s in json.loads(out)["strategies"]] == list(STRATEGIES)
    code, out, _ = run(capsys, "strategies")
    assert code == 0 and all(name in out for name in STRATEGIES)
    code, out, _ = run(capsys, "presets", "--format", "json")
    assert code == 0 and sorted(json.loads(out)["presets"]) == sorted(PRESETS)
    code, out, _ = run(capsys, "presets")
    assert code == 0 and all(name in out for name in PRESETS)
    code, out, _ = run(capsys, "workloads", "--format", "json")
    assert code == 0 and "prolong" in json.loads(out)["workloads"]


def test_missing_extras_exit_2_with_install_hint(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flashcp_service.cli", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "flashcp_kernels.profile", None)
    code, _, err = run(capsys, "serve", "--port", "0")
    assert_usage_error(code, err, "flashcp[server]")
    code, _, err = run(capsys, "profile")
    assert_usage_error(code, err, "flashcp[kernels]")
    code, out, err = run(capsys, "strategies")  # other commands never import them
    assert code == 0, err


def test_serve_delegates_to_the_service_package(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    fake = ModuleType("flashcp_service.cli")
    fake.add_serve_arguments = lambda parser: parser.add_argument("--port", type=int, default=1)  # type: ignore[attr-defined]
    fake.run_serve = lambda args: seen.setdefault("port", args.port) and 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flashcp_service.cli", fake)
    code, _, err = run(capsys, "serve", "--port", "5051")
    assert code == 7 and seen == {"port": 5051}, err
    code, _, err = run(capsys, "serve", "--port", "x")
    assert_usage_error(code, err, "--port")


# -- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "lengths"),
        ("   \n", "lengths"),
        ("[]", "lengths"),
        ("[[]]", "lengths[0]"),
        ("[[1, 2], []]", "lengths[1]"),
        ("1 0 3", "lengths[1]"),
        ("5 -3", "lengths[1]"),
        ("1.5 2", "lengths[0]"),
        ("12 abc", "lengths[1]"),
        ("[1, 2.0]", "lengths[1]"),
        ("[1, true]", "lengths[1]"),
        ('[1, "2"]', "lengths[1]"),
        ("[[1, 2], 3]", "lengths"),
        ("{not json", "lengths"),
        ('{"x": [1]}', "lengths"),
    ],
)
def test_bad_lengths(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, text: str,
                     needle: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    code, out, err = run(capsys, "plan", "--lengths", "-", "--cp", "2")
    assert_usage_error(code, err, needle)
    assert out == ""


@pytest.mark.parametrize(
    ("cost", "needle"),
    [
        ({"gemm_tflops": -1.0}, "cost_model.gemm_tflops"),
        ({"intra_node_latency_ms": -0.5}, "cost_model.intra_node_latency_ms"),
        ({"inter_node_gbps": float("nan")}, "cost_model.inter_node_gbps"),
        ({"num_heads": 2.5}, "cost_model.num_heads"),
        ({"bogus_field": 1}, "cost_model"),
        ([1, 2], "cost_model"),
    ],
)
def test_bad_cost_files(capsys: pytest.CaptureFixture[str], lengths_file: Path, tmp_path: Path, cost: Any,
                        needle: str) -> None:
    path = tmp_path / "cost.json"
    path.write_text(json.dumps(cost))  # json.dumps writes NaN as the NaN literal Python's parser accepts
    code, _, err = run(capsys, "plan", "--lengths", str(lengths_file), "--cp", "2", "--cost", str(path))
    assert_usage_error(code, err, needle)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["plan", "--lengths", "{dir}/missing.txt", "--cp", "2"], "missing.txt"),
        (["plan", "--lengths", "{dir}", "--cp", "2"], "directory"),
        (["plan", "--lengths", "{file}", "--cp", "0"], "cp_size"),
        (["plan", "--lengths", "{file}", "--cp", "-3"], "cp_size"),
        (["plan", "--lengths", "{file}", "--cp", "5000"], "cp_size"),
        (["plan", "--lengths", "{file}", "--cp", "two"], "--cp"),
        (["plan", "--lengths", "{file}"], "--cp"),
        (["plan", "--cp", "2"], "--lengths"),
        (["plan", "--lengths", "{file}", "--cp", "2", "--capacity", "100"], "infeasible"),
        (["plan", "--lengths", "{file}", "--cp", "2", "--capacity", "0"], "capacity"),
        (["plan", "--lengths", "{file}", "--cp", "2", "--slack", "nan"], "capacity_slack"),
        (["plan", "--lengths", "{file}", "--cp", "2", "--slack", "-1"], "capacity_slack"),
        (["plan", "--lengths", "{file}", "--cp", "4", "--strategy", "whole_doc"], "infeasible"),
        (["plan", "--lengths", "{file}", "--cp", "2", "--strategy", "nope"], "strategy"),
        (["plan", "--lengths", "{file}", "--cp", "2", "--cost", "nope"], "cost_model"),
        (["plan", "--lengths", "{file}", "--cp", "2", "--cost", "{dir}/missing.json"], "cost_model"),
        (["plan", "--lengths", "{file}", "--cp", "2", "--comm", "smoke"], "--comm"),
        (["plan", "--lengths", "{file}", "--cp", "2", "--time-limit", "0"], "time_limit_s"),
        (["compare", "--lengths", "{file}", "--cp", "2", "--strategies", "flashcp,nope"], "strategy"),
        (["compare", "--lengths", "{file}", "--cp", "2", "--strategies", ","], "strategies"),
        (["compare", "--workload", "nope", "--context", "1024", "--cp", "2"], "workload"),
        (["compare", "--workload", "web", "--cp", "2"], "context"),
        (["compare", "--workload", "web", "--context", "0", "--cp", "2"], "context"),
        (["compare", "--workload", "web", "--context", "1024", "--seed", "-1", "--cp", "2"], "seed"),
        (["compare", "--workload", "web", "--context", "1024", "--micro-batches", "0", "--cp", "2"],
         "num_micro_batches"),
        (["compare", "--workload", "ones", "--context", "999999999", "--cp", "2"], "context"),
        (["compare", "--lengths", "{file}", "--workload", "web", "--cp", "2"], "not allowed"),
        (["compare", "--lengths", "{file}", "--cp", "2", "--plot", "{dir}/no/such/dir/x.png"], "plot"),
        (["compare", "--lengths", "{file}", "--cp", "2", "--plot", "{dir}/x.png", "--plot-micro-batch", "3"],
         "plot_micro_batch"),
        (["nope"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_arguments(capsys: pytest.CaptureFixture[str], lengths_file: Path, tmp_path: Path, args: list[str],
                       needle: str) -> None:
    argv = [a.format(file=lengths_file, dir=tmp_path) for a in args]
    code, _, err = run(capsys, *argv)
    assert_usage_error(code, err, needle)


# -- the installed console script --------------------------------------------------------------------------


def test_console_script_entry_point(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("flashcp")
    if not exe.exists():
        pytest.skip(f"no flashcp console script next to {sys.executable}")
    ok = subprocess.run([str(exe), "plan", "--lengths", "-", "--cp", "2", "--format", "json"], input="10 20 4000",
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert_covers_every_token(json.loads(ok.stdout)["plans"][0])
    bad = subprocess.run([str(exe), "plan", "--lengths", "-", "--cp", "2"], input="10 0", capture_output=True,
                         text=True, timeout=120)
    assert_usage_error(bad.returncode, bad.stderr, "lengths[1]")
