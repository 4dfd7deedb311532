"""Batch files in OpenAI's Batch format: the input's lines and their envelope, and the records
a run writes. Shared by ``skingpt4 batch`` and the HTTP Batch API through
:mod:`serving.api.batch_api.runner`.

Input, one JSON object a line::

    {"custom_id": "case-17", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Records, one JSON object a line (OpenAI's Batch output format)::

    {"id": "batch_req_...", "custom_id": "case-17",
     "response": {"status_code": 200, "request_id": "chatcmpl-...", "body": {...}}, "error": null}

A refused request has its 4xx status and OpenAI error body in ``response``; a line that cannot be
attributed to a ``custom_id`` has ``custom_id`` and ``response`` null and ``error`` =
``{"code", "message", "param", "line"}``. Server errors (5xx) are not recorded: a later pass
retries them. Imports neither vLLM nor Ray.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from serving.api.errors import InvalidRequest, NotFound, ServingError
from serving.api.routes import BATCH_ROUTES
from serving.api.strict_json import parse_json

LINE_KEYS = ("custom_id", "method", "url", "body")
MAX_CUSTOM_ID_CHARS = 512


# --- records ----------------------------------------------------------------------------------


def _record_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def response_record(custom_id: str, status: int, body: dict, request_id: str | None = None) -> dict:
    """A request that got an HTTP answer (200, or the 4xx the server would send); an error
    body carries the record's ``request_id`` as a live error does."""
    request_id = request_id or f"req_{uuid.uuid4().hex}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error["request_id"] = request_id
    return {
        "id": _record_id(),
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": None,
    }


def refusal_record(custom_id: str, error: ServingError) -> dict:
    """The status and OpenAI error body the server's middleware sends for ``error``."""
    return response_record(custom_id, error.status, error.to_dict())


@dataclass(frozen=True)
class LineError:
    """A line that cannot be attributed to a ``custom_id``; reported by its line number."""

    line: int
    code: str
    message: str
    param: str | None = None

    def record(self) -> dict:
        error = {"code": self.code, "message": self.message, "param": self.param, "line": self.line}
        return {"id": _record_id(), "custom_id": None, "response": None, "error": error}


def encode_record(record: dict) -> bytes:
    """One line of JSON (strings escape their newlines), UTF-8."""
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate somewhere: escape everything instead
        return (json.dumps(record) + "\n").encode("ascii")


class DoneRecords:
    """What a record log holds already, for a resumed run to skip: the ``custom_id`` of each
    request with a record (``ids``), and the number of each line refused before a custom_id
    could be read (``lines``). The one reading of records that the Batch API's
    :class:`serving.api.batch_api.records.SplitLog` and ``skingpt4 batch``'s OUTPUT file share."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.lines: set[int] = set()

    def note(self, raw: bytes) -> bool:
        """Note the record ``raw`` (one encoded line); False when it is not an output record."""
        key = record_key(raw)
        if key is None:
            return False
        if key[0] == "id":
            self.ids.add(key[1])
        else:
            self.lines.add(key[1])
        return True


def record_key(raw: bytes) -> tuple[str, str | int] | None:
    """``("id", custom_id)`` or ``("line", n)`` for an output record; None for anything else."""
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict) or "custom_id" not in record:
        return None
    custom_id = record["custom_id"]
    if isinstance(custom_id, str) and custom_id:
        return ("id", custom_id)
    error = record.get("error")
    if custom_id is None and isinstance(error, dict) and type(error.get("line")) is int:
        return ("line", error["line"])
    return None


# --- INPUT: lines and their envelope -----------------------------------------------------------


@dataclass(frozen=True)
class TooLarge:
    size: int


def read_lines(f: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | TooLarge]]:
    """(1-based line number, bytes) for each line; a line over ``limit`` bytes is skipped
    without being held in memory, and reported as :class:`TooLarge`."""
    number = 0
    while raw := f.readline(limit + 1):
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            size = len(raw)
            while chunk := f.readline(2**20):
                size += len(chunk)
                if chunk.endswith(b"\n"):
                    break
            yield number, TooLarge(size)
        else:
            yield number, raw


def count_lines(path: Path) -> int:
    """Lines in ``path`` (the progress bar's total), without reading it as lines."""
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(2**22):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


@dataclass
class BatchLine:
    """A line with a usable ``custom_id``: a request to check and run, or its refusal."""

    line: int
    custom_id: str
    route: str = ""
    body: Any = None
    refusal: ServingError | None = None


def parse_line(line: int, raw: bytes) -> BatchLine | LineError:
    """The line's ``custom_id`` and request, or why it cannot be attributed."""

    try:
        obj = parse_json(raw)
    except InvalidRequest as exc:
        message = exc.message  # "the request body is not valid JSON (...)": name the line
        if "the request body" in message:
            message = message.replace("the request body", f"line {line}", 1)
        else:
            message = f"line {line}: {message}"
        return LineError(line, "invalid_json_line", message)
    if not isinstance(obj, dict):
        return LineError(
            line, "invalid_json_line",
            f"line {line} is a JSON {type(obj).__name__}, not an object with custom_id, method, "
            "url and body",
        )
    custom_id = obj.get("custom_id")
    if custom_id is None:
        return LineError(
            line, "missing_custom_id",
            f"line {line} has no custom_id; each line needs a unique custom_id to match its answer",
            "custom_id",
        )
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID_CHARS:
        return LineError(
            line, "invalid_custom_id",
            f"line {line}: custom_id must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters "
            f"(got {type(custom_id).__name__})",
            "custom_id",
        )
    try:
        route, body = check_envelope(obj)
    except ServingError as error:
        return BatchLine(line, custom_id, refusal=error)
    return BatchLine(line, custom_id, route, body)


def duplicate_line(line: BatchLine, first: int) -> LineError:
    """A line whose ``custom_id`` line ``first`` already has."""
    return LineError(
        line.line, "duplicate_custom_id",
        f"line {line.line}: custom_id {line.custom_id!r} is already used on line {first}; "
        "custom_ids must be unique, so this line was not run", "custom_id",
    )


def check_envelope(obj: dict) -> tuple[str, Any]:
    """The route and body of a batch line; refuse what the server would not serve as asked."""
    for key in obj:
        if key not in LINE_KEYS:
            raise InvalidRequest(
                f"unknown field {key!r} in the batch line; a line holds {', '.join(LINE_KEYS)}",
                param=str(key),
            )
    method = obj.get("method")
    if method != "POST":
        raise InvalidRequest(f"method is {method!r}; batch requests use POST", param="method")
    url = obj.get("url")
    if url not in BATCH_ROUTES:
        raise NotFound(
            f"url {url!r} is not served; a batch line calls {' or '.join(BATCH_ROUTES)}", param="url"
        )
    if "body" not in obj:
        raise InvalidRequest(f"body is missing: the {url} request", param="body")
    body = obj["body"]
    if isinstance(body, dict) and body.get("stream") is True:
        raise InvalidRequest(
            "stream: a batch answer is one whole response; remove stream", param="stream"
        )
    return url, body
