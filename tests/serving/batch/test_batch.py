"""``skingpt4 batch``: OpenAI Batch files through one in-process engine, with the server's checks.

One engine for the module (an engine start costs ~40 s on 2 cores): a file of good lines (a photo
chat, a text-only chat, a text completion, the model folder's defaults) and one line of each kind
of bad line runs once; then a crash is simulated on a copy of its output (records deleted, the
last line torn) and a rerun must add exactly the missing records. The usage tests start no
engine; the CLI test (marked slow) starts its own, in a subprocess, as a user would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from encoders.samples import encode_image, synthetic_skin_photo
from serving.cli.batch import add_batch_command, batch_environment, run_batch_command
from serving.cli import main as skingpt4
from serving.api.batch_api.lines import TooLarge, count_lines, read_lines
from serving.api.batch_api.runner import BatchSummary, run_batch
from serving.batch.run import BatchEngine, OutputLog, open_engine
from serving.engine.server import EngineConfig
from tests.serving.helpers import data_url, image_message
from tests.serving.engine.test_openai_api import expected_prompt_tokens

pytestmark = pytest.mark.engine

MODEL = "skingpt4"
GREEDY = {"temperature": 0, "max_tokens": 8}
REPO = Path(__file__).resolve().parents[3]


def chat(custom_id: str, body: dict, **envelope) -> dict:
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    return {**line, **envelope}


def completion(custom_id: str, body: dict) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}


def photo_url(seed: int) -> str:
    return data_url(encode_image(synthetic_skin_photo(seed=seed)))


def batch_lines() -> tuple[list[str], dict]:
    """The input lines and what each must get: {custom_id or line number: expectation}."""
    photo, other = image_message([photo_url(0)]), image_message([photo_url(2)])
    lines = [
        chat("chat-photo", {"model": MODEL, "messages": [photo], **GREEDY}),
        completion("completion-text", {"model": MODEL, "prompt": "Describe eczema.", **GREEDY}),
        '{"custom_id": "not-json", "method": "POST",',
        chat("bad-photo", {"model": MODEL, "messages": [
            image_message(["data:image/jpeg;base64,@@not-base64@@"])], **GREEDY}),
        chat("wrong-url", {"model": MODEL, "messages": [photo], **GREEDY}, url="/v1/embeddings"),
        chat("wrong-method", {"model": MODEL, "messages": [photo], **GREEDY}, method="GET"),
        {"method": "POST", "url": "/v1/completions", "body": {"model": MODEL, "prompt": "hi"}},
        chat("chat-photo", {"model": MODEL, "messages": [other], **GREEDY}),  # duplicate id
        completion("echo", {"model": MODEL, "prompt": "Describe eczema.", "echo": True}),
        chat("stream", {"model": MODEL, "messages": [photo], "stream": True, **GREEDY}),
        completion("too-long", {"model": MODEL, "prompt": "itchy red patch " * 2000, **GREEDY}),
        chat("unknown-model", {"model": "gpt-4o", "messages": [photo], **GREEDY}),
        # No sampling fields and min_tokens 300: only the model folder's max_new_tokens (300)
        # can end this answer, so it shows that the server's generation defaults apply.
        chat("chat-defaults", {"model": MODEL, "messages": [image_message([photo_url(1)])],
                               "min_tokens": 300}),
        chat("chat-text-only", {"model": MODEL, "messages": [
            {"role": "user", "content": "Is a ring-shaped rash contagious?"}], **GREEDY}),
        "",
        chat("chat-photo-2", {"model": MODEL, "messages": [other], **GREEDY}),
    ]
    expect = {
        "chat-photo": (200,), "completion-text": (200,), "chat-defaults": (200,),
        "chat-text-only": (200,), "chat-photo-2": (200,),
        "bad-photo": (400, "invalid base64", "messages[0].content[0]"),
        "wrong-url": (404, "/v1/embeddings"),
        "wrong-method": (400, "method", "GET", "POST"),
        "echo": (400, "echo"),
        "stream": (400, "stream"),
        "too-long": (400, "1024"),
        "unknown-model": (404, "gpt-4o"),
        3: ("invalid_json_line", "line 3", "not valid JSON"),
        7: ("missing_custom_id", "line 7", "custom_id"),
        8: ("duplicate_custom_id", "line 8", "'chat-photo'", "line 1"),
    }
    text = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    return text, expect


@dataclass
class Engine:
    runner: asyncio.Runner
    engine: BatchEngine | None
    folder: Path

    def run(self, input_path: Path, output: Path, **kw) -> tuple[BatchSummary, int]:
        """One batch run; (summary, bytes of a torn line removed from OUTPUT first)."""
        with OutputLog.open(output) as log:
            summary = self.runner.run(run_batch(self.engine, input_path, log, progress=False, **kw))
            return summary, log.repaired_bytes


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    folder = tiny_checkpoints["llama"]
    config = EngineConfig(model=str(folder), dtype="float32", max_model_len=1024)
    saved = dict(os.environ)
    os.environ.update(batch_environment(config))
    runner, stack = asyncio.Runner(), contextlib.AsyncExitStack()
    handle = Engine(runner, None, folder)
    try:
        handle.engine = runner.run(stack.enter_async_context(open_engine(config)))
        yield handle
    finally:
        runner.run(stack.aclose())
        runner.close()
        handle.engine = None
        gc.collect()  # vLLM's AsyncLLM.__del__ now, not at interpreter exit
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def first_run(engine, tmp_path_factory):
    """The file run once, with the most requests the engine had at once."""
    root = tmp_path_factory.mktemp("batch")
    lines, expect = batch_lines()
    input_path, output = root / "in.jsonl", root / "out.jsonl"
    input_path.write_text("\n".join(lines) + "\n")
    in_flight, most = 0, 0
    answer = engine.engine.answer

    async def counted(route, body):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            return await answer(route, body)
        finally:
            in_flight -= 1

    engine.engine.answer = counted
    try:
        summary, repaired = engine.run(input_path, output, max_concurrency=16)
    finally:
        engine.engine.answer = answer
    assert repaired == 0
    return input_path, output, summary, expect, most


def read_records(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(line) for line in raw.splitlines()]


def by_key(records: list[dict]) -> dict:
    """{custom_id, or the line number of an unattributable line: record}; keys are unique."""
    keyed = {}
    for r in records:
        key = r["custom_id"] if r["custom_id"] is not None else r["error"]["line"]
        assert key not in keyed, f"two records for {key!r}"
        keyed[key] = r
    return keyed


def test_every_line_gets_one_record_in_openai_format(first_run):
    _, output, summary, expect, _ = first_run
    records = read_records(output)
    for r in records:
        assert set(r) == {"id", "custom_id", "response", "error"}
        assert r["id"].startswith("batch_req_")
    assert set(by_key(records)) == set(expect)
    assert summary.lines == 15 and summary.skipped == 0 and not summary.failed
    assert (summary.answered, summary.refused) == (5, 10)
    assert summary.complete and not summary.engine_died


def test_bad_lines_name_their_problem(first_run):
    _, output, _, expect, _ = first_run
    records = by_key(read_records(output))
    for key, (head, *words) in expect.items():
        r = records[key]
        if isinstance(key, int):  # unattributable: OpenAI's batch error shape, with the line
            assert r["response"] is None and r["custom_id"] is None
            assert r["error"]["code"] == head and r["error"]["line"] == key
            message = r["error"]["message"]
        elif head == 200:
            continue
        else:  # refused: the status and OpenAI error body the server sends, in response.body
            assert r["error"] is None and r["response"]["status_code"] == head, r
            error = r["response"]["body"]["error"]
            assert set(error) == {"message", "type", "param", "code", "request_id"}
            assert error["request_id"] == r["response"]["request_id"]
            message = error["message"]
        for word in words:
            assert word.lower() in message.lower(), (key, message)


def test_good_lines_have_the_servers_bodies(first_run, engine):
    _, output, _, expect, _ = first_run
    records = by_key(read_records(output))
    lines, _ = batch_lines()
    bodies = {json.loads(line)["custom_id"]: json.loads(line)["body"]
              for line in lines[:2] + lines[12:14]}
    for custom_id in ("chat-photo", "chat-text-only", "chat-defaults"):
        response = records[custom_id]["response"]
        assert response["status_code"] == 200
        answer = ChatCompletion.model_validate(response["body"])
        assert response["request_id"] == answer.id
        assert answer.object == "chat.completion" and answer.model == MODEL
        # The server's engine options: the SkinGPT-4 chat template (32 positions per photo)
        # and --enable-prompt-tokens-details.
        assert answer.usage.prompt_tokens == expected_prompt_tokens(
            engine.folder, bodies[custom_id]["messages"])
        assert answer.usage.prompt_tokens_details.cached_tokens is not None
    for custom_id in ("chat-photo", "chat-text-only"):  # (min_tokens holds stops off, so not
        body = records[custom_id]["response"]["body"]  # chat-defaults: ### may occur there)
        assert "###" not in body["choices"][0]["message"]["content"]
        assert 1 <= body["usage"]["completion_tokens"] <= GREEDY["max_tokens"]
    defaults = records["chat-defaults"]["response"]["body"]
    generation = json.loads((engine.folder / "generation_config.json").read_text())
    assert defaults["usage"]["completion_tokens"] == generation["max_new_tokens"] == 300
    assert defaults["choices"][0]["finish_reason"] == "length"
    text = Completion.model_validate(records["completion-text"]["response"]["body"])
    assert text.object == "text_completion" and text.choices[0].text is not None
    assert "###" not in text.choices[0].text


def test_requests_run_concurrently(first_run):
    *_, most = first_run
    assert most >= 2


def test_resume_after_a_crash_adds_exactly_the_missing_records(first_run, engine, tmp_path):
    input_path, output, _, expect, _ = first_run
    complete = by_key(read_records(output))
    lines = output.read_bytes().splitlines(keepends=True)
    # A crash: some records never written (an answer, a refusal, a bad line's report), and the
    # last one torn halfway through its write.
    gone = {"completion-text", "bad-photo", 3}
    kept = [raw for raw in lines[:-1] if _key(raw) not in gone]
    torn = lines[-1]
    gone.add(_key(torn))
    damaged = tmp_path / "out.jsonl"
    damaged.write_bytes(b"".join(kept) + torn[: len(torn) // 2])

    summary, repaired = engine.run(input_path, damaged)

    assert repaired == len(torn) // 2
    assert damaged.read_bytes().startswith(b"".join(kept))  # written records stay as they were
    resumed = by_key(read_records(damaged))  # asserts one record per key
    assert set(resumed) == set(complete) == set(expect)
    added = [_key(raw) for raw in damaged.read_bytes().splitlines()[len(kept):]]
    assert sorted(map(str, added)) == sorted(map(str, gone))
    assert summary.skipped == summary.lines - len(gone) and not summary.failed
    assert summary.answered + summary.refused == len(gone)
    for key in gone:
        assert _status(resumed[key]) == _status(complete[key])

    before = damaged.read_bytes()
    again, repaired = engine.run(input_path, damaged)
    assert repaired == 0 and damaged.read_bytes() == before
    assert (again.answered, again.refused, again.skipped) == (0, 0, again.lines)


def _key(raw: bytes):
    record = json.loads(raw)
    return record["custom_id"] if record["custom_id"] is not None else record["error"]["line"]


def _status(record: dict):
    return record["response"]["status_code"] if record["response"] else record["error"]["code"]


def engine_core_process():
    """The EngineCore of this module's engine: a direct child of this process (the session's
    server, if any, has its own one level further down)."""
    import psutil

    for child in psutil.Process().children(recursive=False):
        if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no EngineCore process under this test process")


def test_engine_death_stops_the_run_and_writes_no_server_errors(engine, tmp_path):
    """Runs last among the tests of the module's engine: it kills that engine."""
    lines = [chat(f"case-{i}", {"model": MODEL, "messages": [image_message([photo_url(i % 3)])],
                                "min_tokens": 200, "max_tokens": 200}) for i in range(12)]
    input_path, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    input_path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    async def run_and_kill() -> BatchSummary:
        with OutputLog.open(output) as log:
            task = asyncio.create_task(
                run_batch(engine.engine, input_path, log, progress=False, max_concurrency=4))
            while engine.engine.client.get_num_unfinished_requests() == 0:
                await asyncio.sleep(0.02)
            engine_core_process().kill()
            return await asyncio.wait_for(task, 120)

    summary = engine.runner.run(run_and_kill())
    assert summary.engine_died and not summary.complete
    assert summary.failed  # the requests in flight when it died
    records = by_key(read_records(output)) if output.stat().st_size else {}
    assert all(r["response"]["status_code"] == 200 for r in records.values())  # no 5xx written
    assert not set(records) & set(summary.failed)  # a rerun retries exactly those, and the rest
    assert len(records) + len(summary.failed) < len(lines)


# --- the command line, before any engine starts ----------------------------------------------


def test_batch_subcommand_registers(tiny_checkpoints, tmp_path):
    parser = argparse.ArgumentParser(prog="skingpt4")
    add_batch_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["batch", "M", "in.jsonl", "out.jsonl", "--max-concurrency", "8"])
    assert args.func is run_batch_command and args.max_concurrency == 8
    assert not args.ray and args.replicas == 1 and args.accelerator is None
    with pytest.raises(SystemExit):
        parser.parse_args(["batch", "M", "in.jsonl", "out.jsonl", "--max-concurrency", "0"])
    args = parser.parse_args(["batch", "M", "in.jsonl", "out.jsonl", "--ray", "--replicas", "2",
                              "--accelerator", "cpu"])
    assert args.ray and args.replicas == 2 and args.accelerator == "cpu"
    with pytest.raises(SystemExit):
        parser.parse_args(["batch", "M", "in.jsonl", "out.jsonl", "--ray", "--replicas", "0"])


class CountingEngine:
    """Answers each checked request after a moment, counting how many it holds at once."""

    dead = False

    def __init__(self) -> None:
        from serving.api.policy import ServePolicy

        self.policy = ServePolicy()
        self.running = self.most = 0

    async def submit(self, route, body):
        return self.answer(body)

    async def answer(self, body):
        self.running += 1
        self.most = max(self.most, self.running)
        await asyncio.sleep(0.01)
        self.running -= 1
        return 200, {"prompt": body["prompt"], "stop": body["stop"]}, "cmpl-1"


def test_at_most_max_concurrency_requests_are_in_the_engine(tmp_path):
    """More lines than --max-concurrency: every checked request (with the ### stop) is
    answered, never more than the bound at once."""
    lines = [completion(f"case-{i}", {"model": MODEL, "prompt": f"case {i}"}) for i in range(12)]
    lines.insert(5, completion("refused", {"model": MODEL, "prompt": "x", "echo": True}))
    input_path, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    input_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    engine = CountingEngine()

    async def run() -> BatchSummary:
        with OutputLog.open(output) as log:
            return await asyncio.wait_for(
                run_batch(engine, input_path, log, max_concurrency=2, progress=False), 60)

    summary = asyncio.run(run())
    assert engine.most == 2
    assert (summary.answered, summary.refused, summary.lines) == (12, 1, 13) and summary.complete
    records = by_key(read_records(output))
    assert records["refused"]["response"]["status_code"] == 400
    body = records["case-7"]["response"]["body"]
    assert body["prompt"] == "case 7" and "###" in body["stop"]


def test_oversized_lines_are_reported_not_held(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n' + b"x" * 5000 + b"\n" + b'{"b": 2}')
    with open(path, "rb") as f:
        lines = list(read_lines(f, limit=1000))
    assert lines == [(1, b'{"a": 1}\n'), (2, TooLarge(5001)), (3, b'{"b": 2}')]
    assert count_lines(path) == 3


def test_usage_problems_exit_2_before_the_engine(tiny_checkpoints, tmp_path, capsys):
    folder = str(tiny_checkpoints["llama"])
    input_path = tmp_path / "in.jsonl"
    input_path.write_text(json.dumps(completion("a", {"prompt": "hi"})) + "\n")
    foreign = tmp_path / "notes.jsonl"
    foreign.write_bytes(b'{"note": "not a batch record"}\n')
    cases = [
        ([str(tmp_path / "missing"), str(input_path), str(tmp_path / "o")], "no such model folder"),
        ([folder, str(tmp_path / "none.jsonl"), str(tmp_path / "o")], "no such file"),
        ([folder, str(input_path), str(tmp_path / "no" / "o")], "does not exist"),
        ([folder, str(input_path), str(input_path)], "another file than INPUT"),
        ([folder, str(input_path), str(foreign)], "line 1 is not a batch output record"),
        ([folder, str(input_path), str(tmp_path / "o"), "--max-images-per-request", "0"],
         "max_images_per_request"),
    ]
    for argv, words in cases:
        assert skingpt4(["batch", *argv]) == 2, argv
        assert words in capsys.readouterr().err, argv
    assert foreign.read_bytes() == b'{"note": "not a batch record"}\n'  # left untouched


# --- the real command, in its own process (a second engine start) -----------------------------


@pytest.mark.slow
def test_cli_end_to_end_keeps_photos_off_disk(tiny_checkpoints, tmp_path):
    photo = photo_url(5)
    input_path, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    input_path.write_text(
        json.dumps(chat("case-1", {"model": MODEL, "messages": [image_message([photo])], **GREEDY}))
        + "\n" + json.dumps(completion("case-2", {"model": MODEL, "prompt": "x", "echo": True}))
        + "\n")
    # The engine's temp and cache folders, searched for the photo afterwards. Short: zmq's IPC
    # socket paths under TMPDIR must fit in 107 characters.
    with tempfile.TemporaryDirectory(prefix="skingpt4-batch-") as folder:
        private = Path(folder)
        for sub in ("tmp", "cache"):
            (private / sub).mkdir()
        env = dict(os.environ, TMPDIR=str(private / "tmp"), XDG_CACHE_HOME=str(private / "cache"),
                   VLLM_CACHE_ROOT=str(private / "cache" / "vllm"), PYTHONPATH=str(REPO))
        done = subprocess.run(
            [sys.executable, "-m", "serving.cli", "batch", str(tiny_checkpoints["llama"]),
             str(input_path), str(output), "--dtype", "float32", "--max-model-len", "1024"],
            cwd=private, env=env, capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout == "" and "Traceback" not in done.stderr
        assert "skingpt4 batch: 100%" in done.stderr  # the progress bar
        assert "2 lines: 1 answered, 1 refused" in done.stderr
        records = by_key(read_records(output))
        assert records["case-1"]["response"]["status_code"] == 200
        assert records["case-2"]["response"]["status_code"] == 400
        # The photo is nowhere on disk but the input, nor in the logs.
        needle = photo.split(",", 1)[1][100:160]
        assert needle not in done.stderr
        for path in private.rglob("*"):
            if path.is_file():
                assert needle.encode() not in path.read_bytes(), path
