"""What the load generator asks: the benchmark scenarios as lists of conversations.

- ``single``: one photo, one question (the demo's first turn).
- ``consult``: the SkinGPT-4 paper's protocol: one photo, the four ``CONSULT_QUESTIONS`` in one
  growing conversation (describe, other features, causes, treatment); each turn is sent after the
  previous answer, with the whole history.
- ``multi-image``: two photos and one question in one request.
- ``phone``: one phone-camera photo (4000 x 3000 px, a JPEG of about 7 MB, about 10 MB of base64
  in the request body) and one question: the API server's cost of decoding, checking and
  forwarding full-size photos, in CPU time and memory.

Photos are ``encoders.samples.synthetic_skin_photo`` images, deterministic in (seed, size), sent
as JPEG data URLs. Every conversation gets its own photo seeds, so no two conversations share an
image (a prefix cache can reuse an image only within its conversation).

A phone photo takes about half a second to generate, so ``phone`` builds ``PHONE_BASE_PHOTOS``
of them (cached for the process) and gives each conversation its own *variant* of one: the same
JPEG with the conversation's seed written into the low bits of its luminance quantization table
(:func:`phone_photo_variant`). Same size, same decoding work, a different image once decoded,
so neither vLLM's multimodal caches nor its prefix cache see a repeated photo.
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass
from typing import Literal, get_args

from encoders.samples import encode_image, phone_photo_jpeg, synthetic_skin_photo
from plugins.skingpt4.template import CONSULT_QUESTIONS, DEFAULT_QUESTION

ScenarioName = Literal["single", "consult", "multi-image", "phone"]
SCENARIOS: tuple[str, ...] = get_args(ScenarioName)
IMAGES_PER_CONVERSATION = {"single": 1, "consult": 1, "multi-image": 2, "phone": 1}
DEFAULT_IMAGE_SIZE = (512, 384)
PHONE_IMAGE_SIZE = (4000, 3000)  # 12 MP, a phone camera's main sensor
PHONE_BASE_PHOTOS = 4
# Zigzag positions 63, 62, ... of the luminance table carry the variant's bits, one each: the
# highest frequencies, whose step changes by one (about 10% at quality 95) where a bit is set.
VARIANT_BITS = 24


def parse_image_size(text: str) -> tuple[int, int]:
    """``"512x384"`` -> (512, 384)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"image size {text!r} is not WIDTHxHEIGHT, e.g. 512x384") from None
    if w < 1 or h < 1:
        raise ValueError(f"image size {text!r} must be positive")
    return w, h


def default_image_size(scenario: ScenarioName) -> tuple[int, int]:
    return PHONE_IMAGE_SIZE if scenario == "phone" else DEFAULT_IMAGE_SIZE


def _data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def photo_data_url(seed: int, size: tuple[int, int]) -> str:
    return _data_url(encode_image(synthetic_skin_photo(seed=seed, size=size)))


@functools.lru_cache(maxsize=2 * PHONE_BASE_PHOTOS)
def phone_base_photo(index: int, size: tuple[int, int]) -> bytes:
    """Base photo ``index`` of the ``phone`` scenario (generated once per process)."""
    return phone_photo_jpeg(seed=index, size=size)


def luma_table_offset(jpeg: bytes) -> int:
    """Where the 64 entries (zigzag order) of the 8-bit luminance quantization table (table 0)
    start in a baseline JPEG; ValueError if there is none before the scan."""
    pos = 2  # after SOI
    while pos + 4 <= len(jpeg) and jpeg[pos] == 0xFF:
        marker, length = jpeg[pos + 1], int.from_bytes(jpeg[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: no table before it
            break
        if marker == 0xDB:
            seg, end = pos + 4, pos + 2 + length
            while seg < end:
                precision, table = jpeg[seg] >> 4, jpeg[seg] & 0x0F
                if table == 0 and precision == 0:
                    return seg + 1
                seg += 1 + 64 * (2 if precision else 1)
        pos += 2 + length
    raise ValueError("not a JPEG with an 8-bit luminance quantization table")


def phone_photo_variant(jpeg: bytes, variant: int) -> bytes:
    """``jpeg`` with ``variant``'s bits added to its finest luminance quantization steps: a valid
    JPEG of the same size that decodes to slightly different pixels (variant 0: ``jpeg`` itself)."""
    if not 0 <= variant < 2**VARIANT_BITS:
        raise ValueError(f"variant {variant} is outside 0..{2**VARIANT_BITS - 1}")
    out = bytearray(jpeg)
    table = luma_table_offset(jpeg)
    for bit in range(VARIANT_BITS):
        if variant >> bit & 1:
            i = table + 63 - bit
            out[i] = out[i] + 1 if out[i] < 255 else 254
    return bytes(out)


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


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
        return ([_image_part(photo_data_url(seeds[0], size)), _text_part(DEFAULT_QUESTION)],)
    if scenario == "multi-image":
        return ([_image_part(photo_data_url(s, size)) for s in seeds] + [_text_part(DEFAULT_QUESTION)],)
    if scenario == "phone":
        base = phone_base_photo(seeds[0] % PHONE_BASE_PHOTOS, size)
        photo = _data_url(phone_photo_variant(base, seeds[0]))
        return ([_image_part(photo), _text_part(DEFAULT_QUESTION)],)
    first, *rest = CONSULT_QUESTIONS
    return ([_image_part(photo_data_url(seeds[0], size)), _text_part(first)], *rest)


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


def images_in(messages: list[dict]) -> int:
    """Image parts in a chat request's messages (history included: the server decodes them all)."""
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if part.get("type") == "image_url"
    )
