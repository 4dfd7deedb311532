"""Ray Serve mode with one LLM replica whose engine dies: the requests in flight on it fail (a
streamed chat answer with an error event in the project's shape and ``[DONE]``, a streamed
Responses answer with ``error`` and ``response.failed``, one without output yet with a JSON
500), and those sent after the death wait for Ray Serve's replacement instead of failing.

``skingpt4 serve MODEL --ray --replicas 1`` on a local Ray instance of its own (no ``RAY_ADDRESS``),
as a user runs it on one machine. Its own module, so that it starts after test_ray.py's cluster
has been shut down.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import psutil
import pytest

from tests.serving.helpers import data_url, image_message, local_ray_server

API_KEY = "ray-single-key-0123456789"
# In flight when the engine dies: streamed answers of IN_FLIGHT_TOKENS each (min_tokens: the
# `###` stop cannot end them early; about half a second each here), of which the engine runs
# MAX_NUM_SEQS at a time, so that it is likely still busy when the kill comes, as soon as
# the first answer has begun. IN_FLIGHT_TOKENS is within what the max_tokens check's cheap bound
# admits, so the replica does not count these prompts: counting photos on the replica's event
# loop holds back the first answers' events, and the kill would come later. Those the kill
# finds decoding end with an error event; one waiting in the engine may get a JSON 500 before
# any output; any that had not reached the engine are answered by the new replica.
IN_FLIGHT, IN_FLIGHT_TOKENS, MAX_NUM_SEQS = 8, 800, 2
# Sent after the death: each must wait for the replacement (a new engine: about a minute here).
AFTER, WAIT_BOUND_S = 4, 360

pytestmark = [pytest.mark.ray, pytest.mark.engine]


@pytest.fixture(scope="module")
def single_replica(tiny_checkpoints, tmp_path_factory):
    with local_ray_server(tiny_checkpoints["llama"], tmp_path_factory.mktemp("ray-single"), API_KEY,
                          "--max-model-len", "2048", "--max-num-seqs", str(MAX_NUM_SEQS)) as server:
        yield server


def _engines(root_pid: int) -> list[psutil.Process]:
    """vLLM's engine processes in the server's tree (Ray's workers are its descendants)."""
    found = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if p.name().startswith("VLLM::") or any(a.startswith("VLLM::") for a in p.cmdline()[:1]):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def test_requests_wait_for_the_replacement_of_the_only_replica(single_replica, photos):
    from encoders.samples import encode_image

    base = single_replica.root_url
    headers = {"Authorization": f"Bearer {API_KEY}"}
    photo = data_url(encode_image(photos[0]))

    def body(tokens: int, stream: bool = False) -> dict:
        return {"model": "skingpt4", "messages": [image_message([photo])], "temperature": 0,
                "max_tokens": tokens, "min_tokens": tokens if stream else 0, "ignore_eos": True,
                "stream": stream}

    def chat(tokens: int, session: str, timeout: float) -> tuple[int, str, float]:
        started = time.monotonic()
        try:
            r = httpx.post(f"{base}/v1/chat/completions", json=body(tokens), timeout=timeout,
                           headers={**headers, "x-session-id": session})
            return r.status_code, r.text, time.monotonic() - started
        except httpx.HTTPError as exc:
            return -1, repr(exc), time.monotonic() - started

    streaming = threading.Semaphore(0)

    def in_flight(session: str) -> tuple[int, list[str]]:
        """A streamed answer's status and data events (for a status other than 200, its body);
        the semaphore is released at its first event. An answer cut off by the engine's death
        ends as vLLM ends it: an error event, then ``[DONE]``."""
        events = []
        try:  # one that had not reached the engine waits for the new replica, as `after-*` do
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body(IN_FLIGHT_TOKENS, True),
                              headers={**headers, "x-session-id": session}, timeout=WAIT_BOUND_S) as r:
                if r.status_code != 200:
                    return r.status_code, [r.read().decode()]
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 1:
                            streaming.release()
        except httpx.HTTPError as exc:
            return -1, [repr(exc)]
        return 200, events

    def responses_in_flight(session: str) -> tuple[int, list[tuple[str | None, str]]]:
        """A streamed Responses answer's status and (event, data) pairs; one cut off ends with
        ``error`` and ``response.failed``, never a dropped connection."""
        events, name = [], None
        request = {"model": "skingpt4", "input": "Describe the lesion in detail.",
                   "max_output_tokens": IN_FLIGHT_TOKENS, "temperature": 1.0, "stream": True}
        try:
            with httpx.stream("POST", f"{base}/v1/responses", json=request,
                              headers={**headers, "x-session-id": session}, timeout=WAIT_BOUND_S) as r:
                if r.status_code != 200:
                    return r.status_code, [(None, r.read().decode())]
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        events.append((name, line[6:]))
                        if name == "response.output_text.delta" and len(events) < 6:
                            streaming.release()
        except httpx.HTTPError as exc:
            return -1, [(None, repr(exc))]
        return 200, events

    assert chat(4, "warm", 120)[0] == 200
    engines = _engines(single_replica.pid)
    assert engines, "no vLLM engine process under the server"

    results: dict[str, object] = {}

    def run(name: str, call, *args) -> threading.Thread:
        t = threading.Thread(target=lambda: results.__setitem__(name, call(*args)))
        t.start()
        return t

    threads = [run(f"responses-{i}", responses_in_flight, f"responses-{i}") for i in range(2)]
    threads += [run(f"in-flight-{i}", in_flight, f"in-flight-{i}") for i in range(IN_FLIGHT)]
    assert streaming.acquire(timeout=120), "no streamed request started"  # one is decoding
    for engine in engines:
        engine.kill()  # SIGKILL
    killed_at = time.monotonic()
    time.sleep(0.5)
    threads += [run(f"after-{i}", chat, 8, f"after-{i}", WAIT_BOUND_S) for i in range(AFTER)]
    for t in threads:
        t.join(WAIT_BOUND_S + 30)
    waited = time.monotonic() - killed_at
    after = {k: v for k, v in results.items() if k.startswith("after-")}
    flights = {k: v for k, v in sorted(results.items()) if k.startswith("in-flight")}
    print(f"single replica: after the kill {[(s, round(t, 1)) for s, _, t in after.values()]}; "
          f"in flight: {[(s, len(v)) for s, v in flights.values()]} (status, events); "
          f"all done {waited:.0f} s after the kill")

    assert len(results) == 2 + IN_FLIGHT + AFTER, sorted(results)
    for name, (status, text, _) in after.items():  # they waited for the new replica
        assert status == 200, (name, status, text[:300])
    cut, failed = [], []
    for name, (status, events) in flights.items():
        if status != 200:  # waiting in the engine, no output yet: a JSON 500 that says retry
            error = json.loads(events[0])["error"]
            assert status == 500 and "send the request again" in error["message"], (name, events)
            failed.append(name)
            continue
        assert events[-1] == "[DONE]", (name, events[-2:])  # every stream ends, none hangs
        errors = [e for e in events[:-1] if '"error"' in e]
        if errors:  # cut off: one JSON error, the last event before [DONE], no traceback
            assert errors == [events[-2]], (name, errors)
            error = json.loads(errors[0])["error"]
            assert error["message"] and "Traceback" not in errors[0]
            assert isinstance(error["code"], str) and error["type"] == "InternalServerError"
            cut.append(name)
    for name, result in sorted(results.items()):
        if not name.startswith("responses-"):
            continue
        status, events = result
        if status != 200:  # waiting in the engine, no output yet: a JSON 500 that says retry
            assert status == 500 and json.loads(events[0][1])["error"]["code"], (name, events)
            failed.append(name)
            continue
        last = [kind for kind, _ in events[-2:]]
        if last[-1] in ("response.completed", "response.incomplete"):
            continue  # the sampled answer ended before the kill
        assert last == ["error", "response.failed"], (name, events[-3:])
        assert isinstance(json.loads(events[-2][1])["code"], str)
        assert json.loads(events[-1][1])["response"]["status"] == "failed"
        cut.append(name)
    # Whether the kill finds answers still decoding depends on how far the engine got before the
    # client saw the first event (on a busy 2-core machine, sometimes all of them): the shapes
    # above are checked for every answer it cut, and the ingress's tests check them whatever
    # the timing (test_ray.py, test_ingress_never_resends_a_request_that_ran).
    print(f"single replica: {len(cut)} answers cut ({cut}), {len(failed)} failed before any "
          f"output")
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    assert chat(4, "later", 120)[0] == 200
