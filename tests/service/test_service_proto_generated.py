"""The committed generated code matches the .proto (regenerated into a temp dir and compared byte for byte)."""

from __future__ import annotations

import importlib.util
import sys

from service_testing import REPO


def _gen_proto():
    spec = importlib.util.spec_from_file_location("gen_proto", REPO / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_up_to_date() -> None:
    stale = _gen_proto().stale_files()
    assert stale == [], f"run `python scripts/gen_proto.py` and commit: {stale}"


def test_contract_package_and_services() -> None:
    from flashcp.v1 import planner_pb2

    assert planner_pb2.DESCRIPTOR.package == "flashcp.v1"
    service = planner_pb2.DESCRIPTOR.services_by_name["Planner"]
    assert {m.name for m in service.methods} == {"Plan", "PlanStream", "Compare", "ListCostModels", "ListStrategies"}
    stream = service.methods_by_name["PlanStream"]
    assert stream.client_streaming and stream.server_streaming
