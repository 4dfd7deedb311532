"""When the engine dies anyway, the embedded server exits promptly and non-zero, so that a
supervisor (``deploy/skingpt4.service``: ``Restart=on-failure``) restarts it; a request in flight
gets an answer, not a hang."""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.serving.helpers import API_KEY, start_server

pytestmark = [pytest.mark.engine, pytest.mark.slow]

EXIT_WITHIN_S = 60


def engine_core(pid: int) -> psutil.Process:
    for child in psutil.Process(pid).children(recursive=True):
        if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
            return child
    raise AssertionError("no EngineCore process under the server")


def test_engine_death_exits_non_zero(tiny_checkpoints):
    # A short folder: vLLM's engine sockets live in TMPDIR, and their paths must fit 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="skingpt4-"))
    server = start_server(tiny_checkpoints["falcon"], root, "--api-key", API_KEY)
    proc = server.process.popen
    try:
        engine_core(proc.pid).send_signal(signal.SIGKILL)
        start = time.monotonic()
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
