"""Image-heavy load is answered or refused with 503, never killed, and memory stays bounded.

32 concurrent chat requests, each with 4 phone-size JPEGs (3800 x 3800 px, about 9 MB each, 46 MB
of JSON per request: inside every documented limit), against the session's server. The server's
admission budget (``SERVER_INFLIGHT_BYTES``, a server flag) lets about three such bodies in at
once; the rest wait, then get a 503 with Retry-After. Memory of the server's whole process tree
is sampled throughout.

The bound: the tree's growth over its idle size stays under the admission budget, plus one
full-size decode per decode slot (the base64 text and its ASCII copy, the decoded bytes, two RGBX copies of the
pixels while EXIF orientation is applied), plus 768 MiB for the allocator's retained arenas,
the small forwarded photos, and the engine's per-request buffers.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from encoders.samples import phone_photo_jpeg
from tests.serving.helpers import SERVER_DECODES, SERVER_INFLIGHT_BYTES

pytestmark = [pytest.mark.engine, pytest.mark.slow]

CONCURRENCY = 32
PHOTOS_PER_REQUEST = 4
SIDE = 3800
SLACK_BYTES = 768 * 2**20


def tree_rss(pid: int) -> int:
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class PeakSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            time.sleep(0.05)


def test_phone_photos_at_high_concurrency(server):
    photos = [phone_photo_jpeg(seed=s, size=(SIDE, SIDE)) for s in range(PHOTOS_PER_REQUEST)]
    assert all(len(p) < 20 * 2**20 for p in photos) and len(photos[0]) > 6 * 2**20
    parts = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(p).decode()}}
             for p in photos]
    body = json.dumps({"model": server.model, "max_tokens": 4, "temperature": 0, "messages": [
        {"role": "user", "content": [*parts, {"type": "text", "text": "What is it?"}]}]}).encode()
    assert len(body) < 64 * 2**20
    del parts

    def send(_):
        with httpx.Client(timeout=180) as client:
            r = client.post(f"{server.base_url}/v1/chat/completions", content=body,
                            headers={**server.headers(), "content-type": "application/json"})
        return r.status_code, r.headers.get("retry-after"), r.json()

    idle = tree_rss(server.process.popen.pid)
    sampler = PeakSampler(server.process.popen.pid)
    sampler.start()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(send, range(CONCURRENCY)))
    sampler.stop.set()
    sampler.join()

    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    answered = [r for status, _, r in results if status == 200]
    assert answered, "no request was answered"
    assert all(r["usage"]["prompt_tokens"] > 4 * 32 for r in answered)
    for status, retry_after, payload in results:
        if status == 503:
            assert retry_after and int(retry_after) >= 1
            assert payload["error"]["code"] == "server_busy"
    per_decode = 4 * 20 * 2**20 + 8 * SIDE * SIDE
    bound = SERVER_INFLIGHT_BYTES + SERVER_DECODES * per_decode + SLACK_BYTES
    growth = sampler.peak - idle
    print(f"\nanswered {len(answered)}/{CONCURRENCY}, refused {statuses.count(503)}; tree RSS idle "
          f"{idle / 2**30:.2f} GiB, peak {sampler.peak / 2**30:.2f} GiB, growth {growth / 2**20:.0f} MiB "
          f"(bound {bound / 2**20:.0f} MiB)")
    assert growth < bound
    health = httpx.get(f"{server.base_url}/health", timeout=10)
    assert health.status_code == 200


BURST = 48
BURST_SIDE = 3000  # 5 MB JPEGs: 28 MB of JSON with four, 84 MB of the budget: six at once
STALLED_IN_BURST = 4


def burst_body(model: str) -> bytes:
    photos = [phone_photo_jpeg(seed=10 + s, size=(BURST_SIDE, BURST_SIDE))
              for s in range(PHOTOS_PER_REQUEST)]
    parts = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,"
                                                 + base64.b64encode(p).decode()}} for p in photos]
    return json.dumps({"model": model, "max_tokens": 4, "temperature": 0, "messages": [
        {"role": "user", "content": [*parts, {"type": "text", "text": "What is it?"}]}]}).encode()


def in_chunks(body: bytes, size: int = 256 * 1024):
    for i in range(0, len(body), size):
        yield body[i:i + size]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_burst_of_large_bodies_is_answered_or_refused_readably_never_reset(server, framing):
    """48 requests with four large photos each arrive at once (with a few stalled uploads
    among them): the budget holds six, so most must wait. Each gets an HTTP answer: 200, or a
    503 with Retry-After (the burst's tail, or a body that gave way so that earlier ones could
    finish), never a reset connection; the budget is free again afterwards."""
    from tests.serving.api.test_starvation_server import stalled_upload

    body = burst_body(server.model)
    cost = 3 * len(body)
    assert SERVER_INFLIGHT_BYTES // cost < BURST // 4  # most of the burst must wait

    def send(_):
        content = body if framing == "content-length" else in_chunks(body)
        try:
            with httpx.Client(timeout=180) as client:
                r = client.post(f"{server.base_url}/v1/chat/completions", content=content,
                                headers={**server.headers(), "content-type": "application/json"})
        except httpx.TransportError as exc:
            return "connection error", type(exc).__name__, None
        return r.status_code, r.headers.get("retry-after"), r.json()

    idle = tree_rss(server.process.popen.pid)
    sampler = PeakSampler(server.process.popen.pid)
    sampler.start()
    start = time.monotonic()
    with ThreadPoolExecutor(BURST + STALLED_IN_BURST) as pool:
        stalled = [pool.submit(stalled_upload, server, False) for _ in range(STALLED_IN_BURST)]
        results = list(pool.map(send, range(BURST)))
        stalled = [f.result() for f in stalled]
    took = time.monotonic() - start
    sampler.stop.set()
    sampler.join()

    statuses = [status for status, _, _ in results]
    assert "connection error" not in statuses, results
    assert set(statuses) <= {200, 503}, statuses
    answered = statuses.count(200)
    assert answered >= SERVER_INFLIGHT_BYTES // cost, statuses
    for status, retry_after, payload in results:
        if status == 503:
            assert retry_after and int(retry_after) >= 1
            assert payload["error"]["code"] == "server_busy"
    assert all(line.split(b" ")[1:2] == [b"400"] for line, _ in stalled), stalled
    growth = sampler.peak - idle
    print(f"\n{framing}: answered {answered}/{BURST}, refused {statuses.count(503)} in {took:.0f} s; "
          f"tree RSS growth {growth / 2**20:.0f} MiB")
    assert growth < 6 * 2**30
    health = httpx.get(f"{server.base_url}/health", timeout=10)
    assert health.status_code == 200


def test_a_burst_through_the_sdk_is_all_answered_by_its_own_retries(server):
    """The same burst through the ``openai`` SDK, whose retries honour Retry-After: every
    request is answered in the end."""
    import openai

    body = json.loads(burst_body(server.model))
    client = server.client(max_retries=10, timeout=300)

    def ask(_):
        try:
            answer = client.chat.completions.create(**body)
        except openai.APIConnectionError as exc:
            return f"connection error: {exc}"
        return answer.usage.prompt_tokens

    with ThreadPoolExecutor(BURST) as pool:
        results = list(pool.map(ask, range(BURST)))
    assert all(isinstance(r, int) and r > 4 * 32 for r in results), results


def test_a_refusal_on_the_headers_reaches_an_sdk_still_sending_its_photos(server):
    """A wrong key is refused before the body is read; the client is still sending 28 MB of
    photos, and reads the 401 (the SDK's AuthenticationError), not a reset connection."""
    import openai

    body = json.loads(burst_body(server.model))
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong-key", max_retries=0,
                           timeout=120)
    with pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(**body)
    assert refused.value.status_code == 401
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
