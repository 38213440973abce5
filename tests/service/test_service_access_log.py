"""Request ids and the JSON log format."""

from __future__ import annotations

import json
import logging

from flashcp_service.access_log import JsonFormatter, RequestRecord, request_id_from


def test_request_ids_are_honoured_only_when_sane() -> None:
    assert request_id_from("step-12/rank:3.a=b+c_d") == "step-12/rank:3.a=b+c_d"
    for bad in (None, "", "x" * 129, "has space", "new\nline", '{"json":1}'):
        generated = request_id_from(bad)
        assert generated != bad and len(generated) == 32


def test_access_lines_are_single_json_objects(caplog) -> None:
    record = RequestRecord(transport="grpc", route="Plan", request_id="r1", status="OK", micro_batches=2,
                           documents=9, strategy="flashcp")
    with caplog.at_level(logging.INFO, logger="flashcp_service.access"):
        record.emit()
    line = JsonFormatter().format(caplog.records[-1])
    assert "\n" not in line
    fields = json.loads(line)
    assert fields["logger"] == "flashcp_service.access" and fields["level"] == "info"
    assert {k: fields[k] for k in ("transport", "route", "request_id", "status", "documents")} == {
        "transport": "grpc", "route": "Plan", "request_id": "r1", "status": "OK", "documents": 9
    }
    assert fields["duration_ms"] >= 0 and "error" not in fields and fields["ts"].endswith("Z")


def test_plain_messages_and_exceptions_stay_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("flashcp_service", logging.ERROR, __file__, 1, "failed: %s", ("x",), sys.exc_info())
    fields = json.loads(JsonFormatter().format(record))
    assert fields["message"] == "failed: x" and "ValueError: boom" in fields["exception"]
