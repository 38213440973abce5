"""Plan sources: the in-process planner, the planner service over HTTP, and over gRPC.

Every source turns a validated :class:`~flashcp_planner.PlanRequest` into one
:class:`~flashcp_planner.Plan` per micro-batch, or raises:

* :class:`~flashcp_planner.InvalidRequest` / :class:`~flashcp_planner.Infeasible`
  when the service rejects the request itself (HTTP 4xx, gRPC
  ``INVALID_ARGUMENT`` / ``FAILED_PRECONDITION``): the caller's error, never
  retried and never hidden by a fallback;
* :class:`ServiceUnavailable` when the service cannot be reached, is too slow
  or reports a transient failure (worth retrying, then falling back);
* :class:`InvalidServiceResponse` when the service answered with something
  that is not a valid plan set for the request (garbage, wrong lengths, wrong
  CP size): a wrong plan is never returned.

The network sources import ``httpx`` / ``grpc`` lazily, create their
connection on first use and recreate it after a ``fork`` (dataloader workers).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from flashcp_planner import CommMode, CostModel, Infeasible, InvalidRequest, Plan, PlanningError, PlanRequest
from flashcp_planner import plan as embedded_plan
from flashcp_planner.planner import auto_comms
from flashcp_planner.presets import PRESETS, cost_model_to_dict
from flashcp_planner.strategies import STRATEGIES
from flashcp_planner.validation import validate_plan

__all__ = [
    "EmbeddedSource",
    "GrpcSource",
    "HttpSource",
    "InvalidServiceResponse",
    "PlanSource",
    "PlanSourceError",
    "ServiceUnavailable",
    "request_to_wire",
    "source_for_address",
    "verify_plans",
]


class PlanSourceError(PlanningError):
    """A plan source failed for a reason that is not the request's fault."""


class ServiceUnavailable(PlanSourceError):
    """The service could not be reached, timed out or reported a transient failure."""


class InvalidServiceResponse(PlanSourceError):
    """The service answered, but not with a valid plan set for the request."""


@runtime_checkable
class PlanSource(Protocol):
    """Something that plans requests."""

    @property
    def name(self) -> str:
        """``"embedded"`` or the service address, for logs and stats."""
        ...

    def fetch(self, request: PlanRequest, *, timeout_s: float) -> tuple[Plan, ...]:
        """One verified plan per micro-batch of ``request``; ``timeout_s`` bounds one network call."""
        ...

    def close(self) -> None:
        """Release connections; the source may be used again afterwards."""
        ...


class EmbeddedSource:
    """The planning core, in this process."""

    name = "embedded"

    def fetch(self, request: PlanRequest, *, timeout_s: float = 0.0) -> tuple[Plan, ...]:
        """Plan ``request`` with :func:`flashcp_planner.plan` (``timeout_s`` is ignored)."""
        return embedded_plan(request)

    def close(self) -> None:
        """Nothing to release."""


def request_to_wire(request: PlanRequest, *, omit_transfers: bool = True) -> dict[str, Any]:
    """JSON body of ``POST /v1/plan`` for ``request``, as :class:`HttpSource` sends it.

    The cost model travels as its preset name when it is an unmodified preset,
    else as a JSON cost-model object: the fields that differ from the closest preset, named as ``base``.
    ``omit_transfers`` (default: yes) asks the service to leave the KV transfer lists out: the
    client derives them from the segments (:func:`flashcp_planner.kv_transfers`) when it needs them.
    """
    opts = request.options
    body: dict[str, Any] = {
        "micro_batches": [list(lengths) for lengths in request.micro_batches],
        "cp_size": request.cp_size,
        "cost_model": _cost_model_to_wire(request.cost_model),
        "strategy": request.strategy,
        "capacity_slack": request.capacity_slack,
        "options": {
            "allow_sub_group": opts.allow_sub_group,
            "time_limit_s": opts.time_limit_s,
            "num_workers": opts.num_workers,
            "random_seed": opts.random_seed,
        },
    }
    if opts.comm is not None:
        body["options"]["comm"] = opts.comm.value
    if request.capacity is not None:
        body["capacity"] = request.capacity
    if omit_transfers:
        body["omit_transfers"] = True
    return body


def _cost_model_to_wire(cost_model: CostModel) -> str | dict[str, Any]:
    if PRESETS.get(cost_model.name) == cost_model:
        return cost_model.name
    fields = cost_model_to_dict(cost_model)
    best: dict[str, Any] | None = None
    for name, preset in PRESETS.items():
        base = cost_model_to_dict(preset)
        diff = {"base": name, **{k: v for k, v in fields.items() if v != base[k] or k == "name"}}
        if best is None or len(diff) < len(best):
            best = diff
    assert best is not None, "PRESETS is never empty"
    return best


def verify_plans(request: PlanRequest, plans: Sequence[Plan | Mapping[str, Any]], *, source: str) -> tuple[Plan, ...]:
    """Check that ``plans`` is exactly what ``request`` asked for, parsing dicts with :meth:`Plan.from_dict`.

    Every plan must be structurally valid (every token owned exactly once, capacity
    respected, sharding records and transfers consistent with the segments) and match its
    micro-batch: same document lengths, CP size, strategy, cost model name, per-rank capacity
    and communication mode. The predicted costs are the service's and are not re-derived.

    Raises:
        InvalidServiceResponse: anything else, naming the first mismatch.
    """
    if not isinstance(plans, Sequence) or isinstance(plans, (str, bytes)):
        raise InvalidServiceResponse(f"{source}: 'plans' is not a list")
    if len(plans) != len(request.micro_batches):
        raise InvalidServiceResponse(
            f"{source}: returned {len(plans)} plans for {len(request.micro_batches)} micro-batches"
        )
    impl = STRATEGIES.get(request.strategy)
    gpn = request.cost_model.gpus_per_node
    out = []
    for i, (ctx, raw) in enumerate(zip(request.contexts(), plans, strict=True)):
        try:
            if isinstance(raw, Plan):
                validate_plan(raw)
                plan = raw
            elif isinstance(raw, Mapping):
                plan = Plan.from_dict(raw)
            else:
                raise InvalidRequest("plan", f"expected a JSON object, got {type(raw).__name__}")
        except (InvalidRequest, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise InvalidServiceResponse(f"{source}: plans[{i}] is not a valid plan: {exc}") from None
        mismatches = [
            (name, got, want)
            for name, got, want in (
                ("doc_lengths", plan.doc_lengths, ctx.doc_lengths),
                ("cp_size", plan.cp_size, ctx.cp_size),
                ("strategy", plan.strategy, request.strategy),
                ("cost_model", plan.cost_model, request.cost_model.name),
                ("capacity", plan.capacity, ctx.capacity),
                ("comm", plan.comm, _expected_comm(request, impl, ctx.cp_size, plan.comm)),
                ("gpus_per_node", plan.gpus_per_node, gpn if plan.comm is CommMode.NODE_DEDUP else None),
            )
            if got != want
        ]
        if mismatches:
            name, got, want = mismatches[0]
            raise InvalidServiceResponse(
                f"{source}: plans[{i}] does not match the request: {name} is {_short(got)}, expected {_short(want)}"
            )
        out.append(plan)
    return tuple(out)


def _expected_comm(request: PlanRequest, impl: Any, cp_size: int, got: CommMode) -> object:
    """``got`` when the request allows it (:func:`flashcp_planner.auto_comms`), else the first mode it allows."""
    if impl is None:
        return request.options.comm or got
    allowed = auto_comms(request.options.comm, impl.default_comm, cp_size, request.cost_model.gpus_per_node)
    return got if got in allowed else allowed[0]


def _short(value: object, limit: int = 80) -> str:
    text = repr(getattr(value, "value", value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_from_body(status: int, body: bytes) -> PlanningError:
    """The typed error a 4xx response stands for, with the server's field and message."""
    field, message, code = "", body.decode("utf-8", "replace").strip()[:500], ""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, Mapping):
        err = data.get("error", data)
        if isinstance(err, Mapping):
            field = str(err.get("field") or "")
            code = str(err.get("code") or err.get("type") or "")
            message = str(err.get("problem") or err.get("message") or err.get("detail") or message)
        elif isinstance(err, str):
            message = err
        detail = data.get("detail")
        if isinstance(detail, list) and detail and isinstance(detail[0], Mapping):  # FastAPI validation errors
            loc = [str(x) for x in detail[0].get("loc", ()) if x != "body"]
            field = field or ".".join(loc)
            message = str(detail[0].get("msg", message))
        elif isinstance(detail, str) and "error" not in data:
            message = detail
    if status == 409 or "infeasible" in code.lower():
        return Infeasible(message)
    return InvalidRequest(field, _strip_field(field, message) or f"rejected by the service (HTTP {status})")


def _strip_field(field: str, message: str) -> str:
    """The problem part of a ``"field: problem"`` message (the error re-adds the field)."""
    return message[len(field) + 2:] if field and message.startswith(f"{field}: ") else message


class _PerProcess:
    """A lazily created connection object that is recreated in a forked child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._value: Any = None

    def get(self, create: Any) -> Any:
        with self._lock:
            if self._value is None or self._pid != os.getpid():
                self._value = create()
                self._pid = os.getpid()
            return self._value

    def pop(self) -> Any:
        with self._lock:
            value, self._value = (self._value if self._pid == os.getpid() else None), None
            return value


class HttpSource:
    """The planner service's HTTP API (``POST {base_url}/v1/plan``), via ``httpx``.

    Args:
        base_url: ``http://host:port`` (optionally with a path prefix).
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = self.base_url
        self._client = _PerProcess()

    def _new_client(self) -> Any:
        try:
            import httpx
        except ImportError:
            raise ImportError("the HTTP plan source needs httpx: pip install 'flashcp[client]'") from None
        return httpx.Client(base_url=self.base_url, headers={"accept": "application/json"})

    def fetch(self, request: PlanRequest, *, timeout_s: float) -> tuple[Plan, ...]:
        """POST the request (plans without transfer lists: see :func:`request_to_wire`) and verify the plans.

        Raises:
            InvalidRequest, Infeasible: the service rejected the request (4xx).
            ServiceUnavailable: connection failure, timeout, 408/429/5xx.
            InvalidServiceResponse: the body is not a valid plan set for the request.
        """
        client = self._client.get(self._new_client)  # raises a clear ImportError without httpx
        import httpx

        try:
            response = client.post("/v1/plan", json=request_to_wire(request), timeout=timeout_s)
        except httpx.TimeoutException as exc:
            raise ServiceUnavailable(f"{self.name}: no answer within {timeout_s:g} s ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"{self.name}: {type(exc).__name__}: {exc}") from None
        status = response.status_code
        if status in (408, 429) or status >= 500:
            raise ServiceUnavailable(f"{self.name}: HTTP {status}: {response.text[:200]}")
        if status in (404, 405):
            raise InvalidServiceResponse(f"{self.name}: HTTP {status} for POST /v1/plan (is this a FlashCP planner?)")
        if 400 <= status < 500:
            raise _error_from_body(status, response.content)
        if status != 200:
            raise InvalidServiceResponse(f"{self.name}: unexpected HTTP {status}")
        try:
            data = response.json()
        except ValueError as exc:
            raise InvalidServiceResponse(f"{self.name}: response is not valid JSON: {exc}") from None
        if not isinstance(data, Mapping) or "plans" not in data:
            raise InvalidServiceResponse(f"{self.name}: response has no 'plans' field")
        return verify_plans(request, data["plans"], source=self.name)

    def close(self) -> None:
        """Close the HTTP connection pool of this process."""
        client = self._client.pop()
        if client is not None:
            client.close()


class GrpcSource:
    """The planner service's gRPC API (``flashcp.v1.Planner/Plan``).

    Args:
        target: ``host:port``.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.name = f"grpc://{target}"
        self._channel = _PerProcess()

    def _new_channel(self) -> Any:
        try:
            import grpc
        except ImportError:
            raise ImportError("the gRPC plan source needs grpcio: pip install 'flashcp[client]'") from None
        return grpc.insecure_channel(self.target)

    def fetch(self, request: PlanRequest, *, timeout_s: float) -> tuple[Plan, ...]:
        """Call ``Plan`` (asking for plans without transfer lists) and verify the plans.

        Raises:
            InvalidRequest: ``INVALID_ARGUMENT`` (or ``OUT_OF_RANGE``).
            Infeasible: ``FAILED_PRECONDITION``.
            ServiceUnavailable: ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ``RESOURCE_EXHAUSTED``,
                ``ABORTED``, ``CANCELLED``, ``INTERNAL``, ``UNKNOWN``.
            InvalidServiceResponse: any other status, or a reply that is not a valid plan set.
        """
        channel = self._channel.get(self._new_channel)  # raises a clear ImportError without grpcio
        import grpc

        from flashcp import codec
        from flashcp.v1 import planner_pb2_grpc

        stub = planner_pb2_grpc.PlannerStub(channel)
        try:
            # The plans come back without transfer lists: kv_transfers() derives them where needed.
            reply = stub.Plan(codec.request_to_pb(request, omit_transfers=True), timeout=timeout_s)
        except grpc.RpcError as exc:
            error = _error_from_rpc(exc, source=self.name, timeout_s=timeout_s)
            if isinstance(error, ServiceUnavailable):
                # A channel in TRANSIENT_FAILURE waits out its reconnect backoff; a fresh one connects at once
                # when the service is back (a retry or the breaker's half-open trial).
                self.close()
            raise error from None
        plans = []
        for i, message in enumerate(reply.plans):
            try:
                plans.append(codec.plan_from_pb(message, validate=False))  # verify_plans validates
            except (InvalidRequest, ValueError, TypeError, KeyError) as exc:
                raise InvalidServiceResponse(f"{self.name}: plans[{i}] is not a valid plan: {exc}") from None
        return verify_plans(request, plans, source=self.name)

    def close(self) -> None:
        """Close the gRPC channel of this process."""
        channel = self._channel.pop()
        if channel is not None:
            channel.close()


_GRPC_FIELD_METADATA = "flashcp-error-field"
"""Trailing metadata key in which the service names the offending request field."""
_GRPC_TRANSIENT = {
    "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED", "INTERNAL", "UNKNOWN",
}


def _error_from_rpc(exc: Any, *, source: str, timeout_s: float) -> PlanningError:
    """The typed error a failed RPC stands for; the field comes from ``flashcp-error-field`` trailing metadata.

    ``RESOURCE_EXHAUSTED`` naming a field is a request over the server's size limits (HTTP 413): the
    caller's error. Without a field it is overload (HTTP 429): transient.
    """
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    name = getattr(code, "name", "UNKNOWN")
    details = (exc.details() if callable(getattr(exc, "details", None)) else None) or str(code)
    field = ""
    metadata = exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else None
    for key, value in metadata or ():
        if key == _GRPC_FIELD_METADATA:
            field = value if isinstance(value, str) else value.decode()
    if name == "DEADLINE_EXCEEDED":
        return ServiceUnavailable(f"{source}: no answer within {timeout_s:g} s")
    if name in ("INVALID_ARGUMENT", "OUT_OF_RANGE") or (name == "RESOURCE_EXHAUSTED" and field):
        return InvalidRequest(field, _strip_field(field, details))
    if name in _GRPC_TRANSIENT:
        return ServiceUnavailable(f"{source}: {name}: {details}")
    if name == "FAILED_PRECONDITION":
        return Infeasible(details)
    return InvalidServiceResponse(f"{source}: {name}: {details}")


def source_for_address(address: str | None) -> PlanSource:
    """The plan source an address names.

    Args:
        address: ``None`` or ``"embedded"`` for the in-process planner,
            ``"grpc://host:port"``, or ``"http://host:port[/prefix]"`` / ``"https://..."``.

    Raises:
        ValueError: unknown scheme or missing host/port.
    """
    if address is None or address == "embedded":
        return EmbeddedSource()
    if not isinstance(address, str):
        raise ValueError(f"address: must be a string like 'grpc://host:port', got {address!r}")
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("grpc", "http", "https") or not parts.hostname or port is None:
        raise ValueError(
            f"address: expected 'embedded', 'grpc://host:port' or 'http://host:port', got {address!r}"
        )
    if parts.scheme == "grpc":
        if parts.path not in ("", "/"):
            raise ValueError(f"address: a gRPC address takes no path, got {address!r}")
        return GrpcSource(parts.netloc)
    return HttpSource(address)
