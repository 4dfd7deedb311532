"""What the load generator asks: the benchmark scenarios as lists of conversations.

- ``single``: one photo, one question (the demo's first turn).
- ``consult``: the SkinGPT-4 paper's protocol: one photo, the four ``CONSULT_QUESTIONS`` in one
  growing conversation (describe, other features, causes, treatment); each turn is sent after the
  previous answer, with the whole history.
- ``multi-image``: two photos and one question in one request.

Photos are ``encoders.samples.synthetic_skin_photo`` images, deterministic in (seed, size), sent
as JPEG data URLs. Every conversation gets its own photo seeds, so no two conversations share an
image (a prefix cache can reuse an image only within its conversation).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Literal, get_args

from encoders.samples import encode_image, synthetic_skin_photo
from plugins.skingpt4.template import CONSULT_QUESTIONS, DEFAULT_QUESTION

ScenarioName = Literal["single", "consult", "multi-image"]
SCENARIOS: tuple[str, ...] = get_args(ScenarioName)
IMAGES_PER_CONVERSATION = {"single": 1, "consult": 1, "multi-image": 2}


def parse_image_size(text: str) -> tuple[int, int]:
    """``"512x384"`` -> (512, 384)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"image size {text!r} is not WIDTHxHEIGHT, e.g. 512x384") from None
    if w < 1 or h < 1:
        raise ValueError(f"image size {text!r} must be positive")
    return w, h


def photo_data_url(seed: int, size: tuple[int, int]) -> str:
    jpeg = encode_image(synthetic_skin_photo(seed=seed, size=size))
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _image_part(seed: int, size: tuple[int, int]) -> dict:
    return {"type": "image_url", "image_url": {"url": photo_data_url(seed, size)}}


def _text_part(text: str) -> dict:
    return {"type": "text", "text": text}


@dataclass(frozen=True)
class Conversation:
    """One unit of work: user turns sent one after another, each after the previous answer."""

    index: int
    user_turns: tuple[list[dict] | str, ...]
    """OpenAI ``content`` of each user message: content parts or plain text."""


def _user_turns(scenario: ScenarioName, seeds: list[int], size: tuple[int, int]) -> tuple:
    if scenario == "single":
        return ([_image_part(seeds[0], size), _text_part(DEFAULT_QUESTION)],)
    if scenario == "multi-image":
        return ([_image_part(s, size) for s in seeds] + [_text_part(DEFAULT_QUESTION)],)
    first, *rest = CONSULT_QUESTIONS
    return ([_image_part(seeds[0], size), _text_part(first)], *rest)


def build_conversations(
    scenario: ScenarioName, count: int, image_size: tuple[int, int], seed: int = 0
) -> list[Conversation]:
    """``count`` conversations; photo seeds start at ``seed`` and never repeat within the list."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {SCENARIOS}")
    per = IMAGES_PER_CONVERSATION[scenario]
    return [
        Conversation(i, _user_turns(scenario, [seed + i * per + k for k in range(per)], image_size))
        for i in range(count)
    ]


def turns_per_conversation(scenario: ScenarioName) -> int:
    return len(CONSULT_QUESTIONS) if scenario == "consult" else 1
