"""Errors the engine's serving classes answer with, in the project's shape: a batch record
carries the same error body as the server's response (where the middleware reshapes them)."""

from __future__ import annotations

from serving.api.errors import error_for_status


def engine_error(failure: Exception | str) -> tuple[int, dict]:
    """(status, OpenAI error body with a string ``code``) for what vLLM's server would answer
    for ``failure`` (an exception, or a message)."""
    from vllm.entrypoints.serve import create_error_response

    error = create_error_response(failure).error
    status = int(error.code)
    return status, error_for_status(status, error.message, error.param).to_dict()
