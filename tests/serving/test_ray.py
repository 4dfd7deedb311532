"""Ray Serve mode: the app's settings, then the app on Ray's own multi-node test cluster (three Ray
nodes on this machine).

``skingpt4 serve MODEL --ray --replicas 2 --accelerator cpu`` joins the cluster (``RAY_ADDRESS``)
and is driven through the official ``openai`` SDK. Each worker node has room for exactly one
replica (3 logical CPUs; a CPU replica takes 2: its actor and its engine), as a one-GPU node would,
and the head node for none, so two healthy replicas must sit on two different nodes. Start-up is
about 1-2 minutes on 2 cores; the cluster is shut down at module end.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import openai
import pytest

from serving.process import ServerProcess, free_port
from tests.serving.helpers import data_url, image_message

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "ray-test-key-0123456789"
MODEL = "skingpt4"
GREEDY = dict(temperature=0, max_tokens=12)
START_TIMEOUT_S = 480

# Every test imports Ray; those that use the cluster also get `engine` (tests/conftest.py).
pytestmark = pytest.mark.ray


def test_replicas_get_the_engine_options():
    """Replicas get the embedded server's engine options, the same dict (whose command-line form
    tests/serving/test_server_config.py parses back), for their accelerator."""
    from serving.ray_app import RayAppArgs, llm_config

    server = {"model": "/srv/m", "gpu_memory_utilization": 0.85, "quantization": "fp8"}
    configs = {}
    for accelerator in ("cpu", "gpu"):
        args = RayAppArgs.model_validate({"server": server, "replicas": {"accelerator": accelerator}})
        configs[accelerator] = config = llm_config(args)
        assert config.engine_kwargs == args.server.engine_options(on_gpu=accelerator == "gpu")
        assert config.engine_kwargs["enable_log_requests"] is False  # bodies hold the photos
    gpu, cpu = configs["gpu"], configs["cpu"]
    assert "enforce_eager" not in gpu.engine_kwargs and "block_size" not in gpu.engine_kwargs
    assert gpu.engine_kwargs["gpu_memory_utilization"] == 0.85
    assert gpu.engine_kwargs["quantization"] == "fp8"
    assert "VLLM_CPU_KVCACHE_SPACE" not in gpu.runtime_env["env_vars"]
    assert cpu.engine_kwargs["enforce_eager"] is True and cpu.engine_kwargs["block_size"] == 32
    assert "gpu_memory_utilization" not in cpu.engine_kwargs
    assert "VLLM_CPU_KVCACHE_SPACE" in cpu.runtime_env["env_vars"]


def test_replica_settings():
    from serving.ray_app import ReplicaSettings, RayAppArgs, llm_config

    fixed = ReplicaSettings(accelerator="cpu", num_replicas=2).deployment_config(30)
    assert fixed == {"graceful_shutdown_timeout_s": 30, "num_replicas": 2}
    scaled = ReplicaSettings(min_replicas=1, max_replicas=4, target_ongoing_requests=8)
    assert scaled.deployment_config(30)["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    with pytest.raises(ValueError, match="not both"):
        ReplicaSettings(num_replicas=2, max_replicas=3)
    with pytest.raises(ValueError, match="exceeds"):
        ReplicaSettings(min_replicas=3, max_replicas=2)

    server = {"model": "/srv/m", "tensor_parallel_size": 4, "policy": {"api_key": "secret"}}
    gpu = llm_config(RayAppArgs.model_validate({"server": server, "replicas": {"accelerator": "gpu"}}))
    assert gpu.accelerator_config is None or gpu.accelerator_config.kind == "gpu"
    assert gpu.placement_group_config["strategy"] == "STRICT_PACK"
    assert gpu.placement_group_config["bundles"] == [{"GPU": 1}] * 4
    assert "secret" not in str(gpu.runtime_env)  # the key goes to the ingress only
    cpu = llm_config(RayAppArgs.model_validate({"server": server, "replicas": {"accelerator": "cpu"}}))
    assert cpu.accelerator_config.kind == "cpu"
    assert cpu.runtime_env["env_vars"]["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0"


def test_ingress_takes_the_key_from_its_environment(monkeypatch):
    from serving.policy import ServePolicy
    from serving.ray_app import with_key_from_env

    monkeypatch.setenv("SKINGPT4_API_KEY", "from-env")
    assert with_key_from_env(ServePolicy()).api_key == "from-env"
    assert with_key_from_env(ServePolicy(api_key="given")).api_key == "given"
    monkeypatch.delenv("SKINGPT4_API_KEY")
    assert with_key_from_env(ServePolicy()).api_key is None


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as mp:
        # Inherited by every Ray process: no telemetry, a small KV cache, no model hub.
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            workers = [c.add_node(num_cpus=3) for _ in range(2)]
            c.wait_for_nodes()
            c.worker_node_ids = {w.node_id for w in workers}
            yield c
        finally:
            c.shutdown()


class RayServe:
    """``skingpt4 serve --ray`` joined to the test cluster, started by the first test that needs it.

    The SIGTERM test stops it, and a second start cannot follow on the same port (Serve's proxy,
    which outlives the CLI, keeps listening there) nor on another (Serve keeps its first HTTP
    options). So that test is marked ``stops_shared_server`` and runs after the others
    (tests/conftest.py); a test that asks for the server after it gets a clear error.
    """

    def __init__(self, cluster, model: Path, root: Path) -> None:
        self.cluster = cluster
        self.model = model
        self.root = root
        self.base_url = f"http://127.0.0.1:{free_port()}"
        self.process: ServerProcess | None = None

    def running(self) -> ServerProcess:
        if self.process is None:
            cmd = [sys.executable, "-m", "serving.cli", "serve", str(self.model), "--ray",
                   "--replicas", "2", "--accelerator", "cpu", "--dtype", "float32",
                   "--max-model-len", "1024", "--max-num-seqs", "8",
                   "--port", self.base_url.rsplit(":", 1)[1], "--api-key", API_KEY]
            # /health is 200 only once the ingress and the LLM replicas answer.
            self.process = ServerProcess(
                cmd, root_url=self.base_url, log_path=self.root / "serve.log", cwd=REPO_ROOT,
                env=dict(os.environ, RAY_ADDRESS=self.cluster.address), name="serve --ray",
                startup_timeout_s=START_TIMEOUT_S, stop_timeout_s=120, probe_timeout_s=10,
            ).start()
        elif self.process.poll() is not None:
            raise RuntimeError(
                f"serve --ray has stopped (exit code {self.process.poll()}): a test ran after the "
                "one marked stops_shared_server; it must run last (tests/conftest.py orders it)")
        return self.process

    def stop(self) -> int | None:
        return None if self.process is None else self.process.stop()


@pytest.fixture(scope="module")
def ray_server(cluster, tiny_checkpoints, tmp_path_factory):
    """The CLI in Ray mode (a :class:`RayServe`), started by the first test that asks for it."""
    serve = RayServe(cluster, tiny_checkpoints["llama"], tmp_path_factory.mktemp("ray-serve"))
    try:
        yield serve
    finally:
        serve.stop()


@pytest.fixture
def client(ray_server):
    ray_server.running()
    return openai.OpenAI(base_url=f"{ray_server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def photo_url(photos):
    from encoders.samples import encode_image

    return data_url(encode_image(photos[0]))


def test_replicas_on_different_nodes(cluster, ray_server):
    from ray.util.state import list_actors

    ray_server.running()
    replicas = [
        a for a in list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")], limit=1000)
        if a.class_name.startswith(f"ServeReplica:skingpt4:LLMServer:{MODEL}")
    ]
    nodes = {a.node_id for a in replicas}
    assert len(replicas) == 2
    assert len(nodes) == 2, f"both replicas on one node: {nodes}"
    assert nodes <= cluster.worker_node_ids


def test_image_chat_includes_image_positions(client, photo_url):
    question = "What's wrong with my skin?"
    with_image = client.chat.completions.create(
        model=MODEL, messages=[image_message([photo_url], question)], **GREEDY)
    text_only = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], **GREEDY)
    assert with_image.choices[0].message.content
    assert with_image.choices[0].finish_reason in ("stop", "length")
    # <Img><ImageHere></Img> becomes 32 image positions plus the <Img> tag tokens.
    assert with_image.usage.prompt_tokens >= text_only.usage.prompt_tokens + 32


def test_streaming(client, photo_url):
    messages = [image_message([photo_url])]
    full = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2, "the answer did not arrive in pieces"
    assert "".join(deltas) == full.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_api_key_required_except_health(ray_server):
    ray_server.running()
    base = ray_server.base_url
    missing = httpx.get(f"{base}/v1/models", timeout=30)
    assert missing.status_code == 401
    assert "API key" in missing.json()["error"]["message"]
    wrong = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    models = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert [m["id"] for m in models.json()["data"]] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).models.list()


def test_bad_image_is_refused_and_server_stays_up(client, photo_url):
    broken = "data:image/jpeg;base64,!!!this is not base64!!!"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[image_message([broken])], **GREEDY)
    assert err.value.status_code == 400
    assert "base64" in str(err.value)
    again = client.chat.completions.create(model=MODEL, messages=[image_message([photo_url])], **GREEDY)
    assert again.choices[0].message.content


@pytest.mark.stops_shared_server
def test_sigterm_exits_zero_and_removes_the_app(ray_server):
    process = ray_server.running()
    assert process.stop() == 0, process.log_tail()  # SIGTERM to the CLI; SIGKILL only after 120 s
    # Serve itself stays up on the shared cluster; only this app is gone.
    try:
        status = httpx.get(f"{ray_server.base_url}/health", timeout=10).status_code
    except httpx.HTTPError:
        status = None
    assert status != 200
