"""Remote image fetching without any network: httpx's mock transport stands in for the host, so
the tests see the exact request the server would send."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from encoders.samples import encode_image, synthetic_skin_photo
from serving.api.errors import PayloadTooLarge, RemoteImageFailed, RemoteImageRefused
from serving.api.media import fetch_remote_image
from serving.api.policy import ServePolicy

POLICY = ServePolicy(allowed_media_domains=("images.example.org",), max_image_bytes=2**20)
PUBLIC = "93.184.216.34"


@pytest.fixture
def transport(monkeypatch):
    """Route every AsyncClient through a handler; record what it is asked."""
    seen: list[httpx.Request] = []
    state = {"respond": lambda request: httpx.Response(404)}

    real = httpx.AsyncClient

    def client(*args, **kwargs):
        def handler(request):
            seen.append(request)
            return state["respond"](request)
        return real(*args, transport=httpx.MockTransport(handler), **kwargs)

    monkeypatch.setattr(httpx, "AsyncClient", client)
    return seen, state


def fetch(url: str):
    return asyncio.run(fetch_remote_image(url, POLICY, "part", resolver=lambda host, port: [PUBLIC]))


def test_fetch_goes_to_the_checked_address_with_the_original_host(transport):
    seen, state = transport
    photo = encode_image(synthetic_skin_photo(seed=5))
    state["respond"] = lambda request: httpx.Response(200, content=photo)
    assert fetch("https://images.example.org/cases/1.jpg?size=large") == photo
    (request,) = seen
    assert request.url.host == PUBLIC and (request.url.port or 443) == 443
    assert request.url.path == "/cases/1.jpg" and request.url.query == b"size=large"
    assert request.headers["host"] == "images.example.org"
    assert request.extensions["sni_hostname"] == "images.example.org"


def test_redirects_are_not_followed(transport):
    seen, state = transport
    state["respond"] = lambda request: httpx.Response(302, headers={"location": "http://127.0.0.1/x"})
    with pytest.raises(RemoteImageRefused, match="redirect"):
        fetch("http://images.example.org/a.jpg")
    assert len(seen) == 1


def test_http_errors_and_oversized_bodies(transport):
    _, state = transport
    state["respond"] = lambda request: httpx.Response(404)
    with pytest.raises(RemoteImageFailed, match="HTTP 404"):
        fetch("http://images.example.org/missing.jpg")
    state["respond"] = lambda request: httpx.Response(200, content=b"\0" * (2 * 2**20))
    with pytest.raises(PayloadTooLarge):
        fetch("http://images.example.org/huge.jpg")
