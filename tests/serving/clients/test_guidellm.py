"""guidellm (pinned in requirements/clients/guidellm.txt) against the server: ``guidellm run`` on
``/v1/chat/completions`` and ``/v1/responses``, streamed and not, each run three requests of the
consult, greedy. guidellm sends the question before the photo, so its answers are compared with
the plain SDK's for that order. It has no structured-output or Files/Batch interface."""

from __future__ import annotations

import pytest

from tests.serving.clients.helpers import MAX_TOKENS, python_driver

pytestmark = pytest.mark.clients

INTERFACES = ["chat", "chat_stream", "responses", "responses_stream"]


@pytest.fixture(scope="module")
def results(job):
    return python_driver("guidellm", "drive_guidellm.py", job)


@pytest.mark.parametrize("interface", INTERFACES)
def test_greedy_answer_is_the_plain_sdks(results, reference, interface, job):
    got = results[interface]
    assert "error" not in got, f"{interface}: {got['error']}"
    # Three requests are sent; guidellm 0.8.1's report now and then lists two of them (none
    # errored or incomplete), so it holds one to three answers, each the plain SDK's.
    assert 1 <= len(got["texts"]) <= 3 and (got["errored"], got["incomplete"]) == (0, 0)
    route = interface.removesuffix("_stream")
    assert got["texts"] == [reference["text_first"][route]] * len(got["texts"])
    # What guidellm sent: the consult's question, then the photo unchanged, greedy.
    sent = got["sent"]
    assert sent["temperature"] == 0 and sent.get("stream", False) == interface.endswith("_stream")
    if route == "chat":
        assert sent["max_completion_tokens"] == MAX_TOKENS
        assert sent["messages"] == [{"role": "user", "content": [
            {"type": "text", "text": job["question"]},
            {"type": "image_url", "image_url": {"url": "<photo>"}}]}]
    else:
        assert sent["max_output_tokens"] == MAX_TOKENS
        assert sent["input"] == [{"role": "user", "content": [
            {"type": "input_text", "text": job["question"]},
            {"type": "input_image", "image_url": "<photo>"}]}]
