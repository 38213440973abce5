"""Errors the service adds to the core's, and one transport-neutral classification.

The core raises :class:`~flashcp_planner.errors.InvalidRequest` and
:class:`~flashcp_planner.errors.Infeasible`; the service adds size, load,
shutdown and deadline errors. :func:`classify` turns any of them into an
:class:`ErrorInfo`; each transport maps :class:`ErrorKind` to its own status
codes in exactly one table (``grpc_server.GRPC_STATUS``, ``http_app.HTTP_STATUS``).
No web or gRPC import here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from flashcp_planner.errors import Infeasible, InvalidRequest

__all__ = [
    "DeadlineExceeded",
    "ErrorInfo",
    "ErrorKind",
    "Overloaded",
    "RequestTooLarge",
    "ServiceError",
    "ShuttingDown",
    "classify",
]


class ServiceError(Exception):
    """Base of the errors raised by the service layer (not by the planning core).

    Attributes:
        field: the request field the error is about, or ``""``.
    """

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class RequestTooLarge(ServiceError):
    """The request exceeds a size limit (documents, micro-batches, bytes)."""


class Overloaded(ServiceError):
    """Every solver slot is busy; retry later."""


class ShuttingDown(ServiceError):
    """The server is draining and accepts no new work."""


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed before the work could finish."""


class ErrorKind(enum.Enum):
    """What went wrong, independent of the transport."""

    INVALID = "invalid_request"
    INFEASIBLE = "infeasible"
    TOO_LARGE = "too_large"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    DEADLINE = "deadline_exceeded"
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorInfo:
    """An error as every transport reports it."""

    kind: ErrorKind
    field: str
    """Offending request field (dotted path), or ``""``."""
    message: str
    """Human-readable explanation, naming the field when there is one."""


def classify(exc: BaseException) -> ErrorInfo:
    """Classify an exception raised while serving a request.

    Anything that is neither a core error nor a :class:`ServiceError` is
    ``INTERNAL`` with a generic message (the details go to the server log).
    """
    if isinstance(exc, InvalidRequest):
        return ErrorInfo(kind=ErrorKind.INVALID, field=exc.field, message=str(exc))
    if isinstance(exc, Infeasible):
        return ErrorInfo(kind=ErrorKind.INFEASIBLE, field="", message=f"infeasible request: {exc}")
    kinds = {
        RequestTooLarge: ErrorKind.TOO_LARGE,
        Overloaded: ErrorKind.OVERLOADED,
        ShuttingDown: ErrorKind.UNAVAILABLE,
        DeadlineExceeded: ErrorKind.DEADLINE,
    }
    for cls, kind in kinds.items():
        if isinstance(exc, cls):
            return ErrorInfo(kind=kind, field=exc.field, message=str(exc))
    return ErrorInfo(kind=ErrorKind.INTERNAL, field="", message="internal error; see the server log")
