"""The Files and Batch API on the real server: the ``openai`` SDK's whole flow gives the answers
``skingpt4 batch`` gives for the same file, a tenant's small batch is not held behind another
tenant's big one, a SIGKILL mid-batch and a restart lose and repeat nothing, and no photo or
question reaches the data folder or the log in plain text."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from encoders.samples import encode_image, synthetic_skin_photo
from tests.serving.helpers import (API_KEY, Server, batch_final, comparable, data_url, image_message,
                                   start_server)

MODEL = "skingpt4"
GREEDY = {"temperature": 0, "max_tokens": 8}
QUESTION = "a-scaly-patch-behind-the-left-ear-for-three-weeks"
OTHER_KEY = "test-key-tenant-b-9876"  # a second tenant of the same server
REPO = Path(__file__).resolve().parents[4]


@dataclass
class BatchServer:
    """A server with a data folder of its own, which a test may kill and start again."""

    folder: Path
    root: Path
    data_dir: Path
    server: Server | None = None

    def start(self) -> Server:
        self.server = start_server(self.folder, self.root, "--api-key", API_KEY,
                                   "--api-key", OTHER_KEY, "--data-dir", str(self.data_dir),
                                   "--batch-max-inflight", "2")
        return self.server

    def kill(self) -> None:
        """SIGKILL to the whole server (its engine included), as a crash or the OOM killer."""
        os.killpg(self.server.process.pid, signal.SIGKILL)
        self.server.process.stop()

    def logs(self) -> bytes:
        return b"".join(p.read_bytes() for p in self.root.glob("*.log"))


@pytest.fixture(scope="module")
def batch_server(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-server")
    holder = BatchServer(tiny_checkpoints["llama"], root, root / "data")
    holder.start()
    yield holder
    holder.server.process.stop()


def download(client, file_id: str | None) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()] if file_id else []


def photo(seed: int) -> str:
    return data_url(encode_image(synthetic_skin_photo(seed=seed)))


def test_the_sdk_flow_gives_the_answers_of_skingpt4_batch(batch_server, tmp_path):
    lines = [
        {"custom_id": f"photo-{seed}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": MODEL, "messages": [image_message([photo(seed)], QUESTION)], **GREEDY}}
        for seed in (11, 12)
    ] + [
        {"custom_id": "two-choices", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": MODEL, "n": 2, "logprobs": True, "top_logprobs": 2, "seed": 7,
                  "messages": [{"role": "user", "content": "Is this eczema?"}], "max_tokens": 6}},
        {"custom_id": "refused", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 100000}},
    ]
    input_path = tmp_path / "cases.jsonl"
    input_path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    client = batch_server.server.client(timeout=120)
    upload = client.files.create(file=input_path.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    done = batch_final(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 1)
    served = {r["custom_id"]: r for r in download(client, done.output_file_id)
              + download(client, done.error_file_id)}

    cli_output = tmp_path / "cli.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "serving.cli", "batch", str(batch_server.folder), str(input_path),
         str(cli_output), "--dtype", "float32", "--max-model-len", "1024"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    offline = {r["custom_id"]: r for r in map(json.loads, cli_output.read_text().splitlines())}

    assert set(served) == set(offline) == {line["custom_id"] for line in lines}
    for custom_id, record in served.items():
        status = record["response"]["status_code"]
        assert status == offline[custom_id]["response"]["status_code"], custom_id
        body, expected = record["response"]["body"], offline[custom_id]["response"]["body"]
        if status == 200:
            assert comparable(body) == comparable(expected), custom_id
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] is not None
        else:
            assert body["error"]["code"] == expected["error"]["code"] == "context_length_exceeded"
    assert len(served["two-choices"]["response"]["body"]["choices"]) == 2

    photo_text = lines[0]["body"]["messages"][0]["content"][0]["image_url"]["url"][200:264]
    for secret in (QUESTION, photo_text):
        assert secret.encode() not in batch_server.logs()
        for path in batch_server.data_dir.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path.name


# Far more lines than any machine answers while the small batch's 3 run (about 8 a second on
# one place here): the big batch is cancelled once the small one is final, so the test does
# not wait for it, and its speed relative to the small one's overheads does not matter.
BIG_LINES = 2000


def test_a_tenants_small_batch_runs_beside_anothers_big_one(batch_server):
    from openai import OpenAI

    def lines(prefix: str, count: int) -> bytes:
        return "".join(json.dumps(
            {"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL, "temperature": 0, "max_tokens": 64, "min_tokens": 64,
                      "messages": [{"role": "user", "content": f"{prefix} case {i}"}]}}) + "\n"
            for i in range(count)).encode()

    def submit(client, prefix: str, count: int):
        upload = client.files.create(file=(f"{prefix}.jsonl", lines(prefix, count)),
                                     purpose="batch")
        return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")

    tenant_a = batch_server.server.client(timeout=120)
    tenant_b = OpenAI(base_url=f"{batch_server.server.base_url}/v1", api_key=OTHER_KEY,
                      max_retries=0, timeout=120)
    big = submit(tenant_a, "big", BIG_LINES)
    deadline = time.monotonic() + 120
    while tenant_a.batches.retrieve(big.id).request_counts.completed < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    small = batch_final(tenant_b, submit(tenant_b, "small", 3).id)
    big_then = tenant_a.batches.retrieve(big.id)
    tenant_a.batches.cancel(big.id)
    big_done = batch_final(tenant_a, big.id)

    assert small.status == "completed" and big_done.status == "cancelled"
    assert big_then.status == "in_progress" and big_then.request_counts.completed < BIG_LINES
    small_ids = [r["custom_id"] for r in download(tenant_b, small.output_file_id)]
    assert sorted(small_ids) == ["small-0", "small-1", "small-2"] and small.error_file_id is None
    answered = download(tenant_a, big_done.output_file_id)
    unrun = download(tenant_a, big_done.error_file_id)
    assert len(answered) >= big_then.request_counts.completed
    assert {r["error"]["code"] for r in unrun} == {"batch_cancelled"}
    ids = [r["custom_id"] for r in answered + unrun]
    assert sorted(ids) == sorted(f"big-{i}" for i in range(BIG_LINES))  # each once


def engine_answers(server: Server) -> int:
    """How many requests this server's engine ran to their length (its own Prometheus counter:
    since this engine started)."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=30,
                     headers={"Authorization": f"Bearer {server.api_key}"}).text
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("vllm:request_success_total{")
               and 'finished_reason="length"' in line)


@pytest.mark.stops_shared_server
def test_a_sigkill_mid_batch_and_a_restart_lose_and_repeat_nothing(batch_server):
    # Long enough answers that the batch is still running when its progress first shows 4
    # (progress is saved about once a second), on a machine several times faster than CI's.
    answer_tokens, total = 160, 40
    lines = [{"custom_id": f"case-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "temperature": 0, "max_tokens": answer_tokens,
                       "min_tokens": answer_tokens,
                       "messages": [image_message([photo(i % 3)], f"{QUESTION} {i}")]}}
             for i in range(total)]
    client = batch_server.server.client(timeout=120)
    upload = client.files.create(
        file=("night.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()),
        purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    batch_server.kill()
    batch_server.start()

    client = batch_server.server.client(timeout=120)
    resumed = client.batches.retrieve(batch.id)
    # The restarted server may finish the rest before this first look, so any state on the way.
    assert resumed.status in ("in_progress", "finalizing", "completed")
    assert resumed.request_counts.completed >= 4
    done = batch_final(client, batch.id)
    assert done.status == "completed", done
    records = download(client, done.output_file_id)
    ids = [r["custom_id"] for r in records]
    assert sorted(ids) == sorted(x["custom_id"] for x in lines)  # all there, none twice
    assert done.error_file_id is None and done.request_counts.completed == total
    for record in records:
        assert record["response"]["body"]["usage"]["completion_tokens"] == answer_tokens
    # The new engine answered what the killed one had not recorded, and only that: at least one
    # line (the kill came mid-batch) and none of the 4 or more recorded before it.
    assert 1 <= engine_answers(batch_server.server) <= total - 4
    assert QUESTION.encode() not in batch_server.logs()
