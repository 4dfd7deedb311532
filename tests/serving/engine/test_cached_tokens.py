"""Answers report ``usage.prompt_tokens_details.cached_tokens``: a consult's later turn shows
that the photo's positions and the history came from the prefix cache (streaming and not)."""

from __future__ import annotations

import pytest

from encoders.samples import encode_image, synthetic_skin_photo
from plugins.skingpt4.template import CONSULT_QUESTIONS
from tests.serving.helpers import data_url, image_message

pytestmark = pytest.mark.engine

BLOCK = 32  # the server's KV-cache block on a CPU; whole blocks are reused


def test_later_turns_report_the_reused_prefix(server):
    client = server.client(timeout=300)
    photo = data_url(encode_image(synthetic_skin_photo(seed=31)))
    messages = [image_message([photo], CONSULT_QUESTIONS[0])]
    first = client.chat.completions.create(model=server.model, messages=messages,
                                           temperature=0, max_tokens=8)
    assert first.usage.prompt_tokens_details is not None
    # Everything before the last token of turn 1's prompt is unchanged in turn 2.
    reusable = (first.usage.prompt_tokens - 1) // BLOCK * BLOCK
    assert reusable >= BLOCK  # the system prompt and the photo's 32 positions
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": CONSULT_QUESTIONS[1]}]
    second = client.chat.completions.create(model=server.model, messages=messages,
                                            temperature=0, max_tokens=8)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert reusable <= cached < second.usage.prompt_tokens

    stream = client.chat.completions.create(model=server.model, messages=messages, temperature=0,
                                            max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage][-1]
    assert usage.prompt_tokens_details.cached_tokens >= reusable
