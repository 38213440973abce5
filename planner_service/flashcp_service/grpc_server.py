"""gRPC transport (grpc.aio): the ``flashcp.v1.Planner`` service, health checking and reflection.

Thin: decode with :mod:`flashcp.codec`, call :class:`PlannerService`, encode.
Errors are mapped in exactly one place, :data:`GRPC_STATUS`. Requests that are
not valid protobuf get INVALID_ARGUMENT (not grpc's default INTERNAL) because
the handlers are registered with lenient deserializers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from flashcp import SERVICE_NAME, codec
from flashcp.v1 import planner_pb2 as pb
from flashcp_planner import __version__ as planner_version
from flashcp_planner.errors import InvalidRequest
from flashcp_service.access_log import REQUEST_ID_HEADER, RequestRecord, request_id_from
from flashcp_service.errors import ErrorKind, classify
from flashcp_service.service import PlannerService

__all__ = ["GRPC_STATUS", "PlannerServicer", "create_server"]

_log = logging.getLogger("flashcp_service")

GRPC_STATUS: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.INFEASIBLE: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}
"""The one mapping from service error kinds to gRPC status codes."""

ERROR_FIELD_METADATA = "flashcp-error-field"
"""Trailing-metadata key naming the offending request field of a failed call."""


class _Undecodable:
    """Stands in for a request whose bytes are not a valid protobuf message."""

    __slots__ = ("message_type", "reason")

    def __init__(self, message_type: str, reason: str) -> None:
        self.message_type = message_type
        self.reason = reason


def _lenient(message_cls: type) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's
            return _Undecodable(message_cls.__name__, str(exc) or type(exc).__name__)

    return deserialize


def _decoded(message: Any) -> Any:
    if isinstance(message, _Undecodable):
        raise InvalidRequest("", f"request is not a valid {message.message_type} protobuf message: {message.reason}")
    return message


class PlannerServicer:
    """Implements ``flashcp.v1.Planner`` over one :class:`PlannerService`."""

    def __init__(self, service: PlannerService) -> None:
        self.service = service

    async def _call(
        self, context: grpc.aio.ServicerContext, route: str, handler: Callable[[RequestRecord], Awaitable[Any]]
    ) -> Any:
        """Run ``handler`` with request id, access log, metrics and the error mapping."""
        metadata = dict(context.invocation_metadata() or ())
        request_id = request_id_from(metadata.get(REQUEST_ID_HEADER))
        record = RequestRecord(transport="grpc", route=route, request_id=request_id)
        self.service.metrics.in_flight.inc()
        finished = False
        try:
            # Trailing, not initial, metadata: it leaves with the status, where initial metadata costs
            # a batch of its own (about a quarter of a small call's server time).
            context.set_trailing_metadata(((REQUEST_ID_HEADER, record.request_id),))
            response = await handler(record)
            record.status = "OK"
            return response
        except asyncio.CancelledError:
            record.status = "CANCELLED"
            raise
        except Exception as exc:  # noqa: BLE001 - every error leaves through GRPC_STATUS
            info = classify(exc)
            if info.kind is ErrorKind.INTERNAL:
                _log.exception("internal error serving %s (request id %s)", route, record.request_id)
            code = GRPC_STATUS[info.kind]
            record.status = code.name
            record.error = info.message
            trailing = ((REQUEST_ID_HEADER, record.request_id),)
            if info.field:
                trailing += ((ERROR_FIELD_METADATA, info.field),)
            # abort() sends the status before it raises: account for the call first, so a client that
            # has its answer also finds it in the metrics and the access log.
            self._finish(route, record)
            finished = True
            await context.abort(code, info.message, trailing_metadata=trailing)
        finally:
            if not finished:
                self._finish(route, record)

    def _finish(self, route: str, record: RequestRecord) -> None:
        self.service.metrics.in_flight.dec()
        self.service.metrics.observe_request(transport="grpc", route=route, status=record.status,
                                             seconds=record.seconds)
        record.emit()

    async def _plan(self, message: pb.PlanRequest, record: RequestRecord, time_remaining_s: float | None):
        message = _decoded(message)
        self.service.check_size(
            num_micro_batches=len(message.micro_batches),
            num_documents=codec.total_documents(message),
            cp_size=message.cp_size,
        )
        request = codec.request_from_pb(message, default_cost_model=self.service.default_cost_model)
        record.micro_batches = len(request.micro_batches)
        record.documents = sum(len(mb) for mb in request.micro_batches)
        record.strategy = request.strategy
        plans = await self.service.plan(request, time_remaining_s=time_remaining_s)
        list_transfers = not message.omit_transfers

        def encode() -> pb.PlanResponse:
            response = pb.PlanResponse(
                request_id=message.request_id or record.request_id, planner_version=planner_version
            )
            for p in plans:
                # In place: extend() would deep-copy every plan.
                codec.plan_to_pb(p, response.plans.add(), list_transfers=list_transfers)
            return response

        return await self.service.encode(plans, encode)

    async def Plan(self, request: pb.PlanRequest, context: grpc.aio.ServicerContext) -> pb.PlanResponse:
        return await self._call(context, "Plan", lambda record: self._plan(request, record, context.time_remaining()))

    async def PlanStream(
        self, request_iterator: AsyncIterator[pb.PlanRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PlanStreamResponse]:
        metadata = dict(context.invocation_metadata() or ())
        stream_id = request_id_from(metadata.get(REQUEST_ID_HEADER))
        await context.send_initial_metadata(((REQUEST_ID_HEADER, stream_id),))
        index = 0
        async for message in request_iterator:
            request_id = getattr(message, "request_id", "") or f"{stream_id}.{index}"
            index += 1
            record = RequestRecord(transport="grpc", route="PlanStream", request_id=request_id)
            self.service.metrics.in_flight.inc()
            try:
                response = await self._plan(message, record, context.time_remaining())
                record.status = "OK"
                out = pb.PlanStreamResponse(request_id=request_id, response=response)
            except asyncio.CancelledError:
                record.status = "CANCELLED"
                raise
            except Exception as exc:  # noqa: BLE001 - reported in-band, the stream goes on
                info = classify(exc)
                if info.kind is ErrorKind.INTERNAL:
                    _log.exception("internal error serving PlanStream (request id %s)", request_id)
                record.status = GRPC_STATUS[info.kind].name
                record.error = info.message
                out = pb.PlanStreamResponse(
                    request_id=request_id, error=pb.Error(code=record.status, field=info.field, message=info.message)
                )
            finally:
                self.service.metrics.in_flight.dec()
                self.service.metrics.observe_request(
                    transport="grpc", route="PlanStream", status=record.status, seconds=record.seconds
                )
                record.emit()
            yield out

    async def _compare(self, message: pb.CompareRequest, record: RequestRecord, time_remaining_s: float | None):
        message = _decoded(message)
        self.service.check_size(
            num_micro_batches=len(message.micro_batches),
            num_documents=codec.total_documents(message),
            cp_size=message.cp_size,
        )
        request, strategies = codec.compare_request_from_pb(message, default_cost_model=self.service.default_cost_model)
        record.micro_batches = len(request.micro_batches)
        record.documents = sum(len(mb) for mb in request.micro_batches)
        record.strategy = ",".join(strategies or ())
        rows = await self.service.compare(request, strategies, time_remaining_s=time_remaining_s)
        return await self.service.encode(
            (c.plan for row in rows for c in row if c.plan is not None),
            lambda: pb.CompareResponse(
                comparisons=codec.comparisons_to_pb(rows, list_transfers=not message.omit_transfers),
                request_id=message.request_id or record.request_id,
                planner_version=planner_version,
            ),
        )

    async def Compare(self, request: pb.CompareRequest, context: grpc.aio.ServicerContext) -> pb.CompareResponse:
        return await self._call(
            context, "Compare", lambda record: self._compare(request, record, context.time_remaining())
        )

    async def _cost_models(self, message: Any, record: RequestRecord) -> pb.ListCostModelsResponse:
        _decoded(message)
        return pb.ListCostModelsResponse(
            cost_models=[codec.cost_model_to_pb(cm) for cm in self.service.cost_models().values()],
            default_cost_model=self.service.default_cost_model.name,
        )

    async def ListCostModels(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ListCostModelsResponse:
        return await self._call(context, "ListCostModels", lambda record: self._cost_models(request, record))

    async def _strategies(self, message: Any, record: RequestRecord) -> pb.ListStrategiesResponse:
        _decoded(message)
        infos = [
            pb.StrategyInfo(
                name=s.name,
                description=s.description,
                is_optimal=s.is_optimal,
                default_comm=codec.comm_to_pb(s.default_comm),
            )
            for s in self.service.strategies().values()
        ]
        return pb.ListStrategiesResponse(strategies=infos, default_strategy=codec.DEFAULT_STRATEGY)

    async def ListStrategies(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ListStrategiesResponse:
        return await self._call(context, "ListStrategies", lambda record: self._strategies(request, record))


def _method_handlers(servicer: PlannerServicer) -> dict[str, grpc.RpcMethodHandler]:
    return {
        "Plan": grpc.unary_unary_rpc_method_handler(
            servicer.Plan,
            request_deserializer=_lenient(pb.PlanRequest),
            response_serializer=pb.PlanResponse.SerializeToString,
        ),
        "PlanStream": grpc.stream_stream_rpc_method_handler(
            servicer.PlanStream,
            request_deserializer=_lenient(pb.PlanRequest),
            response_serializer=pb.PlanStreamResponse.SerializeToString,
        ),
        "Compare": grpc.unary_unary_rpc_method_handler(
            servicer.Compare,
            request_deserializer=_lenient(pb.CompareRequest),
            response_serializer=pb.CompareResponse.SerializeToString,
        ),
        "ListCostModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListCostModels,
            request_deserializer=_lenient(pb.ListCostModelsRequest),
            response_serializer=pb.ListCostModelsResponse.SerializeToString,
        ),
        "ListStrategies": grpc.unary_unary_rpc_method_handler(
            servicer.ListStrategies,
            request_deserializer=_lenient(pb.ListStrategiesRequest),
            response_serializer=pb.ListStrategiesResponse.SerializeToString,
        ),
    }


async def create_server(service: PlannerService, address: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, int]:
    """Build the gRPC server (not started) with the planner, health and reflection services.

    Call inside the event loop that will run it. Messages larger than
    ``service.settings.max_request_bytes`` are refused with RESOURCE_EXHAUSTED
    by grpc itself; health turns NOT_SERVING when the service starts draining.

    Args:
        service: the service object to expose.
        address: ``host:port`` to bind; port 0 picks a free port.

    Returns:
        The server and the port it bound.

    Raises:
        RuntimeError: the address could not be bound.
    """
    limit = service.settings.max_request_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ]
    )
    handlers = _method_handlers(PlannerServicer(service))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)

    health_servicer = health.aio.HealthServicer()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service.add_drain_hook(health_servicer.enter_graceful_shutdown)

    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind gRPC address {address}")
    return server, port
