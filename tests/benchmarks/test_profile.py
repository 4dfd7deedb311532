"""The engine profile's arithmetic: py-spy's raw stacks to CPU milliseconds per request by
category (the profile itself is a benchmark run, not a test)."""

from __future__ import annotations

from collections import Counter

from benchmarks.profile import (
    FRONT_OTHER,
    OTHER,
    breakdown,
    categorize,
    categorize_front,
    markdown,
    profiled_pids,
    read_raw,
    wanted,
)

ROOT = "run_engine_core (vllm/v1/engine/core.py:900);step (vllm/v1/engine/core.py:400)"
FORWARD = ROOT + ";execute_model (vllm/v1/worker/gpu_model_runner.py:3000)"
STACKS = {
    FORWARD + ";_execute_mm_encoder (vllm/v1/worker/gpu_model_runner.py:2100);"
    "forward (plugins/skingpt4/model.py:80)": 30,
    FORWARD + ";forward (vllm/model_executor/models/llama.py:300);"
    "forward (vllm/model_executor/layers/attention/attention.py:200)": 20,
    FORWARD + ";forward (vllm/model_executor/models/llama.py:250);"
    "forward (vllm/model_executor/layers/linear.py:500)": 40,
    FORWARD + ";sample_tokens (vllm/v1/worker/gpu_model_runner.py:3500);"
    "forward (vllm/v1/sample/sampler.py:60)": 5,
    ROOT + ";schedule (vllm/v1/core/sched/scheduler.py:300)": 4,
    ROOT + ";encode (vllm/v1/serial_utils.py:100)": 3,
    ROOT + ";_loop (vllm/v1/engine/core.py:1000)": 2,
    ROOT + ";dequeue (vllm/distributed/device_communicators/shm_broadcast.py:971);"
    "SpinCondition.wait (vllm/distributed/device_communicators/shm_broadcast.py:208)": 6,
}


def test_each_stack_goes_to_the_most_specific_category():
    names = [categorize(stack) for stack in STACKS]
    assert names == ["vision encoder (EVA ViT, Q-Former, projection)", "attention (paged KV cache)",
                     "language model: linear layers (oneDNN GEMM)", "sampling and logits",
                     "scheduler and KV-cache manager", "outputs, serialisation and IPC", OTHER,
                     "waiting on the other process (shared-memory queue spin)"]


def test_raw_samples_become_milliseconds_per_request(tmp_path):
    raw = tmp_path / "stacks.txt"
    raw.write_text("".join(f"{stack} {n}\n" for stack, n in STACKS.items()) + "garbage line\n")
    stacks = read_raw(raw)
    assert stacks == Counter(STACKS) and read_raw(tmp_path / "missing.txt") == Counter()
    # 100 Hz: a sample is 10 ms; 2 requests
    ms = breakdown(stacks, rate=100, answered=2, label="VLLM::Worker")
    assert ms["vision encoder (EVA ViT, Q-Former, projection)"] == 150.0
    assert ms[OTHER] == 10.0 and abs(sum(ms.values()) - 10 * 110 / 2) < 1e-9
    assert list(ms)[0].startswith("language model")  # largest first


def test_the_markdown_names_the_machine_and_every_category():
    run = {"concurrency": 32, "requests": 4, "answered": 4,
           "load": {"request_throughput": 2.0, "median_ttft_ms": 300.0, "median_tpot_ms": 30.0},
           "processes": {"VLLM::Worker 7": {
               "label": "VLLM::Worker", "cpu_ms_per_request": 120.0, "sampled_ms_per_request": 100.0,
               "categories_ms_per_request": {"attention (paged KV cache)": 60.0, OTHER: 40.0}}}}
    md = markdown({"machine": {"cpu_model": "EPYC", "isa": "AVX2", "cpu_count": 2, "memory_bytes": 2**33},
                   "versions": {"vllm": "0.32.0", "torch": "2.13.0"}, "target": "embedded",
                   "max_tokens": 64, "rate": 250, "runs": [run]})
    assert md.startswith("Machine: EPYC, AVX2, 2 CPUs, 8 GiB, vLLM 0.32.0, torch 2.13.0.")
    assert "| `VLLM::Worker` | attention (paged KV cache) | 60.0 | 60% |" in md
    assert "**measured CPU (all threads)** | **120.0**" in md


LOOP = ("run (uvicorn/server.py:60);_run_once (asyncio/base_events.py:1900);"
        "_run (asyncio/events.py:80)")
FRONT_STACKS = {
    # the innermost frame that matches a category decides, not the server loop around it
    LOOP + ";__call__ (serving/api/middleware.py:130);b64decode (base64.py:80)":
        "photos: base64, decode, resize",
    LOOP + ";__call__ (starlette/middleware/base.py:100);__call__ (serving/api/middleware.py:130);"
    "remote (ray/serve/handle.py:700);serialize (ray/_private/serialization.py:500);"
    "dumps (cloudpickle/cloudpickle.py:1400)": "Ray: actor calls, object transfer, serialisation",
    LOOP + ";handle_request (ray/serve/_private/proxy.py:900)": "Ray Serve: proxy and replica machinery",
    LOOP + ";chat (ray/llm/_internal/serve/core/server/llm_server.py:400);"
    "model_dump_json (pydantic/main.py:400)": "pydantic: request and response models",
    LOOP + ";chat_completion_stream_generator (vllm/entrypoints/openai/chat_completion/serving.py:600);"
    "dumps (json/__init__.py:230)": "JSON",
    LOOP + ";generate (vllm/v1/engine/async_llm.py:500);"
    "process_outputs (vllm/v1/engine/output_processor.py:400)":
        "vLLM's engine client: inputs, outputs, detokenizing",
    LOOP + ";feed (serving/api/streams.py:70)": "the policy layer (serving/api)",
    LOOP + ";send (h11/_connection.py:500)": "HTTP server and ASGI (uvicorn, Starlette, FastAPI)",
    LOOP: "asyncio event loop",
    "main (worker.py:10);loop (somewhere.py:5)": FRONT_OTHER,
}


def test_a_front_end_stack_goes_to_its_innermost_matching_frame():
    assert {stack: categorize_front(stack) for stack in FRONT_STACKS} == FRONT_STACKS


def test_breakdown_reads_a_process_by_its_kind():
    stack = LOOP + ";feed (serving/api/streams.py:70)"
    assert breakdown(Counter({stack: 4}), rate=100, answered=1, label="ray::ProxyActor") == {
        "the policy layer (serving/api)": 40.0}
    assert breakdown(Counter({stack: 4}), rate=100, answered=1, label="VLLM::EngineCore") == {OTHER: 40.0}


def test_which_processes_are_sampled():
    engine, front = "VLLM::EngineCore", ["ray::ProxyActor", "ray::ServeReplica:skingpt4:SkinGPT4Ingress",
                                         "-m serving.cli serve", "-m serving.api.workers photo"]
    native = ["raylet", "gcs_server", "ray::IDLE"]
    assert [wanted(engine, w) for w in ("engine", "front", "all")] == [True, False, True]
    assert all(wanted(x, "front") and wanted(x, "all") and not wanted(x, "engine") for x in front)
    assert not any(wanted(x, w) for x in native for w in ("engine", "front", "all"))


def test_the_server_process_itself_is_sampled_under_the_runs_own_name():
    import os

    assert profiled_pids(os.getpid(), "front")[os.getpid()] == "server"  # as cpu_by_process names it
    assert os.getpid() not in profiled_pids(os.getpid(), "engine")
