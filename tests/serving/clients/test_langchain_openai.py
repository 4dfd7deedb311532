"""langchain-openai (pinned in requirements/clients/langchain-openai.txt) against the server:
``ChatOpenAI`` on chat and on the Responses API (``use_responses_api=True``), ``invoke`` and
``stream``, and ``with_structured_output`` (json_schema). It has no Files/Batch interface."""

from __future__ import annotations

import pytest

from tests.serving.clients.helpers import check_interface, python_driver

pytestmark = pytest.mark.clients

INTERFACES = ["chat", "chat_stream", "chat_structured",
              "responses", "responses_stream", "responses_structured"]


@pytest.fixture(scope="module")
def results(job):
    return python_driver("langchain-openai", "drive_langchain_openai.py", job)


@pytest.mark.parametrize("interface", INTERFACES)
def test_greedy_answer_is_the_plain_sdks(results, reference, interface):
    check_interface(results, reference, interface)
