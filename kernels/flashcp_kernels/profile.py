"""``flashcp profile``: measure this machine's attention kernel, GEMMs and collectives into a cost-model file.

The file is a JSON object in the format of
:func:`flashcp_planner.presets.cost_model_from_dict` (a ``base`` preset plus
the measured fields), so ``flashcp plan --cost FILE`` plans with measured
costs. Measured:

* ``attention_tflops`` / ``attention_efficiency``: forward time of the
  segment-attention kernel on packed batches of equal documents of q tokens
  (``total_tokens / q`` documents per launch, one whole-document segment each),
  for q = 128 .. 32K. Per-segment time = launch time / documents; throughput =
  4 * causal pairs * heads * head_dim / time; ``attention_tflops`` is the best
  throughput and the efficiency of q its fraction. Launch floors and tile
  quantisation are inside the efficiency curve, so ``attention_segment_overhead_ms``
  is written as 0.
* ``attention_backward_ratio``: backward / forward time at the longest length.
* ``gemm_tflops``: ``torch.matmul`` of [tokens, hidden] x [hidden, ffn].
* with ``torch.distributed`` initialised (or ``--distributed`` under torchrun)
  and world size > 1: ``all_gather``
  per-GPU receive bandwidth and small-message latency (intra-node when the
  whole group is on one node, else inter-node). Otherwise the base preset's
  network numbers are kept.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["add_profile_arguments", "run_profile", "benchmark_ms", "causal_pairs", "packed_meta"]

FULL_LENGTHS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
QUICK_LENGTHS = (16, 32, 64)


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``flashcp profile`` options to ``parser``."""
    parser.add_argument("--output", "-o", default="flashcp_cost_model.json", metavar="FILE.json",
                        help="cost-model file to write (default: %(default)s)")
    parser.add_argument("--base", default=None, metavar="PRESET",
                        help="preset supplying model shape and unmeasured fields "
                             "(default: h200-llama8b on an H200, else h100-llama8b)")
    parser.add_argument("--name", default=None, help="cost-model name recorded in plans (default: profiled-<gpu>)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="device to measure (default: cuda when available)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="activation dtype (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--total-tokens", type=int, default=32768, metavar="T",
                        help="tokens per measured attention launch (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=10, metavar="R", help="timed repetitions (default: %(default)s)")
    parser.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                        help="segment-attention backend to measure (default: %(default)s = triton on a GPU)")
    parser.add_argument("--distributed", action="store_true",
                        help="initialise torch.distributed from torchrun's environment (nccl on cuda, gloo on cpu) "
                             "and also measure all_gather; rank 0 writes the file")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and few repetitions (checks the pipeline, numbers are meaningless)")


def causal_pairs(q_pos: int, q_len: int) -> int:
    """(query, key) pairs of queries at positions q_pos .. q_pos+q_len-1 attending causally."""
    end = q_pos + q_len
    return (end * (end + 1) - q_pos * (q_pos + 1)) // 2


def packed_meta(doc_length: int, num_docs: int, device: torch.device | str):
    """SegmentMeta of ``num_docs`` whole documents of ``doc_length`` tokens packed back to back."""
    from flashcp_kernels.meta import SegmentMeta

    starts = [i * doc_length for i in range(num_docs)]
    return SegmentMeta.from_lists(starts, [doc_length] * num_docs, [0] * num_docs, starts, device=device)


def benchmark_ms(fn: Callable[[], Any], *, device: torch.device, warmup: int = 2, reps: int = 10) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, reps)):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _measure_length(cfg: dict, device: torch.device, dtype: torch.dtype, length: int, total_tokens: int,
                    reps: int, backend: str, with_backward: bool) -> tuple[dict, float]:
    """Forward point of one document length and (optionally) the backward time, ms."""
    from flashcp_kernels.autograd import segment_attention_backward, segment_attention_forward

    heads, kv_heads, head_dim = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
    num_docs = max(1, total_tokens // length)
    tokens = num_docs * length
    meta = packed_meta(length, num_docs, device)
    q = torch.randn(tokens, heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(tokens, kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn(tokens, kv_heads, head_dim, device=device, dtype=dtype)

    def forward():
        return segment_attention_forward(q, k, v, meta, backend=backend)

    fwd_ms = benchmark_ms(forward, device=device, reps=reps)
    flops = 4.0 * causal_pairs(0, length) * num_docs * heads * head_dim
    point = {"q_tokens": length, "docs": num_docs, "fwd_ms": fwd_ms, "tflops": flops / (fwd_ms * 1e9),
             "segment_ms": fwd_ms / num_docs}
    bwd_ms = float("nan")
    if with_backward:
        out, lse = forward()
        dout = torch.randn_like(out)
        bwd_ms = benchmark_ms(lambda: segment_attention_backward(dout, q, k, v, out, lse, meta, backend=backend),
                              device=device, reps=reps)
    return point, bwd_ms


def _attention_points(cfg: dict, device: torch.device, dtype: torch.dtype, lengths, total_tokens: int,
                      reps: int, backend: str) -> tuple[list[dict], float]:
    points = []
    bwd_ratio = float("nan")
    for length in lengths:
        point, bwd_ms = _measure_length(cfg, device, dtype, length, total_tokens, reps, backend,
                                        with_backward=length == lengths[-1])
        points.append(point)
        if math.isfinite(bwd_ms):
            bwd_ratio = bwd_ms / point["fwd_ms"]
    return points, bwd_ratio


def _gemm_tflops(cfg: dict, device: torch.device, dtype: torch.dtype, tokens: int, reps: int) -> float:
    a = torch.randn(tokens, cfg["hidden_size"], device=device, dtype=dtype)
    b = torch.randn(cfg["hidden_size"], cfg["ffn_hidden_size"], device=device, dtype=dtype)
    ms = benchmark_ms(lambda: torch.matmul(a, b), device=device, reps=reps)
    return 2.0 * tokens * cfg["hidden_size"] * cfg["ffn_hidden_size"] / (ms * 1e9)


def _network(device: torch.device, quick: bool, reps: int) -> dict[str, float]:
    """all_gather bandwidth / latency of the default process group, or {} without one (or one rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return {}
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    world = dist.get_world_size()
    numel = (1 << 12) if quick else (1 << 25)  # 64 MiB of bf16 per rank when measuring for real
    small = torch.zeros(world, dtype=torch.bfloat16, device=device)
    big = torch.zeros(numel, dtype=torch.bfloat16, device=device)
    small_out = torch.empty(world * world, dtype=torch.bfloat16, device=device)
    big_out = torch.empty(world * numel, dtype=torch.bfloat16, device=device)
    latency_ms = benchmark_ms(lambda: all_gather(small_out, small), device=device, reps=reps)
    ms = benchmark_ms(lambda: all_gather(big_out, big), device=device, reps=reps)
    gbps = (world - 1) * numel * 2 / (ms * 1e6)  # bytes each rank receives per second, latency included
    one_node = device.type == "cuda" and world <= torch.cuda.device_count()
    prefix = "intra_node" if one_node else "inter_node"
    return {f"{prefix}_gbps": gbps, f"{prefix}_latency_ms": latency_ms}


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _sig(x: float) -> float:
    """Six significant digits (keeps tiny CPU throughputs positive)."""
    return float(f"{x:.6g}")


def _efficiency_curve(points: list[dict]) -> tuple[float, list[list[float]]]:
    best = max(p["tflops"] for p in points)
    curve = [[p["q_tokens"], min(1.0, max(1e-4, round(p["tflops"] / best, 4)))] for p in points]
    return best, curve


def run_profile(args: argparse.Namespace) -> int:
    """Measure and write the cost-model file named by ``args.output``; returns 0.

    Raises:
        InvalidRequest: bad option (no CUDA for ``--device cuda``, unknown preset, non-positive sizes).
    """
    from flashcp_planner.errors import InvalidRequest
    from flashcp_planner.presets import get_preset

    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest("device", "cuda requested but torch sees no CUDA GPU")
    for field in ("total_tokens", "reps"):
        if getattr(args, field) < 1:
            raise InvalidRequest(field, f"must be >= 1, got {getattr(args, field)}")
    if args.base is not None:
        get_preset(args.base)  # unknown preset -> InvalidRequest before any measurement
    device = torch.device(device_name)
    if not args.distributed:
        return _profile(args, device)

    import os

    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _profile(args, device)
    finally:
        if created:
            dist.destroy_process_group()


def _profile(args: argparse.Namespace, device: torch.device) -> int:
    from flashcp_planner.presets import cost_model_from_dict, cost_model_to_dict, get_preset

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    base_name = args.base or ("h200-llama8b" if "H200" in gpu else "h100-llama8b")
    cfg = cost_model_to_dict(get_preset(base_name))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    lengths = QUICK_LENGTHS if args.quick else FULL_LENGTHS
    total_tokens = min(args.total_tokens, 128) if args.quick else args.total_tokens
    reps = 1 if args.quick else args.reps
    shape = dict(cfg)
    if args.quick:  # keep the model fields, measure on toy shapes
        shape.update(num_heads=2, num_kv_heads=1, head_dim=16, hidden_size=64, ffn_hidden_size=128)

    points, bwd_ratio = _attention_points(shape, device, dtype, lengths, total_tokens, reps, args.backend)
    attention_tflops, curve = _efficiency_curve(points)
    gemm = _gemm_tflops(shape, device, dtype, 256 if args.quick else 8192, reps)
    network = _network(device, args.quick, reps)

    data: dict[str, Any] = {
        "base": base_name,
        "name": args.name or f"profiled-{gpu.replace(' ', '-').lower()}",
        "attention_tflops": _sig(attention_tflops),
        "attention_efficiency": curve,
        "attention_segment_overhead_ms": 0.0,
        "gemm_tflops": _sig(gemm),
        **{k: _sig(v) for k, v in network.items()},
    }
    if math.isfinite(bwd_ratio) and bwd_ratio > 0:
        data["attention_backward_ratio"] = _sig(bwd_ratio)
    cost_model_from_dict(data)  # the planner must accept what we write
    if not _is_rank_zero():
        return 0
    Path(args.output).write_text(json.dumps(data, indent=2) + "\n")

    print(f"device {gpu}, dtype {str(dtype).removeprefix('torch.')}, heads {shape['num_heads']}/"
          f"{shape['num_kv_heads']}, head_dim {shape['head_dim']}")
    print(f"{'q_tokens':>9} {'docs':>6} {'launch_ms':>10} {'segment_ms':>11} {'TFLOP/s':>9} {'eff':>6}")
    for p, (_, eff) in zip(points, curve, strict=True):
        print(f"{p['q_tokens']:>9} {p['docs']:>6} {p['fwd_ms']:>10.4f} {p['segment_ms']:>11.5f} "
              f"{p['tflops']:>9.3f} {eff:>6.3f}")
    print(f"attention backward/forward {bwd_ratio:.2f}, gemm {gemm:.2f} TFLOP/s"
          + (f", network {network}" if network else ", network: preset values (single process)"))
    print(f"wrote {args.output}")
    return 0
