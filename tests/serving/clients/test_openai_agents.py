"""The OpenAI Agents SDK (pinned in requirements/clients/openai-agents.txt) against the server:
its default model path (the Responses API) with nothing configured but the server's address and
key, streamed and not, with a structured ``output_type``, and its chat-completions model."""

from __future__ import annotations

import pytest

from tests.serving.clients.helpers import check_interface, python_driver

pytestmark = pytest.mark.clients

INTERFACES = ["responses", "responses_stream", "responses_structured",
              "chat", "chat_stream", "chat_structured"]


@pytest.fixture(scope="module")
def results(job):
    # OPENAI_BASE_URL and OPENAI_API_KEY are all the SDK is told. Tracing is turned off: it would
    # export the run's traces to OpenAI's platform, which has nothing to do with the server.
    return python_driver("openai-agents", "drive_openai_agents.py", job,
                         OPENAI_BASE_URL=job["base_url"], OPENAI_API_KEY=job["api_key"],
                         OPENAI_AGENTS_DISABLE_TRACING="1")


@pytest.mark.parametrize("interface", INTERFACES)
def test_greedy_answer_is_the_plain_sdks(results, reference, interface):
    check_interface(results, reference, interface)


def test_streamed_runs_end_with_the_streamed_text(results):
    for interface in ("responses_stream", "chat_stream"):
        got = results[interface]
        assert "error" not in got, got["error"]
        assert got["final_output"] == got["text"]
