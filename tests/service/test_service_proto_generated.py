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


def test_plan_bulk_data_is_packed_scalars() -> None:
    """Segments, shardings and transfers are packed integer lists, not a message per record (see planner.proto)."""
    from google.protobuf.descriptor import FieldDescriptor

    from flashcp.v1 import planner_pb2 as pb

    bulk = {
        pb.RankPlan: ("segments",),
        pb.DocShardings: ("docs", "shardings", "rank_counts", "ranks"),
        pb.Plan: ("doc_lengths", "transfers"),
    }
    for message, names in bulk.items():
        for name in names:
            field = message.DESCRIPTOR.fields_by_name[name]
            assert field.is_repeated and field.is_packed, f"{message.__name__}.{name}"
            assert field.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_ENUM), f"{message.__name__}.{name}"
    assert pb.Plan.DESCRIPTOR.fields_by_name["documents"].message_type is pb.DocShardings.DESCRIPTOR
    # Numbers of the replaced message-per-record fields stay unused.
    assert 2 not in pb.RankPlan.DESCRIPTOR.fields_by_number
    assert not {11, 12} & set(pb.Plan.DESCRIPTOR.fields_by_number)
    for request in (pb.PlanRequest, pb.CompareRequest):
        assert request.DESCRIPTOR.fields_by_name["omit_transfers"].type == FieldDescriptor.TYPE_BOOL
