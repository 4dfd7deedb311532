"""What a batch's files hold: the records of its output and error files as they are written
(:class:`SplitLog`), the checks of its input before it starts (:func:`validate_lines`), and the
records of the lines a cancel or expiry left unrun (:func:`record_unrun`)."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable

from serving.api.batch_api import sealed
from serving.api.batch_api.lines import (
    BatchLine,
    DoneRecords,
    LineError,
    TooLarge,
    duplicate_line,
    encode_record,
    parse_line,
    read_lines,
)
from serving.api.policy import ServePolicy

MAX_VALIDATION_ERRORS = 1000


def batch_error(code: str, message: str, param: str | None = None, line: int | None = None) -> dict:
    """One entry of a failed batch's ``errors`` list, as OpenAI gives it."""
    return {"code": code, "message": message, "param": param, "line": line}


class SplitLog:
    """A batch's :class:`serving.api.batch_api.runner.RecordLog`: answered requests (status 200) to
    the output file, everything else to the error file, one sealed frame per record, synced.
    Opening it reads back the records a crashed run left."""

    def __init__(self, output: sealed.SealedWriter, errors: sealed.SealedWriter,
                 on_record: Callable[[bool], None] | None = None) -> None:
        """``on_record``: called with each record written from now on (True: answered)."""
        self.output, self.errors, self.on_record = output, errors, on_record
        self.done = DoneRecords()
        self.done_ids, self.done_lines = self.done.ids, self.done.lines
        self.completed = self.failed = 0
        for writer in (output, errors):
            for frame in writer.existing:
                if not self.done.note(frame):
                    continue
                if writer is output:
                    self.completed += 1
                else:
                    self.failed += 1
            writer.existing = []

    def write_record(self, record: dict) -> None:
        response = record.get("response")
        answered = bool(response) and response.get("status_code") == 200
        writer = self.output if answered else self.errors
        line = encode_record(record)
        writer.write(line)
        writer.sync()
        if answered:
            self.completed += 1
        else:
            self.failed += 1
        if self.on_record is not None:
            self.on_record(answered)
        self.done.note(line)

    def close(self) -> None:
        self.output.close()
        self.errors.close()


def validate_lines(reader: io.BufferedReader, endpoint: str,
                   policy: ServePolicy) -> tuple[list[dict], int]:
    """A batch file's errors as OpenAI lists them (``{code, message, param, line}``, at most
    :data:`MAX_VALIDATION_ERRORS`) and its number of requests. Each line must be a JSON object
    with a unique ``custom_id``, ``method`` POST, ``url`` the batch's endpoint and a ``body``,
    and fit the request size limit; at most ``max_batch_lines`` lines."""
    errors: list[dict] = []
    seen: dict[str, int] = {}
    total = 0

    def add(error: dict) -> None:
        if len(errors) < MAX_VALIDATION_ERRORS:
            errors.append(error)

    try:
        for number, raw in read_lines(reader, policy.max_body_bytes):
            if isinstance(raw, bytes) and not raw.strip():
                continue
            total += 1
            if total > policy.max_batch_lines:
                add(batch_error("too_many_requests", f"the file has more than "
                                f"{policy.max_batch_lines} requests, the most one batch takes; "
                                "split it", line=number))
                break
            if isinstance(raw, TooLarge):
                add(batch_error("line_too_large", f"line {number} is {raw.size} bytes; the limit "
                                f"is {policy.max_body_bytes} bytes", line=number))
                continue
            parsed = parse_line(number, raw)
            if isinstance(parsed, LineError):
                add(batch_error(parsed.code, parsed.message, parsed.param, number))
                continue
            first = seen.setdefault(parsed.custom_id, number)
            if first != number:
                duplicate = duplicate_line(parsed, first)
                add(batch_error(duplicate.code, duplicate.message, duplicate.param, number))
            elif parsed.refusal is not None:
                add(batch_error(parsed.refusal.code, f"line {number}: {parsed.refusal.message}",
                                parsed.refusal.param, number))
            elif parsed.route != endpoint:
                add(batch_error("mismatched_url", f"line {number}: url {parsed.route} differs from "
                                f"the batch's endpoint {endpoint}; every line of a batch calls its "
                                "endpoint", "url", number))
    except sealed.SealedError as exc:
        add(batch_error("unreadable_file", f"the input file cannot be read: {exc}"))
    if not total and not errors:
        add(batch_error("empty_file", "the input file holds no requests"))
    return errors, total


def record_unrun(reader: io.BufferedReader, log: SplitLog, status: str,
                 policy: ServePolicy) -> None:
    """A ``batch_cancelled`` / ``batch_expired`` error record for every request of the input
    that has none yet."""
    code = "batch_cancelled" if status == "cancelled" else "batch_expired"
    message = ("the batch was cancelled before this request ran" if status == "cancelled" else
               "this request could not be run before the batch's completion window ended")
    for number, raw in read_lines(reader, policy.max_body_bytes):
        if isinstance(raw, TooLarge) or not raw.strip():
            continue
        parsed = parse_line(number, raw)
        if isinstance(parsed, BatchLine) and parsed.custom_id not in log.done_ids:
            log.write_record({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": parsed.custom_id,
                              "response": None, "error": {"code": code, "message": message}})
