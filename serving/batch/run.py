"""``skingpt4 batch MODEL INPUT.jsonl OUTPUT.jsonl``: bulk triage in the OpenAI Batch file format.

Store-and-forward teledermatology queues cases (overnight, say); this runs a whole file of them
through one in-process vLLM engine with continuous batching (up to ``--max-concurrency`` requests
in flight), every line checked by the server's request policy first.

Input, one JSON object a line (OpenAI's Batch input format)::

    {"custom_id": "case-17", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

``url`` is ``/v1/chat/completions`` or ``/v1/completions``; ``body`` is what the server takes on
that route. A line is at most ``max_body_bytes`` (64 MiB), like a request body.

Output, one JSON object a line (OpenAI's Batch output format), in completion order (match lines
by ``custom_id``, as with OpenAI)::

    {"id": "batch_req_...", "custom_id": "case-17",
     "response": {"status_code": 200, "request_id": "chatcmpl-...", "body": {...}}, "error": null}

- answered: status 200 and the body the server sends (the same vLLM serving classes and engine
  options: chat template, generation defaults, ``###`` stop, usage with cached tokens);
- refused, for a line with a usable ``custom_id``: the 4xx status and the OpenAI error body
  ``{"error": {"message", "type", "param", "code"}}`` the server would send for that request
  (a bad photo, a field outside the contract, ``stream``, a prompt beyond the context, an unknown
  model), or for its envelope (``method`` not POST: 400; an unknown ``url``: 404; other keys: 400).
  As OpenAI does for HTTP errors, the error is in ``response.body`` and ``error`` is null;
- a line that cannot be attributed (not JSON, not an object, no usable ``custom_id``, a
  ``custom_id`` already used on an earlier line, over the size limit): ``custom_id`` and
  ``response`` null, ``error`` = ``{"code", "message", "param", "line"}``, the shape of OpenAI's
  batch validation errors. So no ``custom_id`` ever has two records, and the first line with a
  ``custom_id`` is the one that runs.

Reading, checks, refusals and records are :mod:`serving.api.batch_api.runner`'s, shared with the
HTTP Batch API.

Resume: OUTPUT is an append-only log, locked (``flock``) while a run writes it. Each record is
one ``write`` of one whole line, then ``fsync``, so a crash loses at most the lines in flight.
A rerun skips the ``custom_id`` s (and the unattributable line numbers) already in OUTPUT,
first truncating a torn last line (bytes after the last newline) left by a crash; a complete
line that is not a record stops the run before anything is written. Server errors (5xx, an
engine that died) are not written: those lines are retried by a rerun, which exits 1 until every
line has its record.

vLLM reuse: the engine and serving objects are built as in vLLM's own batch runner and server
(``vllm.entrypoints.launchers.run_batch.main`` / ``build_endpoint_registry``):
``build_async_engine_client`` (an in-process ``AsyncLLM`` from ``AsyncEngineArgs``) over the
server's arguments, :meth:`serving.engine.server.EngineConfig.vllm_args`, parsed by vLLM's
server parser as the server parses them (:func:`serving.engine.server.parse_vllm_args`), in the
server's engine environment (:func:`batch_environment`), then ``init_app_state``, which creates the same ``OpenAIServingChat`` and
``OpenAIServingCompletion`` as ``skingpt4 serve``; exceptions become error bodies with vLLM's
``create_error_response``, as in its ``run_request``. vLLM's runner itself reads the whole file,
writes OUTPUT only at the end (no resume), has no ``/v1/completions`` and puts errors in
``error`` with an empty body, so its file handling and record models are not used.

``--ray``: the same run, with the accepted requests answered by the LLM replicas of
``serve --ray`` across a cluster (:mod:`serving.batch.ray_serve`). Reading, checks, refusals,
records and resuming are :class:`serving.api.batch_api.runner.BatchRun`'s either way; only the
:class:`serving.api.batch_api.runner.AnswerEngine` differs.

Privacy: photos are decoded and shrunk in memory (:func:`serving.api.chat.prepare_chat_request`),
never written to disk; request logging stays off and no message here echoes a request body.
vLLM's logs and the progress bar go to stderr.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Awaitable
from functools import partial
from pathlib import Path

from serving.api.routes import CHAT, COMPLETIONS
from serving.api.errors import ServingError, error_for_status
from serving.api.batch_api.lines import DoneRecords, encode_record
from serving.api.batch_api.runner import Answer
from serving.api.policy import ServePolicy
from serving.engine.server import EngineConfig, parse_vllm_args


class OutputError(Exception):
    """OUTPUT cannot be resumed or written (in use, or holds lines that are not records)."""


# --- OUTPUT: an append-only, resumable log ------------------------------------------------------


class OutputLog:
    """OUTPUT opened for appending under an exclusive lock, with what it already answers.

    ``done_ids``: custom_ids with a record; ``done_lines``: input line numbers with an
    unattributable-line record; ``repaired_bytes``: size of the torn last line removed on open.
    """

    def __init__(self, path: Path, fd: int, done_ids: set[str], done_lines: set[int],
                 repaired_bytes: int) -> None:
        self.path = path
        self.fd = fd
        self.done_ids = done_ids
        self.done_lines = done_lines
        self.repaired_bytes = repaired_bytes

    @classmethod
    def open(cls, path: Path) -> OutputLog:
        created = not path.exists()
        # 0o600: the answers are medical; nobody else on the machine needs to read them.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputError(f"{path} is being written by another skingpt4 batch") from None
            done, good, size = _scan_records(path)
            if good < size:  # the torn line of a crash: bytes after the last newline
                os.ftruncate(fd, good)
                os.fsync(fd)
            if created:
                _fsync_dir(path.parent)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, done.ids, done.lines, size - good)

    def write_record(self, record: dict) -> None:
        """Append one whole line and make it durable (blocking: call it off the event loop)."""
        view = memoryview(encode_record(record))
        while view:  # a regular file takes the whole line at once; the loop is for the odd case
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the lock
            self.fd = -1

    def __enter__(self) -> OutputLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _scan_records(path: Path) -> tuple[DoneRecords, int, int]:
    """(what it holds, bytes of complete records, file size) of an existing OUTPUT."""
    done = DoneRecords()
    good = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                break  # only the last line can lack its newline: a torn write
            if not done.note(raw):
                raise OutputError(
                    f"{path} line {number} is not a batch output record; it was not written by "
                    "skingpt4 batch, so it is not resumed: choose another OUTPUT file"
                )
            good += len(raw)
        size = f.seek(0, os.SEEK_END)
    return done, good, size


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def request_models() -> dict:
    """vLLM's request model of each batch route: a checked body becomes one of these."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return {CHAT: ChatCompletionRequest, COMPLETIONS: CompletionRequest}


class BatchEngine:
    """An in-process vLLM engine and the server's OpenAI serving objects over it. ``handlers``:
    for each route, an async function from vLLM's request to what its serving class returns
    (:class:`serving.batch.ray_serve.ServeEngine` gives functions that ask an LLM replica)."""

    def __init__(self, client, handlers: dict, request_models: dict, policy: ServePolicy,
                 max_tokens=None) -> None:
        self.client = client
        self.handlers = handlers
        self.request_models = request_models
        self.policy = policy
        self.max_tokens = max_tokens  # the server's max_tokens check, counting with vLLM's tokenizer

    @property
    def dead(self) -> bool:
        return self.client.errored

    async def submit(self, route: str, body: dict) -> Awaitable[Answer]:
        """The answer to a checked body, to await (the engine starts on it at once)."""
        return self.answer(route, body)

    async def answer(self, route: str, body: dict) -> Answer:
        """(status, response body, request id) as vLLM's server answers a checked body."""
        from serving.engine.errors import engine_error

        try:
            if self.max_tokens is not None:
                await self.max_tokens.check(None, route, body)
            request = self.request_models[route].model_validate(body)
            result = await self.handlers[route](request)
        except ServingError as error:
            return error.status, error.to_dict(), None
        except Exception as exc:  # as vLLM's run_request: the failure becomes an error body
            return *engine_error(exc), None
        return answer_of(result, route)


def answer_of(result, route: str) -> Answer:
    """(status, body, request id) of what a vLLM serving class returned for a whole answer: its
    ``ErrorResponse`` as the project's error body, or the response."""
    from pydantic import BaseModel
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if isinstance(result, ErrorResponse):
        status = int(result.error.code)
        return status, error_for_status(status, result.error.message,
                                        result.error.param).to_dict(), None
    if not isinstance(result, BaseModel):  # a stream; check_envelope refuses those
        raise RuntimeError(f"{route} returned a stream to a batch request")
    response = result.model_dump()
    return 200, response, response.get("id")


@contextlib.asynccontextmanager
async def open_engine(config: EngineConfig) -> AsyncIterator[BatchEngine]:
    """Start the engine with the server's options (set :func:`batch_environment` first);
    shut it down on exit."""
    from starlette.datastructures import State
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.usage.usage_lib import UsageContext

    from serving.api.max_tokens import MaxTokensCheck  # imports torch: not at the CLI's start
    from serving.engine.tokens import count_prompt

    args = parse_vllm_args(config, prog="skingpt4 batch")
    client = state = engine = None
    try:
        async with build_async_engine_client(
            args, usage_context=UsageContext.OPENAI_BATCH_RUNNER
        ) as client:
            state = State()
            await init_app_state(client, state, args, await client.get_supported_tasks())
            engine = BatchEngine(
                client,
                handlers={CHAT: state.openai_serving_chat.create_chat_completion,
                          COMPLETIONS: state.openai_serving_completion.create_completion},
                request_models=request_models(),
                policy=config.served_policy(),
                max_tokens=MaxTokensCheck(counter=partial(count_prompt, partial(
                    state.serving_tokenization.create_tokenize, raw_request=None))),
            )
            try:
                yield engine
            finally:
                # Nothing of vLLM's outlives its engine through the object handed out: the
                # serving objects go before the engine client shuts down.
                engine.handlers, engine.max_tokens = {}, None
    finally:
        # A traceback kept inside vLLM holds this frame; with the engine in its locals,
        # AsyncLLM.__del__ would run at interpreter exit, when the globals it calls are gone.
        client = state = engine = None  # noqa: F841


