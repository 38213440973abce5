"""FlashCP planner service: gRPC and HTTP transports over one planning-core object.

``PlannerService`` wraps :mod:`flashcp_planner` with the limits a shared
sidecar needs (request size, solver time, bounded killable processes for exact
searches); :func:`create_app` (FastAPI) and :func:`create_server` (grpc.aio)
are thin transports over it; ``flashcp serve`` / ``python -m flashcp_service``
run both in one process (:func:`run_serve`).
"""

from flashcp_service.errors import Overloaded, RequestTooLarge, ServiceError, ShuttingDown
from flashcp_service.service import PlannerService
from flashcp_service.settings import Settings

__all__ = [
    "Overloaded",
    "PlannerService",
    "RequestTooLarge",
    "ServiceError",
    "Settings",
    "ShuttingDown",
    "add_serve_arguments",
    "create_app",
    "create_server",
    "run_serve",
]


def __getattr__(name: str):  # transports import fastapi / grpc: load them on first use
    if name == "create_app":
        from flashcp_service.http_app import create_app

        return create_app
    if name == "create_server":
        from flashcp_service.grpc_server import create_server

        return create_server
    if name in ("add_serve_arguments", "run_serve"):
        from flashcp_service import cli

        return getattr(cli, name)
    raise AttributeError(f"module 'flashcp_service' has no attribute {name!r}")
