"""The Files and Batch API without an engine: the ``openai`` SDK drives the middleware in this
process (httpx's ASGI transport), and an echoing app stands in for vLLM's routes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import stat
import time
from pathlib import Path

import httpx
import openai
import pytest

from encoders.samples import encode_image, synthetic_skin_photo
from serving.api.batch_api import sealed
from serving.api.batch_api.worker import BATCH_PRIORITY
from serving.api.middleware import RequestPolicyMiddleware
from serving.api.policy import ServePolicy
from tests.serving.helpers import BATCH_FINAL

KEY, OTHER = "tenant-a-key-0123", "tenant-b-key-4567"
MODEL = "skingpt4"


class EchoApp:
    """vLLM's routes as far as a batch needs them: chat and completions answer 200 with the last
    text they were given; ``/health`` answers 200; ``gate``, when set, holds each answer until
    it opens; ``allow``, when set, answers that many requests and holds the rest; ``delay_s``:
    how long each answer takes. Every body it was handed is kept."""

    def __init__(self, allow: int | None = None, delay_s: float = 0.0) -> None:
        self.bodies: list[dict] = []
        self.gate: asyncio.Event | None = None
        self.allow = allow
        self.delay_s = delay_s
        self.lifespan: list[str] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                self.lifespan.append(message["type"])
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    return await send({"type": "lifespan.shutdown.complete"})
        path = scope["path"]
        if path not in ("/health", "/v1/chat/completions", "/v1/completions"):
            return await self._send(send, 404, {"detail": "Not Found"})
        if path == "/health":
            return await self._send(send, 200, {})
        body = json.loads((await receive())["body"])
        self.bodies.append(body)
        if self.gate is not None or (self.allow is not None and len(self.bodies) > self.allow):
            await (self.gate or asyncio.Event()).wait()
        await asyncio.sleep(self.delay_s)
        if path == "/v1/completions":
            text = body["prompt"]
            answer = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": MODEL,
                      "choices": [{"index": 0, "text": f"echo: {text}", "finish_reason": "stop"}]}
        else:
            last = body["messages"][-1]["content"]
            text = last if isinstance(last, str) else last[-1]["text"]
            answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                      "model": MODEL, "choices": [{"index": 0, "finish_reason": "stop",
                      "message": {"role": "assistant", "content": f"echo: {text}"}}]}
        await self._send(send, 200, answer)

    @staticmethod
    async def _send(send, status, payload):
        raw = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": raw})


def sdk(middleware, key: str = KEY) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware),
                             base_url="http://127.0.0.1")
    return openai.AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key=key, max_retries=0,
                              http_client=http)


@contextlib.asynccontextmanager
async def service(data_dir: Path, app: EchoApp | None = None, **policy):
    app = app or EchoApp()
    middleware = RequestPolicyMiddleware(app, ServePolicy(
        api_keys=(KEY, OTHER), data_dir=str(data_dir), **policy))
    try:
        yield app, middleware, sdk(middleware)
    finally:
        await middleware.batch_api.stop()
        await middleware.admission.close()


def chat_line(custom_id: str, text: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": text}], **body}}


def jsonl(lines) -> bytes:
    return "".join((json.dumps(line) if not isinstance(line, str) else line) + "\n"
                   for line in lines).encode()


async def finished(client, batch_id: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in BATCH_FINAL:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        await asyncio.sleep(0.05)


async def submit(client, lines, endpoint="/v1/chat/completions", **kw):
    upload = await client.files.create(file=("cases.jsonl", jsonl(lines)), purpose="batch")
    return await client.batches.create(input_file_id=upload.id, endpoint=endpoint,
                                       completion_window="24h", **kw)


async def records(client, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines()]


def test_the_sdk_flow_answers_every_line_once(tmp_path):
    async def go():
        async with service(tmp_path / "data") as (app, _, client):
            lines = [chat_line(f"case-{i}", f"question {i}") for i in range(3)]
            lines.append(chat_line("case-bad", "q", priority=-5))  # only the server sets priorities
            batch = await submit(client, lines, metadata={"site": "north"})
            assert batch.status == "validating" and batch.metadata == {"site": "north"}
            done = await finished(client, batch.id)
            output = await records(client, done.output_file_id)
            errors = await records(client, done.error_file_id)
            listed = [f.id async for f in client.files.list()]
            batches = [b.id async for b in client.batches.list()]
            with pytest.raises(openai.ConflictError):  # nothing left to cancel
                await client.batches.cancel(done.id)
            return app, done, output, errors, listed, batches

    app, done, output, errors, listed, batches = asyncio.run(go())
    assert done.status == "completed" and done.errors is None
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (4, 3, 1)
    assert all(t is not None for t in (done.in_progress_at, done.finalizing_at, done.completed_at))
    assert sorted(r["custom_id"] for r in output) == ["case-0", "case-1", "case-2"]
    for record in output:
        body = record["response"]["body"]
        assert record["response"]["status_code"] == 200 and record["error"] is None
        assert body["choices"][0]["message"]["content"] == f"echo: question {record['custom_id'][-1]}"
    (refused,) = errors
    assert refused["custom_id"] == "case-bad" and refused["response"]["status_code"] == 400
    assert refused["response"]["body"]["error"]["param"] == "priority"
    # Each request reached the app checked (SkinGPT-4's stop added) and at the batch priority.
    assert len(app.bodies) == 3 and all(b["priority"] == BATCH_PRIORITY for b in app.bodies)
    assert all("###" in b["stop"] for b in app.bodies)
    assert {done.output_file_id, done.error_file_id, done.input_file_id} == set(listed)
    assert batches == [done.id]


def test_a_malformed_file_fails_validation_with_an_error_per_line(tmp_path):
    lines = [
        chat_line("a", "q"),
        "{not json",
        chat_line("a", "again"),  # repeated custom_id
        {**chat_line("c", "q"), "url": "/v1/completions"},  # a url other than the endpoint
        {**chat_line("d", "q"), "method": "GET"},
        {"method": "POST", "url": "/v1/chat/completions", "body": {}},  # no custom_id
    ]

    async def go():
        async with service(tmp_path / "data") as (app, _, client):
            batch = await finished(client, (await submit(client, lines)).id)
            return app, batch

    app, batch = asyncio.run(go())
    assert batch.status == "failed" and batch.failed_at and not app.bodies
    by_line = {e.line: e for e in batch.errors.data}
    assert set(by_line) == {2, 3, 4, 5, 6}
    assert by_line[2].code == "invalid_json_line"
    assert by_line[3].code == "duplicate_custom_id" and "line 1" in by_line[3].message
    assert by_line[4].code == "mismatched_url" and by_line[4].param == "url"
    assert by_line[5].param == "method"
    assert by_line[6].code == "missing_custom_id"
    assert batch.output_file_id is None and batch.error_file_id is None


def test_limits_on_lines_files_and_sizes(tmp_path):
    async def go():
        async with service(tmp_path / "data", max_batch_lines=2, max_file_bytes=4096,
                           max_files_per_tenant=2) as (_, _, client):
            too_many = await finished(client, (await submit(
                client, [chat_line(str(i), "q") for i in range(3)])).id)
            with pytest.raises(openai.APIStatusError) as large:
                await client.files.create(file=("big.jsonl", b"x" * 5000), purpose="batch")
            with pytest.raises(openai.BadRequestError) as purpose:
                await client.files.create(file=("a.jsonl", b"{}\n"), purpose="fine-tune")
            await client.files.create(file=("b.jsonl", b"{}\n"), purpose="batch")
            with pytest.raises(openai.BadRequestError) as quota:
                await client.files.create(file=("c.jsonl", b"{}\n"), purpose="batch")
            not_form = await client._client.post(
                "/v1/files", json={"purpose": "batch"}, headers={"Authorization": f"Bearer {KEY}"})
            return too_many, large.value, purpose.value, quota.value, not_form

    too_many, large, purpose, quota, not_form = asyncio.run(go())
    assert too_many.status == "failed" and too_many.errors.data[0].code == "too_many_requests"
    assert large.status_code == 413 and "4096 bytes" in large.message
    assert purpose.body["code"] == "invalid_request" and purpose.body["param"] == "purpose"
    assert quota.body["code"] == "quota_exceeded"
    assert not_form.status_code == 415 and "multipart/form-data" in not_form.json()["error"]["message"]


def test_batch_requests_are_checked_on_create(tmp_path):
    async def go():
        async with service(tmp_path / "data") as (_, _, client):
            upload = await client.files.create(file=("a.jsonl", jsonl([chat_line("a", "q")])),
                                               purpose="batch")
            problems = {}
            for name, kw in {
                "endpoint": {"endpoint": "/v1/embeddings"},
                "completion_window": {"completion_window": "1h"},
                "metadata": {"metadata": {str(i): "v" for i in range(17)}},
                "input_file_id": {"input_file_id": "file-missing"},
            }.items():
                args = {"input_file_id": upload.id, "endpoint": "/v1/chat/completions",
                        "completion_window": "24h"} | kw
                with pytest.raises(openai.APIStatusError) as refused:
                    await client.batches.create(**args)
                problems[name] = refused.value
            return problems

    problems = asyncio.run(go())
    for name, error in problems.items():
        assert error.body["param"] == name, name
        assert error.status_code == (404 if name == "input_file_id" else 400)


def test_another_key_sees_none_of_a_tenants_files_or_batches(tmp_path):
    async def go():
        async with service(tmp_path / "data") as (_, middleware, client):
            batch = await finished(client, (await submit(client, [chat_line("a", "q")])).id)
            other = sdk(middleware, OTHER)
            refused = []
            for call in (lambda: other.files.retrieve(batch.input_file_id),
                         lambda: other.files.content(batch.output_file_id),
                         lambda: other.files.delete(batch.input_file_id),
                         lambda: other.batches.retrieve(batch.id),
                         lambda: other.batches.cancel(batch.id)):
                with pytest.raises(openai.NotFoundError):
                    await call()
                refused.append(True)
            seen = ([f.id async for f in other.files.list()],
                    [b.id async for b in other.batches.list()])
            still = await client.files.retrieve(batch.input_file_id)
            return refused, seen, still

    refused, seen, still = asyncio.run(go())
    assert len(refused) == 5 and seen == ([], []) and still.id


def test_delete_removes_the_bytes_and_the_key(tmp_path):
    data = tmp_path / "data"

    async def go():
        async with service(data) as (_, middleware, client):
            upload = await client.files.create(file=("a.jsonl", jsonl([chat_line("a", "q")])),
                                               purpose="batch")
            path = middleware.batch_api.store.path(upload.id)
            existed = path.exists()
            deleted = await client.files.delete(upload.id)
            row = middleware.batch_api.store.db.execute(
                "SELECT COUNT(*) FROM files WHERE id = ?", (upload.id,)).fetchone()[0]
            with pytest.raises(openai.NotFoundError):
                await client.files.content(upload.id)
            return existed, path.exists(), deleted, row

    existed, exists, deleted, row = asyncio.run(go())
    assert existed and not exists and deleted.deleted and row == 0


def test_no_photo_question_name_or_metadata_in_plain_text_on_disk(tmp_path):
    data = tmp_path / "data"
    photo = base64.b64encode(encode_image(synthetic_skin_photo(seed=3))).decode()
    question = "itchy-ring-on-left-forearm-since-june"
    line = {"custom_id": "patient-7731", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{photo}"}},
                {"type": "text", "text": question}]}]}}

    async def go():
        async with service(data) as (_, _, client):
            upload = await client.files.create(file=("jane-doe-ward-4.jsonl", jsonl([line])),
                                               purpose="batch")
            batch = await client.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions",
                completion_window="24h", metadata={"patient": "jane-doe-1961"})
            done = await finished(client, batch.id)
            return upload, done, await records(client, done.output_file_id)

    upload, done, output = asyncio.run(go())
    assert upload.filename == "jane-doe-ward-4.jsonl" and done.metadata == {"patient": "jane-doe-1961"}
    assert question in output[0]["response"]["body"]["choices"][0]["message"]["content"]
    secrets = [question, photo[:64], "jane-doe-ward-4", "jane-doe-1961", "patient-7731"]
    for path in data.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in raw, f"{secret[:20]} in {path.name}"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "data.key").stat().st_mode) == 0o600


def test_cancel_stops_the_batch_and_records_every_line_once(tmp_path):
    async def go():
        app = EchoApp()
        app.gate = asyncio.Event()
        async with service(tmp_path / "data", app, batch_max_inflight=2) as (_, _, client):
            batch = await submit(client, [chat_line(f"c{i}", "q") for i in range(6)])
            while len(app.bodies) < 2:
                await asyncio.sleep(0.02)
            cancelling = await client.batches.cancel(batch.id)
            done = await finished(client, batch.id)
            again = await client.batches.cancel(batch.id)  # a repeated cancel is answered
            assert again.status == "cancelled"
            return (cancelling, done, await records(client, done.output_file_id),
                    await records(client, done.error_file_id), len(app.bodies))

    cancelling, done, output, errors, sent = asyncio.run(go())
    assert cancelling.status == "cancelling" and done.status == "cancelled"
    assert done.cancelling_at and done.cancelled_at and sent == 2
    assert not output
    assert sorted(r["custom_id"] for r in errors) == [f"c{i}" for i in range(6)]
    assert {r["error"]["code"] for r in errors} == {"batch_cancelled"}
    assert done.request_counts.failed == 6


def test_a_stopped_server_resumes_its_batch_exactly_once(tmp_path):
    data = tmp_path / "data"
    lines = [chat_line(f"r{i}", f"q{i}") for i in range(8)]

    async def first():
        app = EchoApp(allow=3)  # the fourth request is in flight when the server stops
        async with service(data, app, batch_max_inflight=1) as (_, middleware, client):
            batch = await submit(client, lines)
            while len(app.bodies) < 4:
                await asyncio.sleep(0.02)
            _, out_id, _ = middleware.batch_api.store.batch_files(batch.id)
            out_path = middleware.batch_api.store.path(out_id)
        with open(out_path, "ab") as torn:  # a crash in the middle of a record's frame
            torn.write(b"\x00\x00\x10\x00" + os.urandom(40))
        return batch.id, app

    async def second(batch_id):
        app = EchoApp()
        async with service(data, app) as (_, middleware, client):
            await middleware.batch_api.start({})  # as the server's lifespan starts it
            done = await finished(client, batch_id)
            return done, await records(client, done.output_file_id), app

    batch_id, before = asyncio.run(first())
    done, output, after = asyncio.run(second(batch_id))
    assert done.status == "completed" and done.request_counts.completed == 8
    ids = [r["custom_id"] for r in output]
    assert sorted(ids) == sorted(f"r{i}" for i in range(8)) and len(ids) == len(set(ids))
    assert len(before.bodies) == 4 and len(after.bodies) == 5  # the 3 answered are not sent again
    assert before.bodies[3] == after.bodies[0]


def test_files_expire_after_the_retention(tmp_path):
    async def go():
        async with service(tmp_path / "data", file_retention_hours=1 / 3600) as (_, m, client):
            upload = await client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
            path = m.batch_api.store.path(upload.id)
            await asyncio.sleep(2.5)
            with pytest.raises(openai.NotFoundError):
                await client.files.retrieve(upload.id)
            deadline = time.monotonic() + 30  # the expiry loop's next pass deletes the bytes
            while path.exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            return upload, path.exists()

    upload, exists = asyncio.run(go())
    assert upload.expires_at - upload.created_at == 1 and not exists


def test_completions_batches_run_too(tmp_path):
    line = {"custom_id": "p", "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "hello"}}

    async def go():
        async with service(tmp_path / "data") as (_, _, client):
            done = await finished(client, (await submit(client, [line], "/v1/completions")).id)
            return await records(client, done.output_file_id)

    (record,) = asyncio.run(go())
    assert record["response"]["body"]["choices"][0]["text"] == "echo: hello"


def test_the_server_lifespan_starts_the_service(tmp_path):
    app = EchoApp()
    middleware = RequestPolicyMiddleware(app, ServePolicy(data_dir=str(tmp_path / "data")))
    sent = []

    async def go():
        inbox = asyncio.Queue()
        for kind in ("lifespan.startup", "lifespan.shutdown"):
            inbox.put_nowait({"type": kind})
        await middleware({"type": "lifespan", "app": object()}, inbox.get, _append(sent))
        await middleware.admission.close()

    asyncio.run(go())
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert app.lifespan == ["lifespan.startup", "lifespan.shutdown"]
    assert (tmp_path / "data" / "store.db").exists()


def _append(sent: list):
    async def send(message):
        sent.append(message)
    return send


def test_without_a_data_dir_the_routes_say_how_to_turn_them_on():
    async def go():
        middleware = RequestPolicyMiddleware(EchoApp(), ServePolicy(api_keys=(KEY,)))
        async with sdk(middleware) as client:
            with pytest.raises(openai.NotFoundError) as off:
                await client.files.list()
        await middleware.admission.close()
        return off.value

    assert "--data-dir" in asyncio.run(go()).message


# --- sealed files --------------------------------------------------------------------------------


def test_sealed_files_read_back_and_refuse_damage(tmp_path):
    key = sealed.new_data_key()
    path = tmp_path / "f"
    with sealed.SealedWriter(path, key, "file-1") as writer:
        for chunk in (b"line one\n", b"line two\n" * 1000, b"last"):
            writer.write(chunk)
        writer.sync()
    plain = b"line one\n" + b"line two\n" * 1000 + b"last"
    with sealed.open_sealed(path, key, "file-1", len(plain)) as reader:
        assert reader.read() == plain
    assert b"line two" not in path.read_bytes()
    with pytest.raises(sealed.SealedError):  # another file's id: frames cannot be moved
        sealed.open_sealed(path, key, "file-2").read()
    with pytest.raises(sealed.SealedError):  # cut short
        sealed.open_sealed(path, key, "file-1", len(plain) + 1).read()
    damaged = bytearray(path.read_bytes())
    damaged[-3] ^= 1
    path.write_bytes(bytes(damaged))
    with pytest.raises(sealed.SealedError):
        sealed.open_sealed(path, key, "file-1").read()


def test_appending_drops_a_torn_last_frame(tmp_path):
    key, path = sealed.new_data_key(), tmp_path / "log"
    with sealed.SealedWriter(path, key, "f") as writer:
        writer.write(b"one")
        writer.write(b"two")
    whole = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\x00\x00\x00\x30" + b"\x01" * 20)
    with sealed.SealedWriter(path, key, "f", append=True) as writer:
        assert writer.existing == [b"one", b"two"] and path.stat().st_size == whole
        writer.write(b"three")
    assert sealed.open_sealed(path, key, "f").read() == b"onetwothree"


def test_the_master_key_comes_from_the_environment_or_a_private_file(tmp_path):
    key = sealed.load_master_key(tmp_path, environ={})
    assert len(key) == 32 and stat.S_IMODE((tmp_path / "data.key").stat().st_mode) == 0o600
    assert sealed.load_master_key(tmp_path, environ={}) == key
    given = base64.b64encode(b"k" * 32).decode()
    assert sealed.load_master_key(tmp_path, environ={sealed.KEY_ENV: given}) == b"k" * 32
    with pytest.raises(ValueError, match="32 random bytes"):
        sealed.load_master_key(tmp_path, environ={sealed.KEY_ENV: "short"})
    os.chmod(tmp_path / "data.key", 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        sealed.load_master_key(tmp_path, environ={})


def test_batch_requests_yield_to_live_ones():
    from serving.api.admission import LiveTraffic

    async def go():
        live = LiveTraffic(idle=3, busy=1, quiet_s=5)
        running, most = 0, []

        async def batch_request():
            nonlocal running
            async with live.batch_slot():
                running += 1
                most.append(running)
                await asyncio.sleep(0.05)
                running -= 1

        live.live_started()
        await asyncio.gather(*(batch_request() for _ in range(4)))
        during = max(most)
        live.live_ended()
        most.clear()
        await asyncio.gather(*(batch_request() for _ in range(4)))  # within the quiet time
        after_end = max(most)
        live.last_live -= live.quiet_s  # the quiet time has passed
        most.clear()
        await asyncio.gather(*(batch_request() for _ in range(6)))
        return during, after_end, max(most)

    assert asyncio.run(go()) == (1, 1, 3)


# --- tenants side by side ------------------------------------------------------------------------


def test_places_go_to_the_tenants_in_turn():
    from serving.api.batch_api.share import FairShare

    async def go():
        pool = FairShare(2)
        a_old, a_new = pool.share("a", (1, "old")), pool.share("a", (2, "new"))
        b = pool.share("b", (3, "b"))
        order: list[str] = []
        holders: list = []  # in the order they got their places

        async def take(share, name):
            await share.acquire()
            order.append(name)
            holders.append(share)

        for share in (a_old, a_old):  # tenant a alone takes every place
            await take(share, "a-old")
        waiting = [asyncio.create_task(take(share, name)) for share, name in
                   ((a_new, "a-new"), (a_old, "a-old"), (a_new, "a-new"), (b, "b"), (b, "b"))]
        await asyncio.sleep(0)
        assert pool.free == 0 and pool.waiting() == 5
        for _ in range(5):  # the longest-running request ends, and its place goes on
            holders.pop(0).release()
            await asyncio.sleep(0)
        await asyncio.gather(*waiting)
        return order[2:]

    # b, holding fewer places, first; then a's oldest batch before its newer one, in turns
    assert asyncio.run(go()) == ["b", "a-old", "b", "a-new", "a-new"]


def test_a_tenants_small_batch_is_not_held_behind_anothers_big_one(tmp_path):
    big = [chat_line(f"a{i}", f"big {i}") for i in range(40)]
    small = [chat_line(f"b{i}", f"small {i}") for i in range(3)]

    async def go():
        # Slow enough answers that b's own steps (upload, validation, the store's writes) take
        # the time of a few of a's lines, not of most of them, on a slow disk too.
        app = EchoApp(delay_s=0.25)
        async with service(tmp_path / "data", app, batch_max_inflight=2) as (_, mw, client):
            other = sdk(mw, OTHER)
            first = await submit(client, big[:20])  # a's batches queue behind each other...
            second = await submit(client, big[20:])
            while len(app.bodies) < 4:
                await asyncio.sleep(0.01)
            late = await submit(other, small)  # ...but not b's
            done_b = await finished(other, late.id)
            a_left = sum(1 for b in app.bodies if b["messages"][0]["content"].startswith("big"))
            done = [await finished(client, first.id), await finished(client, second.id)]
            outputs = [await records(client, d.output_file_id) for d in done]
            return done_b, a_left, done, outputs, await records(other, done_b.output_file_id), app

    done_b, a_sent, done, outputs, output_b, app = asyncio.run(go())
    assert a_sent < 30  # b finished while most of a's lines were still to run
    assert done_b.status == "completed" and sorted(r["custom_id"] for r in output_b) == \
        ["b0", "b1", "b2"]
    assert all(d.status == "completed" for d in done)
    ids = [r["custom_id"] for output in outputs for r in output]
    assert sorted(ids) == sorted(line["custom_id"] for line in big)  # each answered once
    assert len(app.bodies) == 43


def test_batches_of_one_tenant_run_oldest_first():
    from serving.api.batch_api.worker import next_to_run as _next_to_run

    pending = [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("a4", "a"), ("c1", "c")]
    assert _next_to_run(pending, {}) == [("a1", "a"), ("b1", "b"), ("c1", "c"), ("a2", "a")]
    assert _next_to_run(pending, {"a1": 0, "a2": 0, "b1": 0}) == [("c1", "c")]
    assert _next_to_run(pending[1:], {"a2": 0}) == [("b1", "b"), ("c1", "c"), ("a3", "a")]


# --- uploads cut short ---------------------------------------------------------------------------


BOUNDARY = "cases-7f3a9c"


def form(content: bytes, *, close: bool = True) -> bytes:
    """A multipart upload of ``content`` (purpose batch), with or without its closing boundary."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"night.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n").encode()
    return head + content + (f"\r\n--{BOUNDARY}--\r\n".encode() if close else b"")


async def raw_upload(middleware, chunks: list[bytes], declared: int | None,
                     disconnect: bool = False) -> tuple[int, dict]:
    """POST /v1/files with the body in ``chunks`` (the last one ends it, or a disconnect
    follows it), as an ASGI server hands it over; the status and JSON answer."""
    headers = [(b"authorization", f"Bearer {KEY}".encode()),
               (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode())]
    if declared is not None:
        headers.append((b"content-length", str(declared).encode()))
    scope = {"type": "http", "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/files", "raw_path": b"/v1/files", "query_string": b"",
             "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1 or disconnect}
                for i, c in enumerate(chunks)]
    if disconnect:
        messages.append({"type": "http.disconnect"})
    inbox = iter(messages)
    sent: list[dict] = []

    async def receive():
        message = next(inbox, None)
        if message is None:  # nothing more: wait, as a server does for a body that stalls
            await asyncio.Event().wait()
        return message

    async def send(message):
        sent.append(message)

    await middleware(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent
                                       if m["type"] == "http.response.body"))


def test_an_upload_cut_short_is_refused_and_nothing_of_it_is_kept(tmp_path):
    content = jsonl([chat_line(f"case-{i}", f"question {i} " + "x" * 200) for i in range(40)])
    whole = form(content)
    no_close = form(content[:5000], close=False)  # cut off mid-file, its length correct
    shapes = {
        "no closing boundary": ([no_close[:3000], no_close[3000:]], len(no_close), False),
        "under its Content-Length": ([whole[:4000]], len(whole), False),
        "a disconnect": ([whole[:4000]], len(whole), True),
        "inside a part's headers": ([whole[:whole.index(b"filename")]], None, False),
        "a torn closing boundary": ([whole[:-4]], len(whole) - 4, False),
    }

    async def go():
        async with service(tmp_path / "data") as (_, middleware, client):
            answers = {name: await raw_upload(middleware, *shape)
                       for name, shape in shapes.items()}
            stored = sorted(p.name for p in middleware.batch_api.store.files_dir.iterdir())
            rows = middleware.batch_api.store.db.execute("SELECT COUNT(*) FROM files").fetchone()[0]
            listed = [f.id async for f in client.files.list()]
            good = await raw_upload(middleware, [whole[:3000], whole[3000:]], len(whole))
            back = (await client.files.content(good[1]["id"])).content
            return answers, stored, rows, listed, good, back

    answers, stored, rows, listed, good, back = asyncio.run(go())
    messages = {name: body["error"]["message"] for name, (_, body) in answers.items()}
    assert {status for status, _ in answers.values()} == {400}, answers
    assert "inside the file part, after" in messages["no closing boundary"]
    assert f"--{BOUNDARY}--" in messages["no closing boundary"]
    assert f"its Content-Length declares {len(whole)}" in messages["under its Content-Length"]
    assert "disconnected" in messages["a disconnect"]
    assert "inside the headers of a form part" in messages["inside a part's headers"]
    assert "without the closing boundary" in messages["a torn closing boundary"]
    assert all("nothing of it was stored" in messages[name] for name in
               ("no closing boundary", "under its Content-Length", "inside a part's headers"))
    assert stored == [] and rows == 0 and listed == []  # nothing of them on disk
    assert good[0] == 200 and good[1]["bytes"] == len(content) and back == content


# --- a photo worker that dies under a line -------------------------------------------------------


def kill_photo_workers(monkeypatch, signals: list[int]):
    """The next photo jobs' workers get ``signals`` (one each) while they hold the job, as the
    OOM killer or an operator would kill them (SIGKILL), or as a decoder crash ends them
    (SIGSEGV); the jobs after those run as usual."""
    from serving.api import workers

    real = workers._Worker.call
    left = list(signals)

    async def call(self, header, data):
        if not left:
            return await real(self, header, data)
        head = json.dumps(header).encode()
        self.writer.write(workers.FRAME.pack(len(head), len(data)) + head + data[:-1])
        await self.writer.drain()  # the worker holds the job, all but its last byte
        os.kill(self.proc.pid, left.pop(0))
        await self.reader.readexactly(workers.FRAME.size)  # its pipe closes: IncompleteReadError
        raise AssertionError("a killed worker answered")

    monkeypatch.setattr(workers._Worker, "call", call)
    return left


def photo_line(custom_id: str, url: str) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": custom_id}]}]}}


def test_a_line_whose_photo_worker_died_is_tried_again_and_a_bad_photo_is_refused(
        tmp_path, monkeypatch):
    import signal

    from serving.api.batch_api import worker as jobs_service

    monkeypatch.setattr(jobs_service, "RETRY_DELAYS_S", (0.05, 0.05))
    photo = base64.b64encode(encode_image(synthetic_skin_photo(seed=5))).decode()
    lines = [photo_line("killed-once", f"data:image/jpeg;base64,{photo}"),
             photo_line("not-a-photo", "data:image/jpeg;base64,"
                        + base64.b64encode(b"no image here" * 10).decode()),
             chat_line("text", "no photo")]

    async def go():
        left = kill_photo_workers(monkeypatch, [signal.SIGKILL])
        async with service(tmp_path / "data", batch_max_inflight=1) as (app, _, client):
            done = await finished(client, (await submit(client, lines)).id)
            return (done, left, app, await records(client, done.output_file_id),
                    await records(client, done.error_file_id))

    done, left, app, output, errors = asyncio.run(go())
    assert not left  # the worker was killed under the first line
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    assert sorted(r["custom_id"] for r in output) == ["killed-once", "text"]
    (refused,) = errors
    assert refused["custom_id"] == "not-a-photo" and refused["response"]["status_code"] == 400
    assert refused["response"]["body"]["error"]["code"] == "invalid_image"
    sent = [b["messages"][0]["content"][-1]["text"] if isinstance(b["messages"][0]["content"], list)
            else b["messages"][0]["content"] for b in app.bodies]
    assert sorted(sent) == ["killed-once", "no photo"]  # each answered once


def test_a_killed_photo_worker_is_a_503_to_retry_and_a_crashed_one_the_photos_400(
        tmp_path, monkeypatch):
    import signal

    photo = base64.b64encode(encode_image(synthetic_skin_photo(seed=6))).decode()
    message = {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{photo}"}},
        {"type": "text", "text": "what is this?"}]}

    async def go():
        kill_photo_workers(monkeypatch, [signal.SIGKILL, signal.SIGSEGV])
        async with service(tmp_path / "data") as (_, _, client):
            outcomes = []
            for _ in range(3):
                try:
                    answer = await client.chat.completions.with_raw_response.create(
                        model=MODEL, messages=[message])
                    outcomes.append((answer.status_code, None, None))
                except openai.APIStatusError as exc:
                    outcomes.append((exc.status_code, exc.response.headers.get("retry-after"),
                                     exc.message))
            return outcomes

    killed, crashed, fine = asyncio.run(go())
    status, retry_after, message = killed
    assert status == 503 and retry_after == "1"
    assert "server's fault" in message and "SIGKILL" in message
    assert crashed[0] == 400 and "could not be decoded" in crashed[2]
    assert fine[0] == 200  # the fresh worker decodes the same photo
