"""``flashcp profile`` (quick CPU mode) writes a cost model the planner loads; the GPU benchmark's dry run works."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from flashcp_kernels.profile import add_profile_arguments, run_profile
from flashcp_planner import PlanRequest, plan
from flashcp_planner.errors import InvalidRequest
from flashcp_planner.presets import load_cost_model

REPO = Path(__file__).resolve().parents[2]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_profile_arguments(parser)
    return parser.parse_args(list(argv))


def test_quick_profile_writes_a_cost_model_the_planner_accepts(tmp_path):
    path = tmp_path / "measured.json"
    assert run_profile(_args("--device", "cpu", "--quick", "--backend", "torch", "-o", str(path))) == 0
    data = json.loads(path.read_text())
    model = load_cost_model(str(path))
    assert model.name == data["name"] == "profiled-cpu"
    assert model.attention_tflops == data["attention_tflops"] > 0 and model.gemm_tflops > 0
    q_tokens = [q for q, _ in model.attention_efficiency]
    assert q_tokens == [16, 32, 64] and max(e for _, e in model.attention_efficiency) == 1.0
    assert model.attention_segment_overhead_ms == 0.0 and model.attention_backward_ratio > 0
    assert (model.num_heads, model.head_dim) == (32, 128)  # model shape comes from the base preset
    plans = plan(PlanRequest(micro_batches=[[100, 2000, 37]], cp_size=2, cost_model=model))
    assert plans[0].cost_model == "profiled-cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_profile_cuda_without_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidRequest, match="device"):
        run_profile(_args("--device", "cuda", "-o", str(tmp_path / "x.json")))


def test_gpu_benchmark_dry_run(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_kernel_tflops", REPO / "benchmarks" / "gpu_kernel_tflops.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu_kernels.md"
    assert bench.main(["--dry-run", "--lengths", "16", "--output", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 16 | 16 |")]
    assert len(rows) == 1
    max_diff = float(rows[0].strip(" |").split("|")[-1])
    assert max_diff < 1e-5  # ours vs SDPA, fp32


def _profile_rank(rank: int, port: int, path: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    run_profile(_args("--device", "cpu", "--quick", "--backend", "torch", "--distributed", "-o", path))


def test_distributed_profile_measures_all_gather_and_rank_zero_writes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "measured.json"
    mp.spawn(_profile_rank, args=(port, str(path)), nprocs=2, join=True)
    data = json.loads(path.read_text())
    assert data["inter_node_gbps"] > 0 and data["inter_node_latency_ms"] > 0  # CPU ranks: not one GPU node
    assert load_cost_model(str(path)).inter_node_gbps == data["inter_node_gbps"]


def test_launch_falls_back_to_a_config_that_fits(monkeypatch):
    import triton

    from flashcp_kernels import triton_common

    monkeypatch.delenv("TRITON_INTERPRET")
    configs = [triton_common.BlockConfig(block_m=128, block_n=128), triton_common.BlockConfig(block_m=64, block_n=32)]
    tried = []

    def launch(config):
        tried.append(config)
        if config.block_m == 128:
            raise triton.runtime.errors.OutOfResources(300_000, 232_448, "shared memory")

    key = ("test-fallback", object())
    assert triton_common.launch_with_fallback(key, configs, launch) == configs[1]
    assert triton_common.launch_with_fallback(key, configs, launch) == configs[1]
    assert tried == [configs[0], configs[1], configs[1]]  # the working config is remembered
    with pytest.raises(triton.runtime.errors.OutOfResources):
        triton_common.launch_with_fallback(("test-none-fits",), configs[:1], launch)
