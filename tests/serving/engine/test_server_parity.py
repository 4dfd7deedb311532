"""The server forwards each photo at the model's input size; its answers stay token-exact with
the reference pipeline fed the original full-size photo (greedy, float32)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from encoders.samples import synthetic_skin_photo
from plugins.skingpt4.template import build_prompt, image_question

pytestmark = pytest.mark.engine

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def reference(server):
    from benchmarks.reference import ReferencePipeline

    return ReferencePipeline(server.folder)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("size,mode,fmt", [((2400, 1800), "RGB", "JPEG"), ((900, 1300), "RGBA", "PNG")])
def test_answers_match_the_reference_on_full_size_photos(server, reference, size, mode, fmt):
    from tests.serving.helpers import data_url, image_message

    data = encoded(synthetic_skin_photo(seed=21, size=size).convert(mode), fmt)
    r = server.client(timeout=300).chat.completions.create(
        model=server.model, messages=[image_message([data_url(data, f"image/{fmt.lower()}")])],
        temperature=0, max_tokens=NEW_TOKENS,
    )
    with Image.open(io.BytesIO(data)) as original:
        want = reference.generate(build_prompt([("user", image_question())]), [original.convert("RGB")],
                                  max_new_tokens=NEW_TOKENS, temperature=0)
    assert r.usage.prompt_tokens == want.prompt_len
    assert r.choices[0].message.content.strip() == want.text
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == len(want.token_ids) == NEW_TOKENS
