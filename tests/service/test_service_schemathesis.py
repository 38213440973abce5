"""Property-based fuzzing of the HTTP API from its own OpenAPI schema: no 5xx, responses conform."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from service_testing import small_settings

from flashcp_service import PlannerService
from flashcp_service.http_app import create_app

_service = PlannerService(small_settings(max_documents=400, max_solver_time_s=0.5))
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(_service))
schema.config.generation.update(max_examples=40, deterministic=True)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=40)
def test_api_never_fails_and_conforms_to_its_schema(case) -> None:
    case.call_and_validate(checks=CHECKS)
