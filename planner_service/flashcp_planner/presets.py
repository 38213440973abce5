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

PRESETS: dict[str, CostModel] = {
    "h100-llama8b": CostModel(name="h100-llama8b"),
    "h200-llama8b": CostModel(name="h200-llama8b", gemm_tflops=700.0),
}


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
