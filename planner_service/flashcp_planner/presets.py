"""Cost-model presets and the JSON cost-model file format.

A cost-model file is a JSON object whose keys are :class:`CostModel` fields
(any subset; missing ones take the values of ``"base"``, a preset name that
defaults to ``"h100-llama8b"``). Unknown keys are rejected. Example::

    {"base": "h100-llama8b", "name": "my-cluster", "inter_node_gbps": 25.0,
     "attention_efficiency": [[128, 0.05], [16384, 1.0]]}
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flashcp_planner.cost import CostModel
from flashcp_planner.errors import InvalidRequest

__all__ = ["PRESETS", "get_preset", "cost_model_from_dict", "load_cost_model", "cost_model_to_dict"]

# --- Calibration (every constant below is derived here or cites its source) ------------------------
#
# Attention, from ../shared/data/compute-attn-H100.csv (hao-ai-lab/DistCA profiling, Apache-2.0):
#   columns L (document length), cp (CP degree the document is sharded over), tp (tensor-parallel degree:
#   each rank runs 32/tp query heads of Llama-3-8B, head_dim 128), duration_per_doc (ms).
#   The times are FORWARD only: with FLOPs = 4 * L(L+1)/2 * heads * head_dim, the cp=1 rows imply
#   ~170 TFLOP/s at 64K for every tp (tp=1: 170.6, tp=4: 167.6); read as forward+backward (3.5x the
#   FLOPs) they would imply ~600 TFLOP/s, above what FlashAttention-2/3 backward reaches on an H100.
#   Fit (cp=1 rows of one tp): the per-call floor is the segment overhead (0.025 ms for 32 heads,
#   0.018 ms for 8 heads: the smallest measured times, 64-token documents, are 0.0284 and 0.0259 ms);
#   attention_tflops is the largest implied throughput after removing the floor, and the efficiency
#   point at each measured L (64..65536) is the implied throughput there divided by attention_tflops.
#   The curve is interpolated in log2(L), so the preset reproduces the cp=1 rows exactly at the
#   measured lengths (max relative error 0.2%, tests/core/test_cost.py).
#   Split documents: the efficiency of a segment is looked up at its effective length isqrt(2 * pairs),
#   the length of a whole document with the same work (a whole document: its own length, so the fit
#   above is unchanged). Keyed on the query count instead, the cp > 1 rows (a document head-tail split
#   over cp ranks, per-rank time) were over-predicted by a median 65-87%: measured kernels stay efficient
#   when short query chunks read long key ranges. Keyed on the work, the cp = 2 / 4 / 8 rows of tp=1
#   are over-predicted by a median 28% / 25% / 10% (max ~2x at L <= 512, where the per-segment
#   overhead is charged to both chunks of a rank while the measurement pays one launch): splitting
#   short documents is still priced conservatively.
#   attention_backward_ratio 2.5: FlashAttention-2 backward does 2.5x the forward matmul FLOPs at a
#   similar rate (Dao 2023, section 3.2 and figure 6); not measured here.
_ATTN_HEADS32 = (  # tp=1 rows (32 query heads per rank)
    (64, 0.0582), (128, 0.1464), (256, 0.2714), (512, 0.3472), (1024, 0.4678), (2048, 0.6106),
    (4096, 0.7824), (8192, 0.8755), (16384, 0.9565), (32768, 0.9942), (65536, 1.0),
)
_ATTN_HEADS8 = (  # tp=4 rows (8 query heads per rank)
    (64, 0.0063), (128, 0.0268), (256, 0.0877), (512, 0.2311), (1024, 0.5275), (2048, 0.6702),
    (4096, 0.7786), (8192, 0.8844), (16384, 0.9706), (32768, 1.0), (65536, 0.9794),
)
#
# Intra-node communication, from ../shared/data/nccl-all_gather-8xH200.txt (nccl-tests, 8 MiB..8 GiB):
#   a rank receives 7/8 of the gathered size; least squares of time = latency + received / bandwidth
#   (relative weights) gives latency 51 us and 374 GB/s (residuals within 6%; busbw at >= 1 GiB is
#   363-368 GB/s). nccl-reduce_scatter-8xH200.txt gives 55 us and 362 GB/s: the backward dK/dV
#   return costs the same. Presets use 0.05 ms and 365 GB/s for H200 NVLink; H100 SXM has the same
#   NVLink 4 (900 GB/s per GPU), so its preset uses the same values (not separately measured).
# Inter-node: ~50 GB/s per GPU per direction (8 x 400 Gb/s InfiniBand per node, BACKGROUND.md 4);
#   presets assume 90% of it (45 GB/s) and 0.06 ms per exchange (NCCL cross-node latency; assumption).
# GEMM: bf16 GEMM on the H200 of this workplace measured ~790 TFLOP/s (BACKGROUND.md 4). The H100 SXM
#   has the same GH100 tensor cores; its preset assumes 10% less (700 TFLOP/s) for clocks under load.
#   linear_backward_ratio 2.0: backward GEMMs are dX and dW, each the forward FLOPs.
# Overlap: all KV comm can hide behind attention that needs no remote KV (overlap_fraction 1.0):
#   an upper bound, the planner's assumption.

_COMM_H200 = {
    "intra_node_gbps": 365.0,
    "intra_node_latency_ms": 0.05,
    "inter_node_gbps": 45.0,
    "inter_node_latency_ms": 0.06,
    "gpus_per_node": 8,
}
_LLAMA3_8B = {  # Llama-3-8B, no tensor parallelism
    "hidden_size": 4096, "ffn_hidden_size": 14336, "num_heads": 32, "num_kv_heads": 8, "head_dim": 128,
}
_LLAMA3_70B_TP8 = {  # Llama-3-70B per rank with tensor parallelism 8: 64/8 query heads, 8/8 KV heads, FFN 28672/8
    "hidden_size": 8192, "ffn_hidden_size": 3584, "num_heads": 8, "num_kv_heads": 1, "head_dim": 128,
}
_ATTN_32 = {"attention_tflops": 170.6, "attention_efficiency": _ATTN_HEADS32, "attention_segment_overhead_ms": 0.025}
_ATTN_8 = {"attention_tflops": 171.2, "attention_efficiency": _ATTN_HEADS8, "attention_segment_overhead_ms": 0.018}

PRESETS: dict[str, CostModel] = {
    "h100-llama8b": CostModel(name="h100-llama8b", gemm_tflops=700.0, **_LLAMA3_8B, **_ATTN_32, **_COMM_H200),
    "h200-llama8b": CostModel(name="h200-llama8b", gemm_tflops=790.0, **_LLAMA3_8B, **_ATTN_32, **_COMM_H200),
    "h200-llama70b-tp8": CostModel(name="h200-llama70b-tp8", gemm_tflops=790.0, **_LLAMA3_70B_TP8, **_ATTN_8,
                                   **_COMM_H200),
}
"""Calibrated cost models (see the comments above for every constant's source). The H200 presets reuse
the H100 attention measurements (same GH100 compute; no H200 attention profile in the data)."""


def get_preset(name: str) -> CostModel:
    """Return the preset called ``name``.

    Raises:
        InvalidRequest: no such preset.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidRequest("cost_model", f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None


_FIELDS = {f.name for f in dataclasses.fields(CostModel) if f.init}


def cost_model_from_dict(data: Mapping[str, Any]) -> CostModel:
    """Build a cost model from the JSON file format (see module docstring)."""
    if not isinstance(data, Mapping):
        raise InvalidRequest("cost_model", "must be a preset name or a JSON object")
    unknown = set(data) - _FIELDS - {"base"}
    if unknown:
        raise InvalidRequest("cost_model", f"unknown field(s) {sorted(unknown)}; expected some of {sorted(_FIELDS)}")
    base_name = data.get("base", "h100-llama8b")
    if not isinstance(base_name, str):
        raise InvalidRequest("cost_model.base", "must be a preset name")
    base = get_preset(base_name)
    values = {k: v for k, v in data.items() if k != "base"}
    if "attention_efficiency" in values:
        points = values["attention_efficiency"]
        if not isinstance(points, (list, tuple)):
            raise InvalidRequest("cost_model.attention_efficiency", "must be a list of [query_tokens, efficiency]")
        values["attention_efficiency"] = tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in points)
    if "name" not in values:
        values["name"] = f"{base_name}+custom" if values else base_name
    if not isinstance(values["name"], str) or not values["name"]:
        raise InvalidRequest("cost_model.name", "must be a non-empty string")
    return dataclasses.replace(base, **values)


def cost_model_to_dict(cost_model: CostModel) -> dict[str, Any]:
    """The JSON file form of ``cost_model`` (every field, no ``base``)."""
    out = {name: getattr(cost_model, name) for name in sorted(_FIELDS)}
    out["attention_efficiency"] = [list(p) for p in cost_model.attention_efficiency]
    return out


def load_cost_model(spec: str) -> CostModel:
    """A preset name, or the path of a JSON cost-model file."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.suffix == ".json" and not path.exists():
        raise InvalidRequest("cost_model", f"unknown preset {spec!r}; expected one of {sorted(PRESETS)} or a JSON file")
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InvalidRequest("cost_model", f"cannot read {spec}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest("cost_model", f"{spec} is not valid JSON: {exc}") from None
    return cost_model_from_dict(data)
