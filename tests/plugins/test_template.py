"""The SkinGPT-4 prompt from its one source, ``CHAT_TEMPLATE``: ``build_prompt`` and ``render_chat``
against the literal strings SkinGPT-4's ``Conversation.get_prompt`` writes (no engine, no checkpoint)."""

from __future__ import annotations

import pytest

from plugins.skingpt4.template import DEFAULT_SYSTEM, build_prompt, image_question, render_chat

S = DEFAULT_SYSTEM
Q = "What's wrong with my skin?"
IMG = "<Img><ImageHere></Img>"


@pytest.mark.parametrize("turns,system,expected", [
    pytest.param([("user", image_question())], S, f"{S}###Human: {IMG} {Q}###Assistant:", id="one-photo"),
    pytest.param(
        [("user", image_question("Compare them.", 2))], S,
        f"{S}###Human: {IMG} {IMG} Compare them.###Assistant:", id="two-photos",
    ),
    pytest.param([("user", "Hi")], "Be brief.", "Be brief.###Human: Hi###Assistant:", id="system-override"),
    pytest.param(
        [("user", image_question()), ("assistant", "  Eczema. \n"), ("user", "Is it contagious?")], S,
        f"{S}###Human: {IMG} {Q}###Assistant: Eczema.###Human: Is it contagious?###Assistant:",
        id="answer-stripped",
    ),
    pytest.param(
        [("user", image_question()), ("assistant", " Eczema."), ("user", image_question("And this one?"))], S,
        f"{S}###Human: {IMG} {Q}###Assistant: Eczema.###Human: {IMG} And this one?###Assistant:",
        id="later-turn-new-photo",
    ),
    pytest.param([("user", "  spaced  \n")], "", "###Human:   spaced  \n###Assistant:", id="user-text-kept"),
])
def test_build_prompt_writes_the_skingpt4_conversation(turns, system, expected):
    assert build_prompt(turns, system) == expected


def test_render_chat_takes_openai_parts_in_place():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [
            {"type": "text", "text": "Close-up:"},
            {"type": "image_url", "image_url": {"url": "data:,"}},
            {"type": "text", "text": "and wide:"},
            {"type": "image_url", "image_url": {"url": "data:,"}},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": " Psoriasis. "}]},
        {"role": "user", "content": "Why?"},
    ]
    assert render_chat(messages) == (
        f"Be brief.###Human: Close-up: {IMG} and wide: {IMG}###Assistant: Psoriasis.###Human: Why?###Assistant:"
    )
    assert render_chat(messages[:3], add_generation_prompt=False).endswith("###Assistant: Psoriasis.")


def test_build_prompt_rejects_an_unknown_role():
    with pytest.raises(ValueError, match="'tool'"):
        build_prompt([("tool", "x")])
