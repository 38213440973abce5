"""Request ids and the one-JSON-line-per-request access log."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

__all__ = ["REQUEST_ID_HEADER", "JsonFormatter", "LogFields", "RequestRecord", "request_id_from"]

REQUEST_ID_HEADER = "x-request-id"
"""HTTP header and gRPC metadata key carrying the request id (honoured, else generated)."""

_VALID_ID = re.compile(r"^[A-Za-z0-9._:/=+-]{1,128}$")
_access_logger = logging.getLogger("flashcp_service.access")


def request_id_from(value: str | None) -> str:
    """The caller's request id when it is a sane token (<= 128 safe characters), else a new one."""
    if value and _VALID_ID.match(value):
        return value
    return uuid.uuid4().hex


@dataclass(slots=True, kw_only=True)
class RequestRecord:
    """What the access log line of one request says; filled in while it is served."""

    transport: str
    """``"http"`` or ``"grpc"``."""
    route: str
    """HTTP path template or gRPC method name."""
    request_id: str
    status: str = ""
    """HTTP status code or gRPC status name."""
    micro_batches: int = 0
    documents: int = 0
    strategy: str = ""
    error: str = ""
    """Error message returned to the caller, if any."""
    started: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def emit(self) -> None:
        """Write the access log line (INFO, one JSON object)."""
        if not _access_logger.isEnabledFor(logging.INFO):
            return
        line = LogFields(
            transport=self.transport,
            route=self.route,
            request_id=self.request_id,
            status=self.status,
            micro_batches=self.micro_batches,
            documents=self.documents,
            strategy=self.strategy,
        )
        if self.error:
            line["error"] = self.error
        line["duration_ms"] = round(self.seconds * 1e3, 3)
        _access_logger.info(line)


class LogFields(dict):
    """A log message made of JSON fields: :class:`JsonFormatter` merges them into its object as they are;
    any other formatter prints them as one JSON object (``str``), so no JSON is built unless asked."""

    __slots__ = ()

    def __str__(self) -> str:
        return json.dumps(self, separators=(",", ":"))


class JsonFormatter(logging.Formatter):
    """Formats every record as one JSON object; messages that are JSON objects are merged in, not quoted."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if isinstance(record.msg, LogFields) and not record.args:
            out.update(record.msg)
        else:
            message = record.getMessage()
            try:
                fields = json.loads(message) if message.startswith("{") else None
            except ValueError:
                fields = None
            if isinstance(fields, dict):
                out.update(fields)
            else:
                out["message"] = message
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))
