"""Ray Serve with LLM replicas that are their own ingress: ``skingpt4 serve MODEL --ray --replicas 1
--ingress replica`` on a local Ray instance of its own, as a user runs it on one machine, driven
through the official ``openai`` SDK and plain HTTP.

Serve's proxy sends each request straight to the LLM replica, which runs the request policy in
front of vLLM's app over its own engine (:mod:`serving.cluster.replica_ingress`): the answers are
the embedded server's, token for token; the policy's refusals are the embedded server's; the
Batch API runs in the replica; and no ingress deployment runs.
"""

from __future__ import annotations

import io
import json
import time

import httpx
import psutil
import pytest

from tests.serving.helpers import batch_final, image_message, local_ray_server

API_KEY = "ray-replica-ingress-key-0123456789"
MODEL = "skingpt4"
GREEDY = dict(temperature=0, max_tokens=16)

pytestmark = [pytest.mark.ray, pytest.mark.engine]


@pytest.fixture(scope="module")
def replica_ingress(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-replica-ingress")
    with local_ray_server(tiny_checkpoints["llama"], root, API_KEY, "--ingress", "replica",
                          "--max-model-len", "1024", "--data-dir", str(root / "data"),
                          name="serve --ray --ingress replica") as server:
        yield server


@pytest.fixture
def client(replica_ingress):
    import openai

    return openai.OpenAI(base_url=f"{replica_ingress.root_url}/v1", api_key=API_KEY,
                         max_retries=0, timeout=120)


def _titles(root_pid: int) -> list[str]:
    """The process titles of the server's tree (Ray's workers are its descendants)."""
    titles = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            titles.append(" ".join(p.cmdline()[:1]) or p.name())
        except psutil.NoSuchProcess:
            pass
    return titles


def test_no_ingress_deployment_runs_and_the_model_runs_in_one_engine_process(replica_ingress):
    titles = _titles(replica_ingress.pid)
    assert any("ServeReplica:skingpt4:SkinGPT4HttpServer" in t for t in titles), titles
    assert not any("Ingress" in t for t in titles), titles
    assert any(t.startswith("VLLM::EngineCore") for t in titles), titles
    assert not any(t.startswith("VLLM::Worker") for t in titles), titles


def test_answers_are_the_embedded_servers_token_for_token(client, server, photo_urls):
    """Whole, streamed and Responses answers of the replica equal the embedded server's (the
    session's, same checkpoint, greedy): the same engine options and the same policy in front."""
    messages = [image_message([photo_urls[0]], "What is this lesion?")]
    embedded = server.client().chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    whole = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    assert whole.choices[0].message.content == embedded.choices[0].message.content
    assert whole.usage.prompt_tokens == embedded.usage.prompt_tokens
    assert whole.usage.completion_tokens == embedded.usage.completion_tokens
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2, "the answer did not arrive in pieces"
    assert "".join(deltas) == embedded.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == embedded.usage.prompt_tokens
    response = client.responses.create(model=MODEL, temperature=0, max_output_tokens=16, input=[
        {"role": "user", "content": [{"type": "input_image", "image_url": photo_urls[0]},
                                     {"type": "input_text", "text": "What is this lesion?"}]}])
    assert response.output_text == embedded.choices[0].message.content


def test_the_request_policy_refuses_as_the_embedded_server(replica_ingress, photo_urls):
    base, key = replica_ingress.root_url, {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "messages": [image_message([photo_urls[0]])], **GREEDY}

    unauthorized = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    assert unauthorized.status_code == 401
    assert unauthorized.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200  # open, as embedded

    bad = dict(body, messages=[image_message(["data:image/png;base64,AAAA"])])
    refused = httpx.post(f"{base}/v1/chat/completions", json=bad, headers=key, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_image"

    too_long = httpx.post(f"{base}/v1/chat/completions", json=dict(body, max_tokens=100_000),
                          headers=key, timeout=60)
    assert too_long.status_code == 400
    assert too_long.json()["error"]["param"] == "max_tokens"
    assert "maximum context length is 1024 tokens" in too_long.json()["error"]["message"]

    # vLLM's own routes beyond the product's take no input past the checks; /metrics is not on
    # the Serve port (one replica's registry), as in the default layout.
    assert httpx.post(f"{base}/tokenize", json={"prompt": "x"}, headers=key, timeout=30).status_code == 404
    assert httpx.get(f"{base}/metrics", headers=key, timeout=30).status_code == 404

    # The client's request id is the answer's, as Serve's proxy keeps it.
    answered = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120,
                          headers={**key, "X-Request-Id": "consult-42-turn-1"})
    assert answered.status_code == 200
    assert answered.headers["x-request-id"] == "consult-42-turn-1"

    # The server stays up.
    assert httpx.post(f"{base}/v1/chat/completions", json=body, headers=key, timeout=120).status_code == 200


def test_the_batch_api_runs_in_the_only_replica(client, photo_urls):
    messages = [image_message([photo_urls[0]], "What is this lesion?")]
    live = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    line = {"custom_id": "lesion-1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": messages, **GREEDY}}
    batch_file = client.files.create(file=("lines.jsonl", io.BytesIO(json.dumps(line).encode())),
                                     purpose="batch")
    batch = client.batches.create(input_file_id=batch_file.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    batch = batch_final(client, batch.id, every_s=1)
    assert batch.status == "completed" and batch.request_counts.completed == 1
    [record] = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert record["custom_id"] == "lesion-1" and record["response"]["status_code"] == 200
    assert record["response"]["body"]["choices"][0]["message"]["content"] == live.choices[0].message.content
    assert client.files.delete(batch_file.id).deleted


def _engine_cores(root_pid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if p.cmdline()[:1] and p.cmdline()[0].startswith("VLLM::EngineCore"):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_dead_engine_fails_its_stream_in_shape_and_the_replica_is_replaced(replica_ingress, photo_urls):
    """Last in this module: it kills the replica's engine. The streamed answer in flight ends with
    an error event in the project's shape and ``[DONE]``; requests sent meanwhile get an answer or
    a JSON error, never a dropped connection; Serve replaces the replica, which answers as before."""
    base, key = replica_ingress.root_url, {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "messages": [image_message([photo_urls[0]])], **GREEDY}
    before = httpx.post(f"{base}/v1/chat/completions", json=body, headers=key, timeout=120)
    assert before.status_code == 200
    [engine] = _engine_cores(replica_ingress.pid)

    long = dict(body, max_tokens=600, min_tokens=600, ignore_eos=True, stream=True)
    events = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=long, headers=key,
                      timeout=300) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    engine.kill()  # SIGKILL, mid-answer
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert isinstance(error["code"], str) and error["message"] and "Traceback" not in events[-2]

    deadline, statuses = time.monotonic() + 360, []
    while True:
        assert time.monotonic() < deadline, f"no replica answered again: {statuses[-5:]}"
        try:
            answer = httpx.post(f"{base}/v1/chat/completions", json=body, headers=key, timeout=120)
        except httpx.HTTPError as exc:  # the proxy keeps the connection whatever the replica does
            raise AssertionError(f"a request got no HTTP answer: {exc!r}") from exc
        statuses.append(answer.status_code)
        if answer.status_code == 200:
            break
        assert answer.status_code >= 500 and answer.json()["error"]["message"], answer.text[:300]
        time.sleep(2)
    assert answer.json()["choices"][0]["message"]["content"] == before.json()["choices"][0]["message"]["content"]
    assert _engine_cores(replica_ingress.pid) != [engine]
