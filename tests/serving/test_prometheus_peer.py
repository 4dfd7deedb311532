"""tests/serving/prometheus_peer.py against a fixed /metrics page on loopback (no model server):
Prometheus scrapes it with the bearer token, evaluates the rules file, answers queries, and
refuses an expression that does not parse with its own message."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from tests.serving.prometheus_peer import PrometheusQueryError, prometheus, static_target

TOKEN = "scrape-token-0123"
RULES = """\
groups:
  - name: t
    rules:
      - record: job:skingpt4_http_requests:sum
        expr: sum by (job) (skingpt4_http_requests_total)
"""


def metrics_page() -> bytes:
    registry = CollectorRegistry()
    requests = Counter("skingpt4_http_requests", "Requests answered.", ("route", "status"),
                       registry=registry)
    requests.labels("/v1/chat/completions", "200").inc(42)
    return generate_latest(registry)


@pytest.mark.slow  # a real Prometheus: about 8 s
def test_scrapes_queries_and_evaluates_rules(tmp_path):
    rules = tmp_path / "rules.yml"
    rules.write_text(RULES)
    with static_target(metrics_page()) as target, \
            prometheus([target.address], TOKEN, rules, tmp_path / "prom") as prom:
        result = prom.wait_for('skingpt4_http_requests_total{status="200"}', bool, timeout_s=15)
        assert [float(r["value"][1]) for r in result] == [42.0]
        assert result[0]["metric"]["job"] == "skingpt4"
        recorded = prom.wait_for("job:skingpt4_http_requests:sum", bool, timeout_s=15)
        assert float(recorded[0]["value"][1]) == 42.0
        with pytest.raises(PrometheusQueryError, match="parse error"):
            prom.query("sum(rate(skingpt4_http_requests_total[5m])")
        with pytest.raises(TimeoutError):
            prom.wait_for("absent_metric_name", bool, timeout_s=0.5)
    assert target.authorizations
    assert set(target.authorizations) == {f"Bearer {TOKEN}"}


def test_refuses_targets_off_loopback(tmp_path):
    with pytest.raises(ValueError, match="loopback"):
        with prometheus(["10.0.0.5:8000"], None, None, tmp_path):
            pass
