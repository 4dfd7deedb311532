"""The Batch API's master key at start: one that does not open the store (another store's, a
malformed one, a key file gone missing) stops ``skingpt4 serve`` with one line on stderr and exit
code 2, before any engine starts, and changes nothing in the data folder; the right key
afterwards finds every file and batch as they were."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from serving.api.batch_api import sealed
from serving.api.batch_api.store import DataKeyError, Store, check_data_key
from tests.serving.api.batch_api.test_batches import chat_line, finished, jsonl, records, service

ROOT = Path(__file__).resolve().parents[4]


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (and so every name)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def serve(model: Path, data: Path, *extra: str, key: str | None) -> subprocess.CompletedProcess:
    """``skingpt4 serve`` on a stand-in model folder: it gets as far as its start checks."""
    env = {k: v for k, v in os.environ.items() if k != sealed.KEY_ENV}
    if key is not None:
        env[sealed.KEY_ENV] = key
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", "serve", str(model), "--port", "0",
         "--data-dir", str(data), *extra],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def one_line_refusal(out: subprocess.CompletedProcess, *fragments: str) -> str:
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def stand_in_model(tmp_path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "skingpt4"}))
    return folder


def fill_store(data: Path) -> tuple[str, bytes, str]:
    """A store with an uploaded file and a completed batch; (file id, its bytes, batch id)."""
    content = jsonl([chat_line(f"case-{i}", f"question {i}") for i in range(3)])

    async def go():
        async with service(data) as (_, _, client):
            upload = await client.files.create(file=("night.jsonl", content), purpose="batch")
            batch = await client.batches.create(input_file_id=upload.id, completion_window="24h",
                                                endpoint="/v1/chat/completions",
                                                metadata={"ward": "4"})
            await finished(client, batch.id)
            return upload.id, batch.id

    file_id, batch_id = asyncio.run(go())
    return file_id, content, batch_id


def test_a_wrong_or_malformed_key_stops_the_server_in_one_line_and_changes_nothing(
        tmp_path, stand_in_model, monkeypatch):
    data, right = tmp_path / "data", new_key()
    monkeypatch.setenv(sealed.KEY_ENV, right)
    file_id, content, batch_id = fill_store(data)
    before = snapshot(data)

    wrong = one_line_refusal(serve(stand_in_model, data, key=new_key()),
                             "skingpt4 serve:", sealed.KEY_ENV, str(data), "another key")
    malformed = one_line_refusal(serve(stand_in_model, data, key="not-a-key"),
                                 sealed.KEY_ENV, str(data), "32 random bytes in base64")
    key_file = tmp_path / "other.key"
    key_file.write_text(new_key())
    key_file.chmod(0o600)
    from_file = one_line_refusal(
        serve(stand_in_model, data, "--data-key-file", str(key_file), key=None),
        str(key_file), str(data), "does not open the store")
    assert snapshot(data) == before  # nothing in the store changed, nothing was added
    assert not (data / sealed.KEY_FILE).exists()
    for line in (wrong, malformed, from_file):
        assert right not in line

    async def again():  # the right key: everything as it was
        async with service(data) as (_, _, client):
            batch = await client.batches.retrieve(batch_id)
            return ((await client.files.content(file_id)).content, batch,
                    await records(client, batch.output_file_id))

    back, batch, output = asyncio.run(again())
    assert back == content
    assert batch.status == "completed" and batch.metadata == {"ward": "4"}
    assert sorted(r["custom_id"] for r in output) == ["case-0", "case-1", "case-2"]


def test_the_store_checks_its_key_before_it_changes_anything(tmp_path, monkeypatch):
    data, right = tmp_path / "data", new_key()
    assert check_data_key(data, environ={sealed.KEY_ENV: right}) == base64.b64decode(right)
    monkeypatch.setenv(sealed.KEY_ENV, right)
    store = Store(data)
    store.add_file("file-1", "open", "batch", "a.jsonl", 0, sealed.new_data_key(), None)
    store.close()
    (data / "files" / "left-by-a-crash").write_bytes(b"x")  # an orphan a start would remove
    before = snapshot(data)
    monkeypatch.setenv(sealed.KEY_ENV, new_key())
    with pytest.raises(DataKeyError, match="does not open the store"):
        Store(data)  # as the server's lifespan opens it
    assert snapshot(data) == before
    # With no key given and no key file, a store that holds sealed records gets no new key.
    with pytest.raises(DataKeyError, match="does not exist, but the store"):
        check_data_key(data, environ={})
    assert not (data / sealed.KEY_FILE).exists()


def test_a_store_from_before_check_values_is_checked_by_its_first_record(tmp_path, monkeypatch):
    data, right = tmp_path / "data", new_key()
    monkeypatch.setenv(sealed.KEY_ENV, right)
    store = Store(data)
    store.add_file("file-1", "open", "batch", "a.jsonl", 0, sealed.new_data_key(), None)
    store.db.execute("DROP TABLE meta")  # as a store written before check values
    store.close()
    with pytest.raises(DataKeyError, match="another key"):
        check_data_key(data, environ={sealed.KEY_ENV: new_key()})
    assert check_data_key(data, environ={sealed.KEY_ENV: right}) == base64.b64decode(right)
    Store(data).close()  # the right key: the store gets its check value
    with sqlite3.connect(data / "store.db") as db:
        assert db.execute("SELECT COUNT(*) FROM meta").fetchone()[0] == 1
