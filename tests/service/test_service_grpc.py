"""gRPC transport in process (grpc.aio on port 0): same plans as HTTP, status codes for bad input."""

from __future__ import annotations

import grpc
import pytest

from flashcp import SERVICE_NAME, codec
from flashcp.v1 import planner_pb2 as pb
from flashcp_planner import PRESETS, CommMode, PlanOptions, PlanRequest, kv_transfers, plan

LENGTHS = [[100, 2000, 30, 7000], [5, 6]]


def _request(**fields) -> pb.PlanRequest:
    values = {"micro_batches": [pb.MicroBatch(doc_lengths=x) for x in LENGTHS], "cp_size": 4, **fields}
    return pb.PlanRequest(**values)


def _error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def test_grpc_and_http_give_identical_plans(grpc_stub, http_client) -> None:
    for fields, body in [
        ({}, {}),
        ({"strategy": "per_doc", "cost_model_preset": "h200-llama8b"}, {"strategy": "per_doc",
                                                                        "cost_model": "h200-llama8b"}),
        ({"cost_model_custom": pb.CostModel(inter_node_gbps=7.5), "capacity": 4000,
          "options": pb.PlanOptions(comm=pb.COMM_MODE_SHARDING_AWARE)},
         {"cost_model": {"inter_node_gbps": 7.5}, "capacity": 4000, "options": {"comm": "sharding_aware"}}),
    ]:
        reply = grpc_stub.Plan(_request(**fields))
        http = http_client.post("/v1/plan", json={"micro_batches": LENGTHS, "cp_size": 4, **body})
        assert http.status_code == 200, http.text
        assert [codec.plan_pb_to_dict(p) for p in reply.plans] == http.json()["plans"]
    expected = [p.to_dict() for p in plan(PlanRequest(micro_batches=LENGTHS, cp_size=4))]
    assert [codec.plan_pb_to_dict(p) for p in grpc_stub.Plan(_request()).plans] == expected


def test_omit_transfers_leaves_them_out_of_every_plan(grpc_stub, http_client) -> None:
    request = PlanRequest(micro_batches=LENGTHS, cp_size=4, strategy="per_doc",
                          options=PlanOptions(comm=CommMode.EXACT_NEED))
    expected = plan(request)
    assert kv_transfers(expected[0])
    listed = grpc_stub.Plan(codec.request_to_pb(request)).plans
    assert [codec.plan_from_pb(p).transfers for p in listed] == [kv_transfers(p) or None for p in expected]
    assert not any(p.transfers_omitted for p in listed)

    omitted = grpc_stub.Plan(codec.request_to_pb(request, omit_transfers=True)).plans
    streamed = next(grpc_stub.PlanStream(iter([codec.request_to_pb(request, omit_transfers=True)]))).response.plans
    compared = grpc_stub.Compare(codec.compare_request_to_pb(request, ["per_doc", "flashcp"], omit_transfers=True))
    for plans in (omitted, streamed, [r.plan for row in compared.comparisons for r in row.results]):
        assert all(p.transfers_omitted and len(p.transfers) == 0 for p in plans)
        assert all(codec.plan_from_pb(p).transfers is None for p in plans)
    assert [codec.plan_from_pb(p) for p in omitted] == list(expected)
    http = http_client.post("/v1/plan", json={"micro_batches": LENGTHS, "cp_size": 4, "strategy": "per_doc",
                                              "options": {"comm": "exact_need"}, "omit_transfers": True})
    assert [codec.plan_pb_to_dict(p) for p in omitted] == http.json()["plans"]


def test_request_id_metadata_is_honoured(grpc_stub) -> None:
    reply, call = grpc_stub.Plan.with_call(_request(), metadata=(("x-request-id", "step-7"),))
    assert reply.request_id == "step-7"
    assert ("x-request-id", "step-7") in call.trailing_metadata()
    with pytest.raises(grpc.RpcError) as failed:
        grpc_stub.Plan(_request(cp_size=-1), metadata=(("x-request-id", "step-8"),))
    assert ("x-request-id", "step-8") in failed.value.trailing_metadata()
    assert grpc_stub.Plan(_request(request_id="mine")).request_id == "mine"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"micro_batches": [pb.MicroBatch(doc_lengths=[5, -3])]}, "micro_batches[0][1]"),
        ({"micro_batches": []}, "micro_batches"),
        ({"cp_size": -1}, "cp_size"),
        ({"cp_size": 1 << 40}, "cp_size"),
        ({"strategy": "nope"}, "strategy"),
        ({"cost_model_preset": "nope"}, "cost_model"),
        ({"options": pb.PlanOptions(num_workers=0)}, "options.num_workers"),
        ({"options": pb.PlanOptions(comm=99)}, "options.comm"),
        ({"capacity_slack": -0.5}, "capacity_slack"),
    ],
)
def test_invalid_fields_are_invalid_argument(grpc_stub, fields: dict, field: str) -> None:
    error = _error(grpc_stub.Plan, _request(**fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details()
    assert ("flashcp-error-field", field) in error.trailing_metadata()


def test_bytes_that_are_not_protobuf_are_invalid_argument(grpc_server) -> None:
    with grpc.insecure_channel(grpc_server.target) as channel:
        for method in ("Plan", "Compare", "ListCostModels"):
            raw = channel.unary_unary(f"/{SERVICE_NAME}/{method}")  # identity (de)serializers: raw bytes
            error = _error(raw, b"\xff\xff\xff\xff not a protobuf")
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "not a valid" in error.details()


def test_infeasible_is_failed_precondition(grpc_stub) -> None:
    error = _error(grpc_stub.Plan, _request(capacity=10))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "do not fit" in error.details()


def test_size_limits_are_resource_exhausted(grpc_stub, service) -> None:
    docs = pb.MicroBatch(doc_lengths=[5] * (service.settings.max_documents + 1))
    error = _error(grpc_stub.Plan, _request(micro_batches=[docs]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "documents" in error.details()
    huge = pb.MicroBatch(doc_lengths=[1 << 30] * (service.settings.max_request_bytes // 4))
    assert _error(grpc_stub.Plan, _request(micro_batches=[huge])).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    wide = _error(grpc_stub.Plan, _request(micro_batches=[pb.MicroBatch(doc_lengths=[5] * 1000)], cp_size=64))
    assert wide.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "document-ranks" in wide.details()
    batches = [pb.MicroBatch(doc_lengths=[5])] * (service.settings.max_micro_batches + 1)
    assert _error(grpc_stub.Plan, _request(micro_batches=batches)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_stream_answers_in_order_and_survives_bad_requests(grpc_stub) -> None:
    requests = [
        _request(request_id="a"),
        _request(request_id="b", cp_size=0),
        _request(request_id="c", capacity=10),
        _request(strategy="per_doc"),
    ]
    replies = list(grpc_stub.PlanStream(iter(requests)))
    assert [r.WhichOneof("result") for r in replies] == ["response", "error", "error", "response"]
    assert [r.request_id for r in replies[:3]] == ["a", "b", "c"]
    assert replies[1].error.code == "INVALID_ARGUMENT" and replies[1].error.field == "cp_size"
    assert replies[2].error.code == "FAILED_PRECONDITION"
    assert replies[3].response.plans[0].strategy == "per_doc"
    direct = grpc_stub.Plan(_request())
    assert [codec.plan_pb_to_dict(p) for p in replies[0].response.plans] == [
        codec.plan_pb_to_dict(p) for p in direct.plans
    ]


def test_compare_and_listings(grpc_stub, http_client) -> None:
    names = ["flashcp", "whole_doc", "zigzag"]
    message = pb.CompareRequest(micro_batches=[pb.MicroBatch(doc_lengths=[3000, 10, 20])], cp_size=2,
                                capacity=1600, strategies=names)
    rows = codec.comparisons_from_pb(grpc_stub.Compare(message).comparisons)
    http = http_client.post("/v1/compare", json={"micro_batches": [[3000, 10, 20]], "cp_size": 2,
                                                 "capacity": 1600, "strategies": names}).json()
    assert [c.strategy for c in rows[0]] == names
    http_plans = [r["plan"] for r in http["comparisons"][0]["results"]]
    assert [c.plan.to_dict() if c.plan else None for c in rows[0]] == http_plans
    assert rows[0][1].plan is None and rows[0][1].error

    models = grpc_stub.ListCostModels(pb.ListCostModelsRequest())
    assert models.default_cost_model == "h100-llama8b"
    assert [codec.cost_model_from_pb(m) for m in models.cost_models] == list(PRESETS.values())
    strategies = grpc_stub.ListStrategies(pb.ListStrategiesRequest())
    assert {s.name for s in strategies.strategies} >= {"flashcp", "per_doc", "zigzag", "optimum"}


def test_health_and_reflection(grpc_server, service) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(grpc_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = list(reflection.ServerReflectionInfo(iter([ask])))
        listed = {s.name for s in replies[0].list_services_response.service}
        assert SERVICE_NAME in listed and "grpc.health.v1.Health" in listed

        grpc_server.run(service.begin_drain())
        check = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        error = _error(planner_stub(channel).Plan, _request())
        assert error.code() == grpc.StatusCode.UNAVAILABLE


def planner_stub(channel):
    from flashcp.v1 import planner_pb2_grpc

    return planner_pb2_grpc.PlannerStub(channel)


def test_metrics_include_grpc_traffic(grpc_stub, http_client) -> None:
    grpc_stub.Plan(_request())
    _error(grpc_stub.Plan, _request(cp_size=0))
    text = http_client.get("/metrics").text
    assert 'flashcp_requests_total{route="Plan",status="OK",transport="grpc"} 1.0' in text
    assert 'flashcp_requests_total{route="Plan",status="INVALID_ARGUMENT",transport="grpc"} 1.0' in text


def test_stream_reports_undecodable_messages_in_band(grpc_server) -> None:
    with grpc.insecure_channel(grpc_server.target) as channel:
        raw = channel.stream_stream(f"/{SERVICE_NAME}/PlanStream")  # identity (de)serializers: raw bytes
        replies = [pb.PlanStreamResponse.FromString(r)
                   for r in raw(iter([b"\xff\xff\xff garbage", _request(request_id="ok").SerializeToString()]))]
    assert replies[0].error.code == "INVALID_ARGUMENT" and "not a valid" in replies[0].error.message
    assert replies[1].request_id == "ok" and len(replies[1].response.plans) == 2
