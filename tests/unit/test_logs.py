"""JSON log lines."""

from __future__ import annotations

import json
import logging

from snpemu.runtime.logs import JsonFormatter


def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("snpemu.x", logging.WARNING, __file__, 1, msg, None, None)
    record.__dict__.update(extra)
    return record


def test_one_json_object_with_extras() -> None:
    line = JsonFormatter("kvm", "kvm").format(_record("hello %s", grpc_port=50073))
    entry = json.loads(line)
    assert entry["level"] == "WARNING"
    assert entry["service"] == "kvm" and entry["instance"] == "kvm"
    assert entry["logger"] == "snpemu.x"
    assert entry["msg"] == "hello %s"
    assert entry["grpc_port"] == 50073
    assert entry["ts"].endswith("Z") and "T" in entry["ts"]
    assert "\n" not in line


def test_exceptions_stay_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = _record("failed")
        record.exc_info = sys.exc_info()
    line = JsonFormatter("rmp", "rmp").format(record)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exc"]


def test_unserialisable_extras_are_stringified() -> None:
    entry = json.loads(JsonFormatter("rmp", "rmp").format(_record("x", obj=object())))
    assert entry["obj"].startswith("<object object")
