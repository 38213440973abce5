"""Fixtures of the service tests: in-process transports and a real server subprocess on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from service_testing import GrpcServerThread, ServerProcess, small_settings, start_server_process

from flashcp_service import PlannerService


@pytest.fixture
def service() -> Iterator[PlannerService]:
    svc = PlannerService(small_settings())
    yield svc
    svc.close()


@pytest.fixture
def grpc_server(service: PlannerService) -> Iterator[GrpcServerThread]:
    server = GrpcServerThread(service)
    yield server
    server.stop()


@pytest.fixture
def grpc_stub(grpc_server: GrpcServerThread):
    import grpc

    from flashcp.v1 import planner_pb2_grpc

    with grpc.insecure_channel(grpc_server.target) as channel:
        yield planner_pb2_grpc.PlannerStub(channel)


@pytest.fixture
def http_client(service: PlannerService):
    from fastapi.testclient import TestClient

    from flashcp_service.http_app import create_app

    with TestClient(create_app(service)) as client:
        yield client


@pytest.fixture(scope="module")
def server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server_process(tmp_path_factory.mktemp("server"))
    yield server
    rc = server.terminate()
    assert rc == 0, server.log_path.read_text()[-2000:]
