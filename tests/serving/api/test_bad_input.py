"""Bad input gets a 4xx whose message names the problem, and the server answers the next good
request. One test per case, all against the session's server."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import pytest
from PIL import Image

from encoders.samples import encode_image, synthetic_skin_photo
from tests.serving.helpers import MAX_IMAGES, data_url, image_message


def post(server, body: dict, **kw) -> httpx.Response:
    body = {"model": server.model, "max_tokens": 4, **body}
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body,
                      headers=server.headers(), timeout=120, **kw)


def assert_refused(server, response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for word in words:
        assert word.lower() in message.lower(), message
    good = server.client().chat.completions.create(
        model=server.model, max_tokens=4, temperature=0,
        messages=[image_message([data_url(encode_image(synthetic_skin_photo(seed=9)))])],
    )
    assert good.choices[0].message.content is not None
    assert good.usage.completion_tokens == 4


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a token of pixel data (a bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_invalid_base64(server):
    r = post(server, {"messages": [image_message(["data:image/jpeg;base64,@@not-base64@@"])]})
    assert_refused(server, r, 400, "invalid base64", "messages[0].content[0]")


def test_bytes_that_are_not_an_image(server):
    url = data_url(b"%PDF-1.4 this is a document, not a photo" * 10)
    assert_refused(server, post(server, {"messages": [image_message([url])]}), 400, "not an image")


def test_truncated_jpeg(server):
    jpeg = encode_image(synthetic_skin_photo(seed=3))
    url = data_url(jpeg[: len(jpeg) // 2])
    assert_refused(server, post(server, {"messages": [image_message([url])]}), 400, "truncated")


def test_one_pixel_image(server):
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 120, 100)).save(buf, format="PNG")
    url = data_url(buf.getvalue(), "image/png")
    assert_refused(server, post(server, {"messages": [image_message([url])]}), 400, "1x1", "at least")


def test_decompression_bomb(server):
    url = data_url(png_header_only(30000, 30000), "image/png")
    r = post(server, {"messages": [image_message([url])]})
    assert_refused(server, r, 413, f"over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels",
                   "the limit is")


def test_more_images_than_allowed(server):
    url = data_url(encode_image(synthetic_skin_photo(seed=4)))
    r = post(server, {"messages": [image_message([url] * (MAX_IMAGES + 1))]})
    assert_refused(server, r, 400, f"{MAX_IMAGES + 1} images", f"limit is {MAX_IMAGES}")


def test_prompt_longer_than_the_context(server, photo_urls):
    r = post(server, {"messages": [image_message(photo_urls[:1], "itchy " * 3000)]})
    assert_refused(server, r, 400, "maximum context length")


@pytest.mark.parametrize("max_tokens,words", [(-5, ("max_tokens", "at least 1")),
                                              (10**6, ("max_tokens", "maximum context length", "tokens are left"))])
def test_bad_max_tokens(server, photo_urls, max_tokens, words):
    r = post(server, {"messages": [image_message(photo_urls[:1])], "max_tokens": max_tokens})
    assert_refused(server, r, 400, *words)


def test_absurd_n(server, photo_urls):
    r = post(server, {"messages": [image_message(photo_urls[:1])], "n": 100000})
    assert_refused(server, r, 400, "n is 100000")


def test_invalid_json_schema(server, photo_urls):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "diagnosis"}}}
    r = post(server, {"messages": [image_message(photo_urls[:1])], "response_format": fmt})
    assert_refused(server, r, 400, "not a valid JSON schema")


def test_schema_the_engine_cannot_compile(server, photo_urls):
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^[a-z]{1,400}$"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    r = post(server, {"messages": [image_message(photo_urls[:1])], "response_format": fmt})
    assert_refused(server, r, 400, "cannot compile")


def test_unknown_model(server, photo_urls):
    r = post(server, {"messages": [image_message(photo_urls[:1])], "model": "gpt-derm-9000"})
    assert_refused(server, r, 404, "gpt-derm-9000", "does not exist")


@pytest.mark.parametrize("token", ["<ImageHere>", "<ImagePad>"])
def test_reserved_token_in_user_text(server, photo_urls, token):
    r = post(server, {"messages": [image_message(photo_urls[:1], f"Look here {token} please")]})
    assert_refused(server, r, 400, "reserved token", token)


def test_reserved_token_in_plain_string_content(server):
    r = post(server, {"messages": [{"role": "user", "content": "<Img><ImageHere></Img> hi"}]})
    assert_refused(server, r, 400, "reserved token")


def test_empty_messages(server):
    assert_refused(server, post(server, {"messages": []}), 400, "messages must be a non-empty list")


def test_body_that_is_not_json(server):
    r = httpx.post(f"{server.base_url}/v1/chat/completions", content=b"{not json",
                   headers={**server.headers(), "content-type": "application/json"})
    assert_refused(server, r, 400, "not valid JSON")


def test_oversized_header(server):
    r = httpx.get(f"{server.base_url}/v1/models", headers={**server.headers(), "X-Padding": "a" * 100_000})
    assert_refused(server, r, 431, "headers", "limit")


def test_oversized_body(server):
    huge = base64.b64encode(b"\0" * (70 * 2**20)).decode()
    r = post(server, {"messages": [image_message([f"data:image/png;base64,{huge}"])]})
    assert_refused(server, r, 413, "limit")


@pytest.mark.parametrize("part", [
    {"image_url": {"url": "data:image/png;base64,AAAA"}},  # no type: vLLM would still take it
    {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
    {"type": "input_text", "text": "<ImageHere>"},
])
def test_other_part_types_are_refused(server, part):
    r = post(server, {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}]})
    assert_refused(server, r, 400, "is not accepted", "'text' or 'image_url'")


def test_token_id_prompts_are_refused(server):
    r = httpx.post(f"{server.base_url}/v1/completions", headers=server.headers(), timeout=60,
                   json={"model": server.model, "prompt": [1, 804, 805], "max_tokens": 4})
    assert_refused(server, r, 400, "token-id prompts are not accepted")


def test_completions_text_prompt_is_checked_and_served(server):
    r = httpx.post(f"{server.base_url}/v1/completions", headers=server.headers(), timeout=60,
                   json={"model": server.model, "prompt": "Human: hi <ImagePad>", "max_tokens": 4})
    assert_refused(server, r, 400, "reserved token")
    ok = httpx.post(f"{server.base_url}/v1/completions", headers=server.headers(), timeout=60,
                    json={"model": server.model, "prompt": "Itchy red skin:", "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("url,words", [("http://[::1/a.jpg", ("malformed",)),
                                       ("http://images.example.org:99999/a.jpg", ("malformed",))])
def test_malformed_image_urls(server, url, words):
    assert_refused(server, post(server, {"messages": [image_message([url])]}), 400, *words)


def test_deeply_nested_json(server):
    body = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = httpx.post(f"{server.base_url}/v1/chat/completions", content=body,
                   headers={**server.headers(), "content-type": "application/json"})
    assert_refused(server, r, 400, "nested too deeply")
