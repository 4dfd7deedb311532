"""One embedded server per test session (an engine start costs ~40 s on 2 cores).

The server runs from a private working folder with its temp and cache folders inside it, and
its output goes to a log file, so the privacy test can search all of them for image bytes.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

API_KEY = "test-key-0123456789"
MAX_IMAGES = 2
ALLOWED_DOMAINS = ("localhost", "127.0.0.1", "images.example.org")


@dataclass
class Server:
    base_url: str
    api_key: str
    model: str
    folder: Path
    root: Path
    log: Path
    proc: subprocess.Popen

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key, max_retries=0, **kw)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def start_server(folder: Path, root: Path, *extra: str) -> Server:
    from serving.commands import free_port, wait_healthy

    root.mkdir(parents=True, exist_ok=True)
    for sub in ("tmp", "cache"):
        (root / sub).mkdir(exist_ok=True)
    port = free_port()
    env = dict(os.environ, TMPDIR=str(root / "tmp"), XDG_CACHE_HOME=str(root / "cache"),
               VLLM_CACHE_ROOT=str(root / "cache" / "vllm"))
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    log = root / "server.log"
    cmd = [sys.executable, "-m", "serving.cli", "serve", str(folder), "--port", str(port),
           "--dtype", "float32", "--max-model-len", "1024", *extra]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", API_KEY, "skingpt4", folder, root, log, proc)
    try:
        wait_healthy(server.base_url, proc)
    except Exception:
        proc.kill()
        raise RuntimeError(f"server failed to start:\n{log.read_text()[-3000:]}")
    return server


@pytest.fixture(scope="session")
def server(tiny_checkpoints, tmp_path_factory):
    from serving.commands import stop_server

    root = tmp_path_factory.mktemp("server")
    srv = start_server(
        tiny_checkpoints["llama"], root, "--api-key", API_KEY,
        "--max-images-per-request", str(MAX_IMAGES), "--allowed-media-domains", *ALLOWED_DOMAINS,
    )
    yield srv
    stop_server(srv.proc)


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="session")
def photo_urls(photos):
    from encoders.samples import encode_image

    return [data_url(encode_image(p)) for p in photos]


def image_message(urls, text: str = "What's wrong with my skin?") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}
