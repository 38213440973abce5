"""Reading document lengths from files or stdin for the CLI.

Accepted forms (the first non-blank character decides):

* JSON (starts with ``[`` or ``{``): a list of integers (one micro-batch), a
  list of lists (several micro-batches), or an object with a
  ``"micro_batches"`` (list of lists) or ``"lengths"`` (list) key.
* Text: integers separated by whitespace and/or commas, one micro-batch;
  ``#`` starts a comment running to the end of the line.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, TextIO

from flashcp_planner.errors import InvalidRequest

__all__ = ["parse_lengths", "read_lengths"]

_FIELD = "lengths"
_SEPARATORS = re.compile(r"[\s,]+")
_INTEGER = re.compile(r"[+-]?\d+")


def read_lengths(source: str, *, stdin: TextIO | None = None) -> list[list[int]]:
    """Read micro-batches of document lengths from a file path, or ``"-"`` for stdin.

    Raises:
        InvalidRequest: unreadable source or malformed content (field ``lengths``).
    """
    if source == "-":
        stream = stdin if stdin is not None else sys.stdin
        try:
            text = stream.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidRequest(_FIELD, f"cannot read stdin: {exc}") from None
        return parse_lengths(text, origin="stdin")
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidRequest(_FIELD, f"file not found: {source}") from None
    except IsADirectoryError:
        raise InvalidRequest(_FIELD, f"{source} is a directory, expected a file") from None
    except UnicodeDecodeError:
        raise InvalidRequest(_FIELD, f"{source} is not a UTF-8 text file") from None
    except OSError as exc:
        raise InvalidRequest(_FIELD, f"cannot read {source}: {exc.strerror or exc}") from None
    return parse_lengths(text, origin=source)


def parse_lengths(text: str, *, origin: str = "input") -> list[list[int]]:
    """Parse the text of a lengths file (see module docstring) into micro-batches.

    Raises:
        InvalidRequest: malformed content, an empty list, or a length that is not
            an integer >= 1; the field names the offending entry.
    """
    stripped = text.lstrip()
    if not stripped:
        raise InvalidRequest(_FIELD, f"{origin} holds no document lengths")
    if stripped[0] in "[{":
        return _from_json(stripped, origin)
    return [_from_text(text, origin)]


def _from_text(text: str, origin: str) -> list[int]:
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    tokens = [t for t in _SEPARATORS.split(body) if t]
    if not tokens:
        raise InvalidRequest(_FIELD, f"{origin} holds no document lengths")
    out = []
    for i, token in enumerate(tokens):
        if not _INTEGER.fullmatch(token):
            raise InvalidRequest(f"{_FIELD}[{i}]", f"{_short(token)!r} is not an integer")
        out.append(_check_length(f"{_FIELD}[{i}]", int(token)))
    return out


def _from_json(text: str, origin: str) -> list[list[int]]:
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(_FIELD, f"{origin} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
                             ) from None
    except RecursionError:
        raise InvalidRequest(_FIELD, f"{origin} is nested too deeply") from None
    if isinstance(data, dict):
        if "micro_batches" in data:
            data = data["micro_batches"]
            if not isinstance(data, list) or not all(isinstance(mb, list) for mb in data):
                raise InvalidRequest(f"{_FIELD}.micro_batches", "must be a list of lists of document lengths")
        elif "lengths" in data:
            data = data["lengths"]
        else:
            raise InvalidRequest(_FIELD, 'a JSON object must have a "micro_batches" or a "lengths" key')
    if not isinstance(data, list):
        raise InvalidRequest(_FIELD, "must be a list of document lengths or a list of lists")
    if not data:
        raise InvalidRequest(_FIELD, "the list is empty")
    if all(isinstance(mb, list) for mb in data):
        return [_json_batch(f"{_FIELD}[{i}]", mb) for i, mb in enumerate(data)]
    if any(isinstance(x, list) for x in data):
        raise InvalidRequest(_FIELD, "mixes numbers and lists; use a list of lists for several micro-batches")
    return [_json_batch(_FIELD, data)]


def _json_batch(field: str, values: list[Any]) -> list[int]:
    if not values:
        raise InvalidRequest(field, "micro-batch has no documents")
    out = []
    for j, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(f"{field}[{j}]", f"document length must be an integer, got {_short(repr(value))}")
        out.append(_check_length(f"{field}[{j}]", value))
    return out


def _check_length(field: str, value: int) -> int:
    if value < 1:
        raise InvalidRequest(field, f"document length must be >= 1, got {value}")
    return value


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
