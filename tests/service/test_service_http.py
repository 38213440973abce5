"""HTTP transport in process (FastAPI TestClient): plans equal the core's, errors are 4xx naming the field."""

from __future__ import annotations

import pytest

from flashcp_planner import CommMode, Plan, PlanOptions, PlanRequest, kv_transfers, plan

BODY = {"micro_batches": [[100, 2000, 30, 7000], [5, 6]], "cp_size": 4}


def test_plan_matches_in_process_planning(http_client) -> None:
    response = http_client.post("/v1/plan", json=BODY)
    assert response.status_code == 200
    expected = [p.to_dict() for p in plan(PlanRequest(micro_batches=BODY["micro_batches"], cp_size=4))]
    assert response.json() == {"plans": expected}


def test_omit_transfers_drops_the_transfers_key(http_client) -> None:
    body = {**BODY, "strategy": "per_doc", "options": {"comm": "exact_need"}}
    request = PlanRequest(micro_batches=BODY["micro_batches"], cp_size=4, strategy="per_doc",
                          options=PlanOptions(comm=CommMode.EXACT_NEED))
    expected = [p.to_dict() for p in plan(request)]
    assert expected[0]["transfers"]
    assert http_client.post("/v1/plan", json=body).json() == {"plans": expected}

    omitted = http_client.post("/v1/plan", json={**body, "omit_transfers": True}).json()["plans"]
    for p in expected:
        del p["transfers"]
    assert omitted == expected
    decoded = [Plan.from_dict(p) for p in omitted]
    assert all(p.transfers is None for p in decoded)
    assert [kv_transfers(p) for p in decoded] == [kv_transfers(p) for p in plan(request)]

    compare_body = {**BODY, "options": {"comm": "exact_need"}, "strategies": ["per_doc", "flashcp"]}
    compared = http_client.post("/v1/compare", json={**compare_body, "omit_transfers": True})
    assert compared.status_code == 200, compared.text
    results = [r for row in compared.json()["comparisons"] for r in row["results"]]
    assert results and all("transfers" not in r["plan"] for r in results)
    compared_listed = http_client.post("/v1/compare", json=compare_body).json()
    assert compared_listed["comparisons"][0]["results"][0]["plan"]["transfers"]


def test_node_dedup_over_http(http_client) -> None:
    body = {"micro_batches": [[40000, 3000, 700]], "cp_size": 16, "options": {"comm": "node_dedup"},
            "strategy": "per_doc"}
    response = http_client.post("/v1/plan", json=body)
    assert response.status_code == 200, response.text
    (got,) = response.json()["plans"]
    assert got["comm"] == "node_dedup" and got["gpus_per_node"] == 8
    request = PlanRequest(micro_batches=body["micro_batches"], cp_size=16, strategy="per_doc",
                          options=PlanOptions(comm=CommMode.NODE_DEDUP))
    assert Plan.from_dict(got) == plan(request)[0]


def test_every_request_field_is_honoured(http_client) -> None:
    body = {
        **BODY,
        "strategy": "zigzag",
        "cost_model": {"base": "h200-llama8b", "inter_node_gbps": 20.0, "name": "lab"},
        "capacity": 5000,
        "options": {"comm": "all_gather"},
    }
    response = http_client.post("/v1/plan", json=body)
    assert response.status_code == 200, response.text
    first = response.json()["plans"][0]
    assert (first["strategy"], first["cost_model"], first["capacity"], first["comm"]) == (
        "zigzag", "lab", 5000, "all_gather"
    )


def test_request_id_is_echoed_or_generated(http_client) -> None:
    assert http_client.get("/healthz", headers={"x-request-id": "step-42.rank0"}).headers["x-request-id"] == (
        "step-42.rank0"
    )
    generated = http_client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32
    assert http_client.get("/healthz", headers={"x-request-id": "bad id\t!"}).headers["x-request-id"] != "bad id\t!"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"micro_batches": [[1.5]], "cp_size": 4}, "micro_batches[0][0]"),
        ({"micro_batches": [["3"]], "cp_size": 4}, "micro_batches[0][0]"),
        ({"micro_batches": [[3, 0]], "cp_size": 4}, "micro_batches[0][1]"),
        ({"micro_batches": [[]], "cp_size": 4}, "micro_batches[0]"),
        ({"micro_batches": [], "cp_size": 4}, "micro_batches"),
        ({"micro_batches": [[3]]}, "cp_size"),
        ({"micro_batches": [[3]], "cp_size": "4"}, "cp_size"),
        ({"micro_batches": [[3]], "cp_size": 5000}, "cp_size"),
        ({"micro_batches": [[3]], "cp_size": 4, "strategy": "nope"}, "strategy"),
        ({"micro_batches": [[3]], "cp_size": 4, "cost_model": "nope"}, "cost_model"),
        ({"micro_batches": [[3]], "cp_size": 4, "cost_model": {"num_heads": 32, "num_kv_heads": 5}},
         "cost_model.num_kv_heads"),
        ({"micro_batches": [[3]], "cp_size": 4, "cost_model": {"gemm_tflops": -1.0}}, "cost_model.gemm_tflops"),
        ({"micro_batches": [[3]], "cp_size": 4, "options": {"time_limit_s": 0}}, "options.time_limit_s"),
        ({"micro_batches": [[3]], "cp_size": 4, "options": {"comm": "carrier_pigeon"}}, "options.comm"),
        ({"micro_batches": [[3]], "cp_size": 4, "surprise": 1}, "surprise"),
    ],
)
def test_invalid_fields_are_422_naming_the_field(http_client, body: dict, field: str) -> None:
    response = http_client.post("/v1/plan", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["field"] == field
    assert field in error["message"]


def test_infeasible_is_422_with_an_explanation(http_client) -> None:
    response = http_client.post("/v1/plan", json={"micro_batches": [[3000, 10]], "cp_size": 2, "capacity": 100})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "infeasible"
    assert "do not fit" in error["message"]


def test_malformed_json_is_400(http_client) -> None:
    headers = {"content-type": "application/json"}
    response = http_client.post("/v1/plan", content=b'{"micro_batches": [[1,', headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_json"


def test_size_limits_are_413(http_client, service) -> None:
    too_many_docs = {"micro_batches": [[5] * (service.settings.max_documents + 1)], "cp_size": 4}
    response = http_client.post("/v1/plan", json=too_many_docs)
    assert response.status_code == 413
    assert response.json()["error"]["field"] == "micro_batches"
    wide = {"micro_batches": [[5] * 1000], "cp_size": 64}  # 64,000 document-ranks > 50,000
    response = http_client.post("/v1/plan", json=wide)
    assert response.status_code == 413
    assert response.json()["error"]["field"] == "cp_size"
    too_big = b'{"micro_batches": [[' + b"1," * service.settings.max_request_bytes + b"1]], \"cp_size\": 2}"
    response = http_client.post("/v1/plan", content=too_big, headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_compare_lists_every_strategy_and_records_infeasibility(http_client) -> None:
    body = {"micro_batches": [[3000, 10, 20]], "cp_size": 2, "capacity": 1600,
            "strategies": ["flashcp", "whole_doc", "per_doc"]}
    response = http_client.post("/v1/compare", json=body)
    assert response.status_code == 200, response.text
    results = response.json()["comparisons"][0]["results"]
    assert [r["strategy"] for r in results] == ["flashcp", "whole_doc", "per_doc"]
    whole = results[1]
    assert whole["plan"] is None and "cannot be kept whole" in whole["error"]
    assert results[0]["plan"]["strategy"] == "flashcp"
    assert http_client.post("/v1/compare", json={**body, "strategies": ["nope"]}).status_code == 422


def test_listings(http_client) -> None:
    models = http_client.get("/v1/cost-models").json()
    assert models["default_cost_model"] == "h100-llama8b"
    assert {m["name"] for m in models["cost_models"]} >= {"h100-llama8b", "h200-llama8b"}
    strategies = {s["name"]: s for s in http_client.get("/v1/strategies").json()["strategies"]}
    assert strategies["optimum"]["is_optimal"] and not strategies["flashcp"]["is_optimal"]


def test_probes_and_drain(http_client, service) -> None:
    import asyncio

    assert http_client.get("/healthz").json() == {"status": "ok"}
    assert http_client.get("/readyz").status_code == 200
    asyncio.run(service.begin_drain())
    assert http_client.get("/readyz").status_code == 503
    assert http_client.get("/healthz").status_code == 200
    response = http_client.post("/v1/plan", json=BODY)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "unavailable"


def test_metrics_count_requests_and_plan_quality(http_client) -> None:
    http_client.post("/v1/plan", json=BODY)
    http_client.post("/v1/plan", json={"micro_batches": [[0]], "cp_size": 2})
    text = http_client.get("/metrics").text
    assert 'flashcp_requests_total{route="/v1/plan",status="200",transport="http"} 1.0' in text
    assert 'flashcp_requests_total{route="/v1/plan",status="422",transport="http"} 1.0' in text
    assert 'flashcp_request_duration_seconds_count{route="/v1/plan",status="200",transport="http"} 1.0' in text
    assert 'flashcp_plan_makespan_ratio_count{strategy="flashcp"} 2.0' in text
    assert "flashcp_solver_timeouts_total 0.0" in text


def test_openapi_schema_is_precise(http_client) -> None:
    schema = http_client.get("/openapi.json").json()
    assert {"/v1/plan", "/v1/compare", "/v1/cost-models", "/v1/strategies", "/healthz", "/readyz"} <= set(
        schema["paths"]
    )
    body = schema["components"]["schemas"]["PlanBody"]
    assert body["additionalProperties"] is False
    lengths = body["properties"]["micro_batches"]["items"]["items"]
    assert lengths["type"] == "integer" and lengths["minimum"] == 1
    assert set(schema["paths"]["/v1/plan"]["post"]["responses"]) >= {"200", "400", "413", "422", "429", "503"}
