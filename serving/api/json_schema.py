"""The JSON schema of a ``json_schema`` output format (chat's ``response_format``, the Responses
API's ``text.format``), checked before vLLM sees it: a schema object of bounded size, valid JSON
Schema, and compiling to a grammar within the policy's time and memory bounds, in a schema
worker process (:attr:`serving.api.admission.Admission.schema_workers`), never on the event loop.
The name ``dermatology_report`` without a schema selects the report schema shipped here."""

from __future__ import annotations

import asyncio
import collections
import json
from functools import lru_cache
from importlib import resources
from typing import Any

from serving.api.admission import Admission
from serving.api.errors import InvalidRequest
from serving.api.workers import JobError, JobFailed, JobTimeout

REPORT_SCHEMA_NAME = "dermatology_report"
MAX_SCHEMA_CHARS = 64 * 1024


@lru_cache(maxsize=1)
def report_schema() -> dict[str, Any]:
    text = resources.files("serving.api").joinpath("schemas/dermatology_report.json").read_text()
    return json.loads(text)


async def check_json_schema(name: Any, schema: Any, where: str, admission: Admission, *,
                            param: str | None = None, compile_param: str | None = None) -> dict:
    """The schema a ``json_schema`` output format asks for (chat's ``response_format``, the
    Responses API's ``text.format``): the shipped report schema for its name, else ``schema``,
    checked: a JSON schema object, at most :data:`MAX_SCHEMA_CHARS`, valid, and compiling to a
    grammar within the policy's bounds. ``where`` names it in messages."""
    if schema is None and name == REPORT_SCHEMA_NAME:
        schema = report_schema()
    if not isinstance(schema, dict):
        raise InvalidRequest(
            f"{where} must be a JSON schema object (or use the name "
            f"{REPORT_SCHEMA_NAME!r} for the built-in report schema)",
            param=param,
        )
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    text = json.dumps(schema, sort_keys=True)
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidRequest(
            f"{where} is {len(text)} characters; the limit is {MAX_SCHEMA_CHARS}", param=param
        )
    try:
        Draft202012Validator.check_schema(schema)
    except RecursionError:
        raise InvalidRequest(f"{where} is nested too deeply", param=param) from None
    except SchemaError as exc:
        path = "/".join(str(p) for p in exc.path) or "(root)"
        raise InvalidRequest(
            f"{where} is not a valid JSON schema at {path}: {exc.message}", param=param
        ) from None
    reason = await grammar_error(text, admission)
    if reason:
        raise InvalidRequest(
            f"{where} is valid JSON Schema but the structured-output engine cannot compile it "
            f"({reason}); simplify it, e.g. keep pattern repetition bounds at or below 128",
            param=compile_param or param,
        )
    return schema


_GRAMMAR_VERDICTS: collections.OrderedDict[str, str | None] = collections.OrderedDict()
GRAMMAR_CACHE_SIZE = 1024


_GRAMMAR_COMPILING: dict[str, asyncio.Future] = {}


async def grammar_error(schema_json: str, admission: Admission) -> str | None:
    """Why the schema's grammar does not compile within the policy's time and memory bounds
    (None: it does). Compiled in a schema worker that is stopped past its time (never on the
    photo workers or the event loop); verdicts are cached by the schema's text, and requests
    that send a schema being compiled wait for that compile, so each text compiles once."""
    if schema_json in _GRAMMAR_VERDICTS:
        _GRAMMAR_VERDICTS.move_to_end(schema_json)
        return _GRAMMAR_VERDICTS[schema_json]
    if schema_json in _GRAMMAR_COMPILING:
        return await asyncio.shield(_GRAMMAR_COMPILING[schema_json])
    future = asyncio.get_running_loop().create_future()
    _GRAMMAR_COMPILING[schema_json] = future
    try:
        verdict = await _compile_verdict(schema_json, admission)
    except BaseException as exc:
        future.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
        future.exception()  # retrieved: waiters get it, nobody else must
        raise
    finally:
        del _GRAMMAR_COMPILING[schema_json]
    future.set_result(verdict)
    _GRAMMAR_VERDICTS[schema_json] = verdict
    if len(_GRAMMAR_VERDICTS) > GRAMMAR_CACHE_SIZE:
        _GRAMMAR_VERDICTS.popitem(last=False)
    return verdict


async def _compile_verdict(schema_json: str, admission: Admission) -> str | None:
    workers = admission.schema_workers
    try:  # the wait for a schema worker is bounded like any admission wait
        async with asyncio.timeout(admission.timeout_s):
            await admission.schema_slots.acquire()
    except TimeoutError:
        raise admission.busy("the request waited too long for a schema compiler",
                             "timeout") from None
    try:
        try:
            reply, _ = await workers.run({}, schema_json.encode("utf-8"))
            return reply["reason"]
        except JobTimeout:
            return f"compiling it takes longer than {workers.timeout_s:g} s"
        except (JobFailed, JobError):
            return f"compiling it needs more than {workers.memory_mb} MiB"
    finally:
        admission.schema_slots.release()
