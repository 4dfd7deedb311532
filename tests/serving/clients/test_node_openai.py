"""The official Node ``openai`` package (pinned in node/package-lock.json) against the server:
chat and Responses, streamed and not, structured answers, and the Files and Batch API."""

from __future__ import annotations

import shutil

import pytest

from tests.serving.clients.helpers import NODE_DIR, SETUP_HINT, check_interface, client_env, run_driver

pytestmark = pytest.mark.clients

INTERFACES = ["chat", "chat_stream", "chat_structured",
              "responses", "responses_stream", "responses_structured", "batch"]


@pytest.fixture(scope="module")
def results(job):
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "openai").is_dir():
        pytest.fail(f"node or {NODE_DIR}/node_modules/openai is missing: {SETUP_HINT}")
    return run_driver([node, NODE_DIR / "drive.mjs"], job, client_env())


@pytest.mark.parametrize("interface", INTERFACES)
def test_greedy_answer_is_the_plain_sdks(results, reference, interface):
    check_interface(results, reference, interface)
