"""When the engine dies anyway, the embedded server exits promptly and non-zero, so that a
supervisor (``deploy/skingpt4.service``: ``Restart=on-failure``) restarts it; a request in flight
gets an answer, not a hang, and a streamed answer ends with its error events in the project's
shape (chat: an error event and ``[DONE]``; Responses: ``error`` and ``response.failed``)."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.serving.helpers import API_KEY, start_server

pytestmark = [pytest.mark.engine, pytest.mark.slow]

EXIT_WITHIN_S = 60
STREAM_END_WITHIN_S = 5
STREAMS = 4  # of each kind: long answers, so that some are still being written at the kill


def engine_core(pid: int) -> psutil.Process:
    for child in psutil.Process(pid).children(recursive=True):
        if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
            return child
    raise AssertionError("no EngineCore process under the server")


def stream_events(server, route: str, started: threading.Event, first_delta: threading.Event,
                  killed: list[float]):
    """A long streamed answer's events as (name, data) pairs, read until the stream ends; and
    seconds from the kill to its end. ``started`` is set once the answer's headers arrived (the
    request is in the engine's queue), ``first_delta`` once it has text. Chat's answer is held
    long by ``min_tokens``; a Responses answer is sampled, and may end early (its number of
    tokens is the model's choice)."""
    question = [{"role": "user", "content": "Describe the lesion in detail."}]
    body = ({"messages": question, "max_tokens": 900, "min_tokens": 900}
            if route == "/v1/chat/completions" else {"input": question, "max_output_tokens": 900})
    events, name = [], None
    with httpx.Client(timeout=EXIT_WITHIN_S) as client, client.stream(
            "POST", f"{server.base_url}{route}", headers=server.headers(),
            json={"model": server.model, "temperature": 1.0, "stream": True, **body}) as r:
        started.set()
        assert r.status_code == 200, r.read()
        try:
            for line in r.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data = line[6:] if line[6:] == "[DONE]" else json.loads(line[6:])
                    events.append((name, data))
                    if name == "response.output_text.delta" or '"content"' in line:
                        first_delta.set()
                    name = None
        except httpx.TransportError as exc:
            events.append(("dropped", type(exc).__name__))
    first_delta.set()
    return events, time.monotonic() - killed[0] if killed else None


def test_engine_death_exits_non_zero_and_ends_streams_with_their_error_events(tiny_checkpoints):
    # A short folder: vLLM's engine sockets live in TMPDIR, and their paths must fit 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="skingpt4-"))
    server = start_server(tiny_checkpoints["falcon"], root, "--api-key", API_KEY)
    proc = server.process.popen
    try:
        killed: list[float] = []
        routes = ["/v1/chat/completions", "/v1/responses"] * STREAMS
        starts = [threading.Event() for _ in routes]
        deltas = [threading.Event() for _ in routes]
        engine = engine_core(proc.pid)
        # Every answer starts in the same engine step once the engine runs again, so that none
        # can finish before the last has text (a chat answer then still has ~900 tokens to go).
        engine.suspend()
        with ThreadPoolExecutor(len(routes)) as pool:
            streams = [pool.submit(stream_events, server, route, started, delta, killed)
                       for route, started, delta in zip(routes, starts, deltas)]
            assert all(started.wait(EXIT_WITHIN_S) for started in starts)
            time.sleep(1)  # the last request's message reaches the engine's socket
            engine.resume()
            assert all(delta.wait(EXIT_WITHIN_S) for delta in deltas)
            engine.send_signal(signal.SIGKILL)  # mid-answer: each has sent text
            killed.append(time.monotonic())
            results = [f.result() for f in streams]
        start = killed[0]
        with httpx.Client(timeout=EXIT_WITHIN_S) as client:
            try:
                r = client.post(f"{server.base_url}/v1/completions", headers=server.headers(),
                                json={"model": server.model, "prompt": "hello", "max_tokens": 4})
                assert r.status_code >= 500 and "error" in r.json()
            except httpx.TransportError:
                pass  # the server had already closed its socket
        code = proc.wait(EXIT_WITHIN_S - (time.monotonic() - start))
        assert code == 1, server.log.read_text()[-2000:]
        assert "the engine stopped" in server.log.read_text()
    finally:
        server.process.stop()
        shutil.rmtree(root, ignore_errors=True)

    cut = {"/v1/chat/completions": 0, "/v1/responses": 0}
    for route, (events, after_kill) in zip(routes, results):
        assert events and events[-1][0] != "dropped", (route, events[-3:])
        if route == "/v1/chat/completions":  # min_tokens: no answer ends before the kill
            assert events[-1][1] == "[DONE]" and "error" in events[-2][1], events[-3:]
            error = events[-2][1]["error"]
            assert isinstance(error["code"], str) and error["type"] == "InternalServerError"
        else:
            if events[-1][0] in ("response.completed", "response.incomplete"):
                continue  # the sampled answer ended before the kill
            assert [name for name, _ in events[-2:]] == ["error", "response.failed"], events[-3:]
            assert isinstance(events[-2][1]["code"], str)
            assert events[-1][1]["response"]["status"] == "failed"
            assert events[-1][1]["sequence_number"] == len(events) - 1
        assert after_kill is not None and after_kill < STREAM_END_WITHIN_S
        cut[route] += 1
    assert cut["/v1/chat/completions"] == STREAMS and cut["/v1/responses"], cut
