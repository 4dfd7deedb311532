"""What an operator sees of a real server (docs/observability.md): after a scripted mix of live,
refused and batch requests from two tenants, the policy layer's and the Batch API's metrics
moved by exactly that mix; a refused request's id is in its error body, its access-log line and
the client's exception; no question, answer, photo, file name or ``custom_id`` reaches a log or
a metric; and a real Prometheus scraping the server gets data for every query of the dashboard
and every recording rule."""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

from encoders.samples import encode_image, synthetic_skin_photo
from serving.api.metrics import key_id
from tests.deploy.test_observability_files import RULES, dashboard, dashboard_queries, records
from tests.serving.helpers import API_KEY, Server, batch_final, data_url, image_message, start_server
from tests.serving.prometheus_peer import prometheus

MODEL = "skingpt4"
OTHER_KEY = "observed-tenant-b-5150"
QUESTION = "an-itchy-ring-on-the-forearm-since-june"
ANSWER_CHECK = {"temperature": 0, "max_tokens": 6}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "finding", "schema": {
    "type": "object", "properties": {"finding": {"type": "string"}}, "required": ["finding"]}}}


@pytest.fixture(scope="module")
def observed_server(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("observed-server")
    server = start_server(tiny_checkpoints["llama"], root, "--api-key", API_KEY,
                          "--api-key", OTHER_KEY, "--data-dir", str(root / "data"),
                          "--max-images-per-request", "2")
    yield server
    server.process.stop()


def scrape(server: Server) -> dict[tuple[str, frozenset], float]:
    """The server's ``/metrics`` page: ``{(name, labels): value}``."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=30,
                     headers={"Authorization": f"Bearer {server.api_key}"}).text
    values = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if match and not line.startswith("#"):
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            values[(match.group(1), labels)] = float(match.group(3))
    return values


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    """How much the series ``name{labels}`` grew (labels not named: summed over)."""
    def total(page):
        return sum(v for (n, ls), v in page.items()
                   if n == name and set(labels.items()) <= set(ls))
    return total(after) - total(before)


def access_lines(server: Server) -> list[dict]:
    lines = []
    for line in server.log.read_text(errors="replace").splitlines():
        if line.startswith('{"time":'):
            lines.append(json.loads(line))
    return lines


def test_a_scripted_mix_moves_the_metrics_by_exactly_that_mix(observed_server):
    server = observed_server
    tenant_a = server.client(timeout=120)
    tenant_b = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=OTHER_KEY,
                             max_retries=0, timeout=120)
    photo = data_url(encode_image(synthetic_skin_photo(seed=4)))
    before = scrape(server)

    # tenant A: two answers with a photo each, one with a schema; tenant B: a streamed answer
    answers = [tenant_a.chat.completions.create(
        model=MODEL, messages=[image_message([photo], f"{QUESTION} {i}")], **ANSWER_CHECK,
        **({"response_format": SCHEMA} if i else {})) for i in range(2)]
    stream = tenant_b.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], stream=True,
        stream_options={"include_usage": True}, **ANSWER_CHECK)
    streamed = [chunk for chunk in stream]
    # refusals: an unknown field (with the client's own request id), three photos (limit 2),
    # a wrong key, and a route this server does not serve
    with pytest.raises(openai.BadRequestError) as unknown:
        tenant_a.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": QUESTION}],
            extra_body={"bogus": 1}, extra_headers={"X-Request-Id": "ticket-4711"}, **ANSWER_CHECK)
    with pytest.raises(openai.BadRequestError) as too_many:
        tenant_a.chat.completions.create(
            model=MODEL, messages=[image_message([photo] * 3, QUESTION)], **ANSWER_CHECK)
    with pytest.raises(openai.AuthenticationError) as wrong_key:
        openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="not-a-key", max_retries=0
                      ).models.list()
    missing = httpx.post(f"{server.base_url}/v1/embeddings", json={},
                         headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    # tenant B's batch: one line answered, one refused
    lines = [{"custom_id": f"{QUESTION}-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}],
                       **ANSWER_CHECK, **({"bogus": 1} if i else {})}} for i in range(2)]
    upload = tenant_b.files.create(
        file=(f"{QUESTION}.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()),
        purpose="batch")
    batch = tenant_b.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                    completion_window="24h")
    batch = batch_final(tenant_b, batch.id, timeout_s=120)
    assert batch.status == "completed", batch
    errors = [json.loads(x) for x in tenant_b.files.content(batch.error_file_id).text.splitlines()]
    # the gauges are sampled every second, the store counted every fifth
    census = ("skingpt4_batches", frozenset({("status", "completed"), ("tenant", key_id(OTHER_KEY))}))
    deadline = time.monotonic() + 30
    while census not in (after := scrape(server)):
        assert time.monotonic() < deadline, "the store's census never came"
        time.sleep(0.5)

    # the request id: the client's own kept; in the body, the header (the SDK's request_id)
    # and the access log; a batch line's error record carries its record's id
    assert unknown.value.request_id == "ticket-4711"
    assert unknown.value.body["request_id"] == "ticket-4711"
    assert wrong_key.value.request_id.startswith("req_")  # made by the server
    assert wrong_key.value.body["request_id"] == wrong_key.value.request_id
    assert missing.status_code == 404
    assert missing.json()["error"]["request_id"] == missing.headers["x-request-id"]
    (refused,) = errors
    assert refused["response"]["body"]["error"]["request_id"] == refused["response"]["request_id"]
    log = {line["request_id"]: line for line in access_lines(server)}
    line = log["ticket-4711"]
    assert (line["status"], line["code"], line["tenant"], line["route"]) == (
        400, "invalid_request", key_id(API_KEY), "/v1/chat/completions")
    assert log[too_many.value.request_id]["photos"] == 3
    assert log[wrong_key.value.request_id]["status"] == 401
    assert log[wrong_key.value.request_id]["tenant"] is None

    chat = "/v1/chat/completions"
    assert moved(before, after, "skingpt4_http_requests_total", route=chat, status="200") == 3
    assert moved(before, after, "skingpt4_http_requests_total", route=chat, status="400",
                 code="invalid_request") == 2
    assert moved(before, after, "skingpt4_http_requests_total", route="/v1/models",
                 status="401", code="invalid_api_key") == 1
    assert moved(before, after, "skingpt4_http_requests_total", route="other",
                 status="404") == 1
    assert moved(before, after, "skingpt4_http_requests_total", route="/v1/batches",
                 method="POST", status="200") == 1
    assert moved(before, after, "skingpt4_photos_total", route=chat) == 2 + 3
    assert moved(before, after, "skingpt4_http_request_duration_seconds_count", route=chat) == 5
    a, b = key_id(API_KEY), key_id(OTHER_KEY)
    assert moved(before, after, "skingpt4_tokens_total", tenant=a, kind="prompt") == sum(
        r.usage.prompt_tokens for r in answers)
    assert moved(before, after, "skingpt4_tokens_total", tenant=a, kind="output") == sum(
        r.usage.completion_tokens for r in answers)
    assert moved(before, after, "skingpt4_tokens_total", tenant=b, kind="output") == \
        streamed[-1].usage.completion_tokens
    assert moved(before, after, "skingpt4_photo_decode_seconds_count", outcome="ok") == 2
    assert moved(before, after, "skingpt4_schema_compile_seconds_count") == 1
    # the bodies read for the engine's routes (not the 404's, refused before its body)
    assert moved(before, after, "skingpt4_admission_wait_seconds_count") == 5
    assert moved(before, after, "skingpt4_batch_line_results_total", tenant=b,
                 outcome="completed") == 1
    assert moved(before, after, "skingpt4_batch_line_results_total", tenant=b,
                 outcome="failed") == 1
    assert moved(before, after, "skingpt4_batch_line_duration_seconds_count") == 1
    assert after[census] == 1
    assert after[("skingpt4_stored_files", frozenset({("tenant", b)}))] == 3  # in, out, errors
    assert after[("skingpt4_admission_reserved_bytes", frozenset())] == 0
    assert after[("skingpt4_batch_lines", frozenset({("state", "in_flight")}))] == 0

    # privacy: nothing a person wrote or sent, nor a client's names for things
    page = httpx.get(f"{server.base_url}/metrics", timeout=30,
                     headers={"Authorization": f"Bearer {API_KEY}"}).text
    answer = answers[0].choices[0].message.content.strip()
    secrets = [QUESTION, photo[200:264], API_KEY, OTHER_KEY, upload.id]
    if len(answer) >= 16:  # a tiny random model's answer may be too short to be telling
        secrets.append(answer)
    logs = server.log.read_text(errors="replace")
    for secret in secrets:
        assert secret not in page and secret not in logs, secret[:24]


def test_a_real_prometheus_gets_data_for_every_dashboard_and_rule_query(observed_server,
                                                                       tmp_path):
    server = observed_server
    target = server.base_url.removeprefix("http://")
    client = server.client(timeout=120)
    with prometheus([target], API_KEY, RULES, tmp_path / "prometheus") as prom:
        prom.wait_for("up", lambda r: r and r[0]["value"][1] == "1", timeout_s=30)
        # traffic between two scrapes, so that every rate has something to show
        photo = data_url(encode_image(synthetic_skin_photo(seed=5)))
        for i in range(3):
            client.chat.completions.create(model=MODEL, messages=[image_message([photo], str(i))],
                                           **ANSWER_CHECK)
        prom.wait_for("skingpt4:http_requests:rate5m", bool, timeout_s=30)
        # Rules built on other rules get data an evaluation or two later: each query is given
        # until a shared deadline (Prometheus scrapes and evaluates every second here).
        queries = {f"record {name}": name for name in records()} | dashboard_queries(dashboard())
        deadline, empty = time.monotonic() + 30, {}
        for where, expr in queries.items():
            # raises with Prometheus's message if the query does not parse
            while not prom.query(expr) and time.monotonic() < deadline:
                time.sleep(0.5)
            if not prom.query(expr):
                empty[where] = expr
        assert not empty, f"no data for {len(empty)} queries: {empty}"
        requests = prom.query('sum(skingpt4_http_requests_total{route="/v1/chat/completions",'
                              'status="200"})')
        direct = sum(v for (n, ls), v in scrape(server).items()
                     if n == "skingpt4_http_requests_total"
                     and {("route", "/v1/chat/completions"), ("status", "200")} <= set(ls))
        assert float(requests[0]["value"][1]) == direct
