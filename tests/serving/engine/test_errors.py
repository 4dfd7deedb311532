"""Errors from vLLM's serving classes, as batch records carry them: the server's shape."""

from __future__ import annotations

import pytest

from serving.engine.errors import engine_error

pytestmark = pytest.mark.slow  # imports vLLM (several seconds)


def test_engine_errors_have_the_project_shape():
    status, body = engine_error(ValueError("This model's maximum context length is 1024 tokens."))
    assert status == 400
    assert body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["type"] == "BadRequestError"
    status, body = engine_error("max_tokens must be at least 1")
    assert status == 400 and body["error"]["code"] == "invalid_request"
    assert set(body["error"]) == {"message", "type", "param", "code"}
