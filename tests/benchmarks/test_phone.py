"""The ``phone`` scenario and the server-side measurements, without an engine: photo variants,
the RSS sampler on a child that allocates, per-photo math, 503 counting, the new targets'
command lines, and a whole phone sweep against a stand-in server the harness launches."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from openai import AsyncOpenAI
from PIL import Image

from benchmarks import targets
from benchmarks.__main__ import main
from benchmarks.loadgen import LoadConfig, LoadResult, run_load
from benchmarks.metrics import MemorySampler, RequestResult, ServerUsage, per_photo
from benchmarks.report import markdown_report, phone_table, run_record, summary_of
from benchmarks.scenarios import (
    PHONE_BASE_PHOTOS,
    PHONE_IMAGE_SIZE,
    build_conversations,
    default_image_size,
    images_in,
    luma_table_offset,
    phone_base_photo,
    phone_photo_variant,
)
from benchmarks.sweep import SweepConfig, plan_runs, runs_for
from benchmarks.targets import REPO_ROOT, Target, TargetError, checkout_origins

SMALL = (320, 240)  # the phone scenario's structure at a size that builds in milliseconds


def _pixels(data_url: str) -> np.ndarray:
    head, b64 = data_url.split(",", 1)
    assert head == "data:image/jpeg;base64"
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        assert im.format == "JPEG"
        return np.asarray(im.convert("RGB"))


# --------------------------------------------------------------------------- scenario


def test_phone_defaults_to_a_12_megapixel_photo():
    assert default_image_size("phone") == PHONE_IMAGE_SIZE == (4000, 3000)
    assert default_image_size("single") == (512, 384)


def test_phone_conversations_one_distinct_photo_and_one_question_each():
    convs = build_conversations("phone", 2 * PHONE_BASE_PHOTOS + 1, SMALL, seed=7)
    urls = []
    for conv in convs:
        (turn,) = conv.user_turns
        image, text = turn
        assert image["type"] == "image_url" and text["type"] == "text" and text["text"]
        urls.append(image["image_url"]["url"])
    pixels = [_pixels(u) for u in urls]
    assert all(p.shape == (SMALL[1], SMALL[0], 3) for p in pixels)
    # Distinct decoded images: no cache of vLLM's sees a photo twice.
    assert len({p.tobytes() for p in pixels}) == len(pixels)
    # Variants of a base photo keep its size: every body costs the server the same.
    assert len({len(u) for u in urls[::PHONE_BASE_PHOTOS]}) == 1
    # Photos follow the seed: conversation 0 of seed 8 has the photo of conversation 1 of seed 7.
    assert [c.user_turns for c in build_conversations("phone", 3, SMALL, seed=7)] == [c.user_turns for c in convs[:3]]
    assert build_conversations("phone", 1, SMALL, seed=8)[0].user_turns[0][0] == convs[1].user_turns[0][0]
    assert phone_base_photo.cache_info().currsize <= 2 * PHONE_BASE_PHOTOS


def test_photo_variant_is_a_valid_jpeg_with_slightly_different_pixels():
    base = phone_base_photo(0, SMALL)
    assert phone_photo_variant(base, 0) == base
    decoded = {}
    for v in (0, 1, 2, 2**23, 2**24 - 1):
        jpeg = phone_photo_variant(base, v)
        assert len(jpeg) == len(base)
        with Image.open(io.BytesIO(jpeg)) as im:
            im.load()
            decoded[v] = np.asarray(im).astype(int)
    for v, pixels in decoded.items():
        if v:
            diff = np.abs(pixels - decoded[0])
            assert diff.any() and diff.max() <= 8  # another image, the same photo to the eye
    with pytest.raises(ValueError, match="outside"):
        phone_photo_variant(base, 2**24)
    with pytest.raises(ValueError, match="not a JPEG"):
        luma_table_offset(b"\x89PNG\r\n\x1a\n" + bytes(100))


def test_images_in_counts_the_history():
    part = {"type": "image_url", "image_url": {"url": "data:,"}}
    messages = [{"role": "user", "content": [part, part, {"type": "text", "text": "q"}]},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "more?"}]
    assert images_in(messages) == 2 and images_in(messages[1:]) == 0


# --------------------------------------------------------------------------- sweep plan and targets


def test_sweep_plans_phone_first_and_only_for_phone_targets(tmp_path):
    cfg = SweepConfig(out=tmp_path, model=tmp_path, targets=(*SweepConfig.targets, "before"))
    plan = plan_runs(cfg)
    assert "vllm" in cfg.targets and [r.name for r in plan][0] == "phone-c32"
    phone = next(r for r in plan if r.scenario == "phone")
    assert phone.conversations == 32
    assert [r.name for r in runs_for(cfg, plan, "vllm")] == ["phone-c32"]
    assert runs_for(cfg, plan, "before") == plan  # the older release runs what embedded runs
    assert runs_for(cfg, plan, "embedded") == plan
    assert all(r.scenario != "phone" for r in runs_for(cfg, plan, "reference"))
    assert len({r.seed for r in plan}) == len(plan)
    assert runs_for(SweepConfig(out=tmp_path, model=tmp_path, phone_targets=("embedded",)), plan, "vllm") == []


def test_vllm_target_is_vllms_own_server_with_the_same_basics(tmp_path):
    t = Target.named("vllm", tmp_path / "model", port=1234)
    argv = list(t.argv)
    assert argv[:2] == [sys.executable, "-c"] and "run_server" in argv[2] and "__main__" in argv[2]
    rest = argv[3:]
    assert rest[rest.index("--model") + 1] == str((tmp_path / "model").resolve())
    assert rest[rest.index("--dtype") + 1] == "float32" and "--enforce-eager" in rest
    assert rest[rest.index("--max-model-len") + 1] == "2048" and rest[rest.index("--port") + 1] == "1234"
    assert "--middleware" not in rest and t.cwd == REPO_ROOT and t.env == {}
    compile(argv[2], "<vllm target>", "exec")


def test_before_target_runs_in_its_checkout(tmp_path):
    with pytest.raises(ValueError, match="needs a checkout"):
        Target.named("before", tmp_path)
    with pytest.raises(ValueError, match="runs this checkout"):
        Target.named("embedded", tmp_path, checkout=tmp_path)
    t = Target.named("before", "model", port=1234, checkout=tmp_path)
    assert t.argv[1:5] == ("-m", "serving.cli", "serve", str(Path("model").resolve()))  # absolute: cwd differs
    assert t.cwd == tmp_path.resolve() and t.env == {"PYTHONPATH": str(tmp_path.resolve())}
    assert t.command_line().startswith(f"cd {tmp_path.resolve()} && PYTHONPATH={tmp_path.resolve()} ")


def _fake_checkout(root, packages=("serving", "plugins", "encoders")):
    for pkg in packages:
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    if "serving" in packages:
        (root / "serving" / "cli.py").write_text("")
        (root / "serving" / "middleware.py").write_text("")
    if "plugins" in packages:
        (root / "plugins" / "skingpt4").mkdir()
        (root / "plugins" / "skingpt4" / "__init__.py").write_text("")
    return root


def test_checkout_origins_shadow_the_editable_install(tmp_path):
    old = _fake_checkout(tmp_path / "old")
    origins = checkout_origins(old)
    assert set(origins) == set(targets.CHECKOUT_MODULES)
    assert all(o.startswith(str(old.resolve())) for o in origins.values()), origins
    # A package the checkout lacks comes from this checkout's editable install: refused.
    partial = _fake_checkout(tmp_path / "partial", packages=("serving", "plugins"))
    with pytest.raises(TargetError, match="come from elsewhere.*encoders"):
        checkout_origins(partial)


# --------------------------------------------------------------------------- memory and per-photo math

_ALLOCATING_PARENT = textwrap.dedent("""
    import subprocess, sys
    child = "import time; time.sleep(0.6); x = b'x' * (160 * 2**20); time.sleep(0.8); del x; time.sleep(30)"
    subprocess.run([sys.executable, "-c", child])
""")


def test_memory_sampler_sees_a_child_allocate_and_free():
    parent = subprocess.Popen([sys.executable, "-c", _ALLOCATING_PARENT])
    children: list[psutil.Process] = []
    try:
        with MemorySampler(parent.pid, interval_s=0.05, rescan_s=0.1) as sampler:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.1)
                if sampler.peak - sampler.idle > 150 * 2**20 and sampler.rss[-1] < sampler.peak - 100 * 2**20:
                    break  # allocated and freed again
    finally:
        children = psutil.Process(parent.pid).children(recursive=True)
        for p in [*children, psutil.Process(parent.pid)]:
            p.kill()
        parent.wait()
        psutil.wait_procs(children, timeout=5)
    assert sampler.idle > 0 and len(sampler.rss) == len(sampler.times) >= 5
    assert sampler.peak - sampler.idle > 150 * 2**20  # the child's 160 MiB, in the tree of the parent
    assert sampler.rss[-1] < sampler.peak - 100 * 2**20
    assert sampler.times == sorted(sampler.times)


def _done(conv, images, success=True, status=None, out=4) -> RequestResult:
    return RequestResult(conversation=conv, success=success, output_len=out if success else 0, ttft=0.1,
                         latency=0.5, images=images, status=status, prompt_len=40,
                         error="" if success else f"InternalServerError: {status}")


def test_per_photo_costs():
    results = [_done(i, 1) for i in range(6)] + [_done(6, 1, success=False, status=503), _done(7, 1, success=False, status=503)]
    usage = ServerUsage(cpu_s=3.0, api_cpu_s=1.2, idle_rss=2 * 2**30, peak_rss=2 * 2**30 + 400 * 2**20)
    got = per_photo(results, usage, concurrency=4)
    assert got["photos"] == 8 and got["photos_answered"] == 6 and got["photos_in_flight"] == 4
    assert got["server_cpu_ms_per_photo"] == pytest.approx(500.0)
    assert got["api_cpu_ms_per_photo"] == pytest.approx(200.0)
    assert got["rss_growth_bytes"] == 400 * 2**20 and got["rss_growth_per_photo_mib"] == pytest.approx(100.0)
    assert per_photo(results, ServerUsage(), concurrency=4)["api_cpu_ms_per_photo"] is None


def _record(target, results, usage, concurrency=32) -> dict:
    load = LoadResult(results=results, duration=2.0, client_cpu_s=0.5, sent=len(results))
    config = LoadConfig(max_concurrency=concurrency, max_tokens=4, show_progress=False)
    return run_record(target=target, model="m", scenario="phone", config=config, load=load,
                      num_conversations=len(results), image_size=PHONE_IMAGE_SIZE, server=usage)


def test_phone_report_renders_the_new_columns():
    ok = [_done(i, 1) for i in range(30)]
    busy = [_done(30, 1, success=False, status=503), _done(31, 1, success=False, status=503)]
    runs = [
        summary_of(_record("embedded", ok + busy, ServerUsage(3.0, 0.9, 2**30, 2**30 + 64 * 2**20, [0.0, 0.05], [2**30, 2**30 + 64 * 2**20]))),
        summary_of(_record("vllm", [_done(i, 1) for i in range(32)], ServerUsage(9.6, 6.4, 2**30, 5 * 2**30))),
    ]
    assert runs[0]["rejected_503"] == 2 and "rss_bytes" not in runs[0] and "statuses" not in runs[0]
    table = phone_table(runs)
    lines = table.splitlines()
    assert "API server CPU ms/photo" in lines[0] and "RSS growth MiB/photo" in lines[0] and "503s" in lines[0]
    # target | concurrency | requests | photos | req/s | tok/s | API ms | tree ms | peak GiB | MiB/photo | 503s
    assert lines[2] == "| embedded | 32 | 32 | 32 | 15.00 | 60.0 | 30 | 100 | 1.06 | 2.0 | 2 |"
    assert lines[3] == "| vllm | 32 | 32 | 32 | 16.00 | 64.0 | 200 | 300 | 5.00 | 128.0 | 0 |"
    md = markdown_report(runs, {"command": "x"})
    assert "## Phone photos" in md and "4000x3000" in md
    assert "## Scenario 'single'" not in md and "## Goals" not in md  # no such runs: no empty tables


# --------------------------------------------------------------------------- 503s and images through the load generator


def _sse(*events: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def _chunk(content: str | None, usage: dict | None = None) -> dict:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "fake", "choices": choices, "usage": usage}


def test_loadgen_counts_503s_and_images():
    seen_images = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen_images.append(images_in(body["messages"]))
        if body["seed"] % 2:  # odd conversations: refused as admission control refuses
            return httpx.Response(503, headers={"retry-after": "5"},
                                  json={"error": {"message": "busy", "type": "server_busy", "code": "server_busy"}})
        usage = {"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42}
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=_sse(_chunk("ok"), _chunk(" fine"), _chunk(None, usage)))

    async def go():
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        client = AsyncOpenAI(base_url="http://fake/v1", api_key="k", http_client=http, max_retries=0)
        try:
            convs = build_conversations("phone", 4, SMALL, seed=0)
            return await run_load(client, "fake", convs, LoadConfig(max_concurrency=4, show_progress=False))
        finally:
            await client.close()

    load = asyncio.run(go())
    assert seen_images == [1, 1, 1, 1]
    by_conv = {r.conversation: r for r in load.results}
    assert [by_conv[i].status for i in range(4)] == [None, 503, None, 503]
    assert [by_conv[i].success for i in range(4)] == [True, False, True, False]
    assert all(r.images == 1 for r in load.results) and by_conv[0].output_len == 2


# --------------------------------------------------------------------------- a phone sweep, launched

# A stand-in OpenAI server the harness starts like a real target: it decodes every photo (CPU and
# memory in its own process) and streams a two-token answer.
_FAKE_OPENAI = textwrap.dedent("""
    import base64, io, json, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from PIL import Image
    class H(BaseHTTPRequestHandler):
        def _send(self, code, body, kind="application/json"):
            self.send_response(code); self.send_header("content-type", kind); self.end_headers(); self.wfile.write(body)
        def do_GET(self):
            self._send(200, json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode())
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            images = 0
            for m in body["messages"]:
                for part in m["content"] if isinstance(m["content"], list) else []:
                    if part["type"] == "image_url":
                        Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1]))).load()
                        images += 1
            usage = {"prompt_tokens": 10 + 32 * images, "completion_tokens": 2, "total_tokens": 12 + 32 * images}
            chunks = [{"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]} for t in ("ok", " fine")]
            chunks.append({"choices": [], "usage": usage})
            out = b"".join(b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 0,
                                                   "model": "fake", **c}).encode() + b"\\n\\n" for c in chunks)
            self._send(200, out + b"data: [DONE]\\n\\n", "text/event-stream")
        def log_message(self, *a): pass
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def test_phone_sweep_against_a_launched_stand_in(tmp_path, monkeypatch):
    script = tmp_path / "fake_openai.py"
    script.write_text(_FAKE_OPENAI)
    monkeypatch.setitem(targets.TARGET_ARGS, "embedded", (str(script), "{port}"))
    out = tmp_path / "out"
    code = main([
        "sweep", "--targets", "embedded", "--concurrency", "", "--consult-concurrency", "",
        "--phone-concurrency", "4", "--phone-requests", "6", "--phone-image-size", "640x480",
        "--model", str(tmp_path), "--max-tokens", "4", "--warmup-requests", "1", "--no-progress",
        "--startup-timeout-s", "30", "--out", str(out),
    ])
    assert code == 0
    run = json.loads((out / "runs" / "embedded-phone-c4.json").read_text())
    assert run["scenario"] == "phone" and run["image_size"] == "640x480"
    assert run["completed"] == 6 and run["photos"] == 6 and run["rejected_503"] == 0
    assert run["images"] == [1] * 6 and run["statuses"] == [None] * 6
    assert run["api_server_cpu_s"] > 0 and run["api_cpu_ms_per_photo"] > 0
    # The tree is the leader alone here; the two readings are a moment apart (one clock tick).
    assert run["server_cpu_ms_per_photo"] >= run["api_cpu_ms_per_photo"] - 10 / 6
    assert 0 < run["idle_rss_bytes"] <= run["peak_rss_bytes"] == max(run["idle_rss_bytes"], *run["rss_bytes"])
    assert run["photos_in_flight"] == 4 and run["rss_growth_per_photo_mib"] >= 0
    assert len(run["rss_times"]) == len(run["rss_bytes"]) >= 1
    md = (out / "report.md").read_text()
    assert "## Phone photos" in md and "| embedded | 4 | 6 | 6 |" in md
    summary = json.loads((out / "summary.json").read_text())
    assert [r["scenario"] for r in summary["runs"]] == ["phone"] and summary["failures"] == {}


def test_run_command_prints_the_servers_cost(tmp_path, monkeypatch, capsys):
    script = tmp_path / "fake_openai.py"
    script.write_text(_FAKE_OPENAI)
    monkeypatch.setitem(targets.TARGET_ARGS, "vllm", (str(script), "{port}"))
    code = main([
        "run", "--target", "vllm", "--scenario", "phone", "--image-size", "320x240", "--num-requests", "2",
        "--max-concurrency", "2", "--model", str(tmp_path), "--warmup-requests", "0", "--no-progress",
        "--startup-timeout-s", "30", "--out", str(tmp_path / "out"),
    ])
    assert code == 0
    line = capsys.readouterr().out
    assert "vllm-phone-c2.json: 2 completed, 0 failed (0 with 503)" in line and "ms/photo, peak RSS" in line
    run = json.loads((tmp_path / "out" / "vllm-phone-c2.json").read_text())
    assert run["image_size"] == "320x240" and run["photos"] == 2 and run["peak_rss_bytes"] > 0
