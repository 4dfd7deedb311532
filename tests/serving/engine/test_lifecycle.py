"""Process lifecycle: SIGTERM drains in-flight requests and exits 0; `skingpt4 demo` streams an
answer and leaves no process behind. Each test starts its own server (the shared one stays up)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from tests.serving.helpers import image_message, start_server

pytestmark = [pytest.mark.engine, pytest.mark.slow]  # each test starts a server of its own


def test_sigterm_lets_in_flight_requests_finish(tiny_checkpoints, tmp_path, photo_urls):
    """The stop policy of serving/engine/process.py (SIGTERM to the leader, then wait) lets vLLM drain."""
    srv = start_server(tiny_checkpoints["falcon"], tmp_path / "srv")
    result: dict = {}
    started = threading.Event()

    def stream():
        client = srv.client(timeout=120)
        pieces = []
        try:
            for chunk in client.chat.completions.create(
                model=srv.model, messages=[image_message(photo_urls[:1])], max_tokens=200,
                temperature=0, stream=True, extra_body={"ignore_eos": True},
                stream_options={"include_usage": True},
            ):
                started.set()
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                if chunk.usage:
                    result["usage"] = chunk.usage
            result["text"] = "".join(pieces)
        except Exception as exc:  # recorded; the assertion below says what happened
            result["error"] = exc

    worker = threading.Thread(target=stream)
    try:
        worker.start()
        assert started.wait(120)
        code = srv.process.stop()  # SIGTERM to the leader; SIGKILL (code -9) only after 60 s
        worker.join(timeout=120)
    finally:
        srv.process.stop()  # no-op when stopped; otherwise nothing of the server outlives the test
    assert code == 0, srv.process.log_tail()
    assert "error" not in result, result.get("error")
    assert result["usage"].completion_tokens == 200  # the in-flight answer was completed
    try:
        httpx.get(f"{srv.base_url}/health", timeout=2)
        raise AssertionError("the server still answers after SIGTERM")
    except httpx.ConnectError:
        pass


def test_demo_streams_an_answer_and_leaves_no_process(tiny_checkpoints, tmp_path):
    # Every process the demo starts inherits this variable, whatever its session or parent later;
    # other engines on the machine (other test runs) do not have it.
    mark = f"demo-{uuid.uuid4().hex}"
    env = dict(os.environ, SKINGPT4_TEST_MARK=mark)
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "demo", "--model", str(tiny_checkpoints["llama"])],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[3], env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    answer = out.stdout.split("A:", 1)[1].strip()
    assert "Q: What's wrong with my skin?" in out.stdout and answer
    assert "server stopped (exit code 0)" in out.stderr
    left = [p.info for p in psutil.process_iter(["pid", "cmdline", "environ", "status"])
            if (p.info["environ"] or {}).get("SKINGPT4_TEST_MARK") == mark
            and p.info["status"] != psutil.STATUS_ZOMBIE]
    assert not left, [(p["pid"], p["cmdline"]) for p in left]
