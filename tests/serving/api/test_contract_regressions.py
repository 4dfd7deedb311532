"""One small test per failure class found by the HTTP fuzz test (tests/serving/api/test_fuzz.py).

Each sends the shortest request of its class and expects what the request contract promises:
an OpenAI-shaped 4xx JSON error (or, for a sampling parameter that is served, an answer), never
a 5xx, and ``GET /health`` answering 200 afterwards.

Classes, as the fuzz test found them before the request contract existed:
- a photo in a system, developer, tool or unknown-role message: 500 ``AssertionError: Failed to
  apply prompt replacement for mm_items['image'][0]`` raised inside the ASGI app (uvicorn then
  closes the connection; the engine stays up);
- ``truncate_prompt_tokens`` with a photo: the same 500 (the truncation cuts the image
  placeholder out of the prompt);
- ``echo``, ``prompt_logprobs`` or ``repetition_penalty`` with a photo: the engine died (image pad
  id past the LM vocabulary: ``index 805 is out of bounds for dimension 1 with size 804``).
"""

from __future__ import annotations

import httpx
import pytest

from encoders.samples import encode_image, synthetic_skin_photo
from tests.serving.helpers import data_url, image_message

PHOTO = data_url(encode_image(synthetic_skin_photo(seed=5, size=(64, 64))))


def post(server, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    # A new connection per request: after an unhandled error the server closes the socket.
    return httpx.post(f"{server.base_url}{path}", json={"model": server.model, "max_tokens": 4, **body},
                      headers={**server.headers(), "connection": "close"}, timeout=60)


def assert_health(server) -> None:
    r = httpx.get(f"{server.base_url}/health", timeout=10, headers={"connection": "close"})
    assert r.status_code == 200, f"/health answered {r.status_code} after the request"


def assert_client_error(server, r: httpx.Response, *words: str) -> None:
    assert 400 <= r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    error = r.json().get("error")
    assert isinstance(error, dict) and isinstance(error.get("message"), str), r.text[:500]
    for word in words:
        assert word.lower() in error["message"].lower(), error["message"]
    assert_health(server)


def photo_in(role: str) -> list[dict]:
    message = image_message([PHOTO])
    message["role"] = role
    return [message, {"role": "user", "content": "And now?"}]


@pytest.mark.parametrize("role", ["system", "developer", "tool", "unknown"])
def test_photo_outside_a_user_message(server, role):
    # was: 500 "Failed to apply prompt replacement for mm_items['image'][0]"
    r = post(server, {"messages": photo_in(role)})
    assert_client_error(server, r, "messages[0]")


def test_truncate_prompt_tokens_with_a_photo(server):
    # was: 500 "Failed to apply prompt replacement for mm_items['image'][0]"
    r = post(server, {"messages": [image_message([PHOTO])], "truncate_prompt_tokens": 5})
    assert_client_error(server, r, "truncate_prompt_tokens")


@pytest.mark.parametrize("field", [{"echo": True}, {"prompt_logprobs": 1}], ids=["echo", "prompt_logprobs"])
def test_prompt_logprobs_over_a_photo(server, field):
    # was: engine death (IndexError over the image positions), then connection refused
    r = post(server, {"messages": [image_message([PHOTO])], **field})
    assert_client_error(server, r, next(iter(field)))


def test_repetition_penalty_over_a_photo(server):
    # was: engine death; a served sampling parameter, so the answer is a normal completion
    r = post(server, {"messages": [image_message([PHOTO])], "repetition_penalty": 1.5})
    assert r.status_code == 200, f"{r.status_code}: {r.text[:500]}"
    assert r.json()["choices"][0]["message"]["content"] is not None
    assert_health(server)
