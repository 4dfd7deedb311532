"""Process lifecycle: SIGTERM drains in-flight requests and exits 0; `skingpt4 demo` streams an
answer and leaves no process behind. Each test starts its own server (the shared one stays up)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import psutil

from tests.serving.conftest import image_message, start_server


def test_sigterm_lets_in_flight_requests_finish(tiny_checkpoints, tmp_path, photo_urls):
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
    worker.start()
    assert started.wait(120)
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.proc.wait(timeout=120)
    worker.join(timeout=120)
    assert code == 0
    assert "error" not in result, result.get("error")
    assert result["usage"].completion_tokens == 200  # the in-flight answer was completed
    try:
        httpx.get(f"{srv.base_url}/health", timeout=2)
        raise AssertionError("the server still answers after SIGTERM")
    except httpx.ConnectError:
        pass


def test_demo_streams_an_answer_and_leaves_no_process(tiny_checkpoints, tmp_path):
    model = str(tiny_checkpoints["llama"])  # engine processes: "spawn_main", renamed "VLLM::..."
    before = {p.pid for p in psutil.process_iter()}
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "demo", "--model", model],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    answer = out.stdout.split("A:", 1)[1].strip()
    assert "Q: What's wrong with my skin?" in out.stdout and answer
    assert "server stopped (exit code 0)" in out.stderr
    left = [p for p in psutil.process_iter(["pid", "cmdline"])
            if p.info["pid"] not in before
            and any(mark in " ".join(p.info["cmdline"] or []) for mark in (model, "spawn_main", "VLLM::"))]
    assert not left, [p.info for p in left]
