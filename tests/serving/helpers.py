"""Helpers shared by the serving tests (no fixtures here: those live in conftest.py).

`start_server` runs the embedded server from a private working folder with its temp and cache
folders inside it, and its output goes to a log file, so the privacy test can search all of them
for image bytes.
"""

from __future__ import annotations

import base64
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from serving.engine.process import ServerProcess, free_port

API_KEY = "test-key-0123456789"
MAX_IMAGES = 4
# Admission bounds of the session's server: a budget that admits about three requests with four
# phone photos each at once, so the image-load test sees both answers and 503s.
SERVER_INFLIGHT_BYTES = 512 * 2**20
SERVER_DECODES = 2
ALLOWED_DOMAINS = ("localhost", "127.0.0.1", "images.example.org")


@dataclass
class Server:
    base_url: str
    api_key: str
    model: str
    folder: Path
    root: Path
    log: Path
    process: ServerProcess

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key, **{"max_retries": 0, **kw})

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def start_server(folder: Path, root: Path, *extra: str) -> Server:
    """``skingpt4 serve`` on ``folder`` (float32, 1024 positions), healthy; stop it with
    ``server.process.stop()``. Raises :class:`serving.engine.process.ServerStartError` with the log tail."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("tmp", "cache"):
        (root / sub).mkdir(exist_ok=True)
    port = free_port()
    env = dict(os.environ, TMPDIR=str(root / "tmp"), XDG_CACHE_HOME=str(root / "cache"),
               VLLM_CACHE_ROOT=str(root / "cache" / "vllm"))
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    cmd = [sys.executable, "-m", "serving.cli", "serve", str(folder), "--port", str(port),
           "--dtype", "float32", "--max-model-len", "1024", *extra]
    base_url = f"http://127.0.0.1:{port}"
    process = ServerProcess(cmd, root_url=base_url, log_path=root / "server.log", cwd=root, env=env,
                            name="the test server")
    process.start()
    return Server(base_url, API_KEY, "skingpt4", folder, root, process.log_path, process)


@contextmanager
def local_ray_server(folder: Path, root: Path, api_key: str, *extra: str,
                     name: str = "serve --ray --replicas 1") -> Iterator[ServerProcess]:
    """``skingpt4 serve FOLDER --ray --replicas 1`` (CPU, float32) on a local Ray instance of its
    own (no ``RAY_ADDRESS``), as a user runs it on one machine, healthy; stopped on leaving.
    ``extra``: more flags (context length, batch size, layout, data folder)."""
    port = free_port()
    cmd = [sys.executable, "-m", "serving.cli", "serve", str(folder), "--ray", "--replicas", "1",
           "--accelerator", "cpu", "--dtype", "float32", "--port", str(port),
           "--api-key", api_key, *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    server = ServerProcess(cmd, root_url=f"http://127.0.0.1:{port}", log_path=root / "serve.log",
                           cwd=Path(__file__).resolve().parents[2], env=env, name=name,
                           startup_timeout_s=480, stop_timeout_s=120, probe_timeout_s=10).start()
    try:
        yield server
    finally:
        server.stop()


BATCH_FINAL = ("completed", "failed", "cancelled", "expired")


def batch_final(client, batch_id: str, timeout_s: float = 300.0, every_s: float = 0.2):
    """A batch once it has ended (any of ``BATCH_FINAL``), polled through an ``openai`` client
    (or any client with its ``batches.retrieve``); fails the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (batch := client.batches.retrieve(batch_id)).status not in BATCH_FINAL:
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(every_s)
    return batch


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(urls, text: str = "What's wrong with my skin?") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


@contextmanager
def ray_test_cluster(worker_cpus: int = 3, workers: int = 2) -> Iterator:
    """Ray's multi-node test cluster on this machine: a head node with 1 logical CPU and
    ``workers`` worker nodes of ``worker_cpus`` each (a CPU replica takes 2: actor and engine).
    ``worker_node_ids`` holds the workers' node ids. Shut down on exit."""
    import pytest
    from ray.cluster_utils import Cluster

    from serving.cluster.session import local_environment

    with pytest.MonkeyPatch.context() as mp:
        # Inherited by every Ray process: no telemetry, a small KV cache, no model hub, and Ray
        # Serve as `serve --ray` runs it on a local instance (and docs/ray-cluster.md on a cluster).
        for key, value in local_environment().items():
            mp.setenv(key, value)
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            nodes = [c.add_node(num_cpus=worker_cpus) for _ in range(workers)]
            c.wait_for_nodes()
            c.worker_node_ids = {n.node_id for n in nodes}
            yield c
        finally:
            c.shutdown()


def jpeg_scan_bomb(repeats: int, size: int = 2000) -> bytes:
    """A valid progressive JPEG whose smallest scan is repeated ``repeats`` times: each copy is a
    few bytes, and each costs the decoder a pass over every block (20,000 copies of a
    2000x2000 photo: about 300 KB and 45 s of CPU)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 150, 130)).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    starts, i = [], 0
    while (i := data.find(b"\xff\xda", i)) >= 0:
        starts.append(i)
        i += 2
    eoi = data.rfind(b"\xff\xd9")
    scans = [data[a:b] for a, b in zip(starts, [*starts[1:], eoi])]
    smallest = min(scans[1:], key=len)  # an AC band of end-of-band runs
    return data[:eoi] + smallest * repeats + data[eoi:]


def schema_bomb(properties: int = 16) -> dict:
    """A small JSON schema whose grammar takes about a second per property to compile."""
    pattern = "^((b|c){1,128}){1,128}$"
    return {"type": "object", "required": [f"p{i}" for i in range(properties)],
            "properties": {f"p{i}": {"type": "string", "pattern": pattern} for i in range(properties)}}


def comparable(body: dict) -> dict:
    """An answer body without what differs between two runs of the same request: ids, times, and
    the prompt tokens the prefix cache happened to hold or fill."""
    body = {k: v for k, v in body.items() if k not in ("id", "created", "system_fingerprint")}
    usage = dict(body.get("usage") or {})
    details = dict(usage.get("prompt_tokens_details") or {})
    for counted_by_the_cache in ("cached_tokens", "created_cache_tokens"):
        details.pop(counted_by_the_cache, None)
    return body | {"usage": usage | {"prompt_tokens_details": details or None}}
