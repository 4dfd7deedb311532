"""The prefix-cache metrics of the consult scenario and the batch-vs-server summary, on synthetic
data: cache hit rates per turn and overall, history reuse, the report's table and plots, the
session header, and the batch input and output files."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from PIL import Image

from benchmarks.batch_compare import (
    BatchResult,
    CompareConfig,
    after_first_throughput,
    compare_markdown,
    comparison,
    plot_compare,
    request_body,
    summarize_records,
    write_batch_input,
)
from benchmarks.loadgen import SESSION_HEADER, LoadConfig, cached_tokens, session_header
from benchmarks.metrics import FOLLOWUP_TURNS, RequestResult, cache_hit_rate, cache_hit_rate_by_turn, history_reuse
from benchmarks.report import consult_table, plot_consult
from benchmarks.scenarios import build_conversations


def _turn(conv, turn, prompt, output, cached, success=True) -> RequestResult:
    return RequestResult(conversation=conv, turn=turn, success=success, prompt_len=prompt,
                         output_len=output, cached_tokens=cached, ttft=0.1 * turn, latency=1.0)


# Two consults of three turns: conversation 0 reuses its history, conversation 1 does not.
RESULTS = [
    _turn(0, 1, 100, 50, 32), _turn(0, 2, 170, 50, 128), _turn(0, 3, 240, 50, 192),
    _turn(1, 1, 100, 50, 0), _turn(1, 2, 170, 50, 32), _turn(1, 3, 240, 50, 32),
]


def test_cache_hit_rate_overall_and_by_turn():
    assert cache_hit_rate(RESULTS) == pytest.approx((32 + 128 + 192 + 0 + 32 + 32) / (2 * (100 + 170 + 240)))
    assert cache_hit_rate_by_turn(RESULTS) == pytest.approx({"1": 32 / 200, "2": 160 / 340, "3": 224 / 480})
    assert cache_hit_rate(RESULTS, FOLLOWUP_TURNS) == pytest.approx((160 + 224) / (340 + 480))


def test_requests_without_cached_tokens_or_success_do_not_count():
    results = [*RESULTS, _turn(2, 1, 1000, 50, None), _turn(3, 1, 1000, 50, 1000, success=False)]
    assert cache_hit_rate(results) == cache_hit_rate(RESULTS)
    assert cache_hit_rate([_turn(0, 1, 100, 5, None)]) is None
    assert cache_hit_rate_by_turn([_turn(0, 1, 100, 5, None)]) == {}
    assert cache_hit_rate(RESULTS, range(7, 8)) is None


def test_history_reuse_relates_each_turn_to_the_previous_one():
    # Conversation 0: 128 of turn 1's 150, 192 of turn 2's 220; conversation 1: 32 of each.
    assert history_reuse(RESULTS) == pytest.approx((128 + 192 + 32 + 32) / (150 + 220 + 150 + 220))
    # A failed turn breaks the chain: the turn after it has no previous turn to compare with.
    broken = [_turn(0, 1, 100, 50, 32), _turn(0, 2, 170, 50, 128, success=False), _turn(0, 3, 240, 50, 192)]
    assert history_reuse(broken) is None
    assert history_reuse(RESULTS[:1]) is None


def test_session_header_and_cached_tokens_from_usage():
    assert session_header(LoadConfig(seed=7), 3) == {SESSION_HEADER: "7-3"}
    assert session_header(LoadConfig(session_ids=False), 3) is None
    assert cached_tokens(SimpleNamespace(prompt_tokens_details=SimpleNamespace(cached_tokens=64))) == 64
    assert cached_tokens(SimpleNamespace(prompt_tokens_details=None)) is None
    assert cached_tokens(None) is None


def _consult_record(target: str, followup: float | None, by_turn: dict) -> dict:
    return {
        "target": target, "scenario": "consult", "max_concurrency": 4, "num_prompts": 8, "session_ids": True,
        "median_ttft_by_turn_ms": {"1": 200.0, "2": 100.0, "3": 110.0, "4": 120.0},
        "followup_ttft_ratio": 0.55, "cache_hit_rate": 0.7, "cache_hit_rate_followup": followup,
        "cache_hit_rate_by_turn": by_turn, "history_reuse": 0.95,
    }


def test_consult_table_and_plot(tmp_path):
    runs = [
        _consult_record("ray-affinity", 0.83, {"1": 0.33, "2": 0.7, "3": 0.82, "4": 0.9}),
        _consult_record("ray-pow2", None, {}),
        {"target": "embedded", "scenario": "single", "max_concurrency": 4},
    ]
    table = consult_table(runs)
    rows = [line for line in table.splitlines() if line.startswith("| ray")]
    assert len(rows) == 2 and "cache hit turns 2-4" in table
    assert "| 33% | 83% | 70% | 95% |" in rows[0]
    assert "| n/a | n/a | 70% | 95% |" in rows[1]
    path = plot_consult(runs, tmp_path / "consult.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100
    assert plot_consult(runs[2:], tmp_path / "none.png") is None


# --------------------------------------------------------------------------- batch vs server


def test_batch_input_carries_the_load_generators_requests(tmp_path):
    convs = build_conversations("single", 3, (64, 48), seed=11)
    config = LoadConfig(max_tokens=12, temperature=0.0, seed=5)
    path = write_batch_input(tmp_path / "in.jsonl", convs, "skingpt4", config)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == ["req-0", "req-1", "req-2"]
    for line, conv in zip(lines, convs):
        assert line["method"] == "POST" and line["url"] == "/v1/chat/completions"
        body = line["body"]
        assert body == request_body(conv, "skingpt4", config)
        assert body["messages"] == [{"role": "user", "content": conv.user_turns[0]}]
        assert body["seed"] == 5 + conv.index and body["max_tokens"] == 12 and "stream" not in body


def _record(status: int, prompt: int = 0, completion: int = 0) -> dict:
    body = {"usage": {"prompt_tokens": prompt, "completion_tokens": completion}} if status == 200 else {"error": {}}
    return {"custom_id": "x", "response": {"status_code": status, "body": body}, "error": None}


def test_after_first_throughput():
    assert after_first_throughput([3.0, 1.0, 2.0, 2.0]) == pytest.approx(1.5)  # 3 answers in 2 s
    assert after_first_throughput([1.0]) is None and after_first_throughput([2.0, 2.0]) is None


def test_batch_records_and_the_side_by_side_summary(tmp_path):
    records = [_record(200, 100, 10), _record(200, 120, 20), _record(400), {"custom_id": None, "response": None, "error": {}}]
    assert summarize_records(records) == (2, 220, 30)
    batch = BatchResult(command="skingpt4 batch", returncode=0, requests=4, answered=2, failed=2, duration=2.0,
                        wall_s=40.0, startup_s=35.0, total_input_tokens=220, total_output_tokens=30, cpu_s=3.0,
                        record_times=(1.5, 2.0))
    assert batch.to_json()["request_throughput"] == pytest.approx(1.0)
    assert batch.to_json()["total_token_throughput"] == pytest.approx(125.0)
    assert batch.to_json()["cpu_share"] == pytest.approx(1.5)
    assert batch.to_json()["after_first_request_throughput"] == pytest.approx(2.0)
    server = {"request_throughput": 2.0, "output_throughput": 30.0, "total_token_throughput": 0.0,
              "completed": 4, "sent": 4, "duration": 2.0}
    cfg = CompareConfig(out=tmp_path, model=tmp_path, num_requests=4)
    summary = comparison(cfg, server, batch, "serve")
    ratios = summary["batch_over_server"]
    assert ratios["request_throughput"] == pytest.approx(0.5) and ratios["output_throughput"] == pytest.approx(0.5)
    assert ratios["total_token_throughput"] is None and ratios["after_first_request_throughput"] is None
    md = compare_markdown(summary)
    assert "| skingpt4 batch | default | 2 / 4 |" in md and "| batch / server | | | | 0.50x | 0.50x | n/a | n/a |" in md
    with Image.open(plot_compare(summary, tmp_path / "cmp.png")) as im:
        assert im.format == "PNG"
