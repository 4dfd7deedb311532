"""deploy/prometheus and deploy/grafana: the rules, their unit tests, the scrape config and the
dashboard are valid for promtool, every PromQL expression parses, every metric they name is one
the server exports (serving/api/metrics.py) or vLLM's loggers declare, and the dashboard's and the
rules' queries return series on a real Prometheus that scrapes an embedded-style and a Ray-style
page (the Ray job's renaming applied). No model server.

promtool and prometheus come with the Debian package ``prometheus`` (``make setup``); without them
these tests fail, they do not skip.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from serving.api.metrics import Metrics, PrometheusBackend
from tests.serving.prometheus_peer import prometheus, static_target

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
RULES_TEST = PROMETHEUS_DIR / "rules.test.yml"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "skingpt4.json"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's variables, as a query would see them once Grafana has filled them in.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
                     '"$job"': '"skingpt4"'}
LABEL_VALUES = re.compile(r"label_values\((.+),\s*\w+\)")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')  # a PromQL string: label values are not names
NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> str:
    """``promtool ARGS`` in ``cwd``; its output, or the test fails with it."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed; run `make setup` (it installs the Debian package "
                    "prometheus through scripts/setup-system.sh)")
    done = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{output}"
    return output


# --- what the files hold


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"]


def records() -> dict[str, str]:
    return {r["record"]: r["expr"] for g in rule_groups() for r in g["rules"] if "record" in r}


def alerts() -> list[dict]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> Iterator[dict]:
    """Every panel, those inside collapsed rows included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(board: dict) -> dict[str, str]:
    """``{where: PromQL}`` of the panels' targets and the query variables (``label_values``'s
    selector), with Grafana's variables filled in."""
    found = {}
    for panel in panels(board):
        for target in panel.get("targets", []):
            found[f"panel {panel['id']} {panel['title']!r} {target['refId']}"] = target["expr"]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            match = LABEL_VALUES.fullmatch(var["definition"])
            assert match, f"variable {var['name']}: {var['definition']!r}"
            found[f"variable {var['name']}"] = match.group(1)
    for where, expr in found.items():
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{where}: a Grafana variable this test does not know: {expr}"
        found[where] = expr
    return found


def rules_test_file() -> dict:
    return yaml.safe_load(RULES_TEST.read_text())


def all_promql() -> dict[str, str]:
    """Every PromQL expression of the dashboard, the rules and the rules' unit tests, and the
    unit tests' input series (selectors too)."""
    found = dashboard_queries(dashboard())
    for group in rule_groups():
        for i, rule in enumerate(group["rules"]):
            name = rule.get("record") or rule["alert"]
            found[f"rules.yml {group['name']} #{i} {name}"] = rule["expr"]
    for t, test in enumerate(rules_test_file()["tests"]):
        for s, series in enumerate(test.get("input_series", [])):
            found[f"rules.test.yml test {t} series {s}"] = series["series"]
        for e, expr_test in enumerate(test.get("promql_expr_test", [])):
            found[f"rules.test.yml test {t} expr {e}"] = expr_test["expr"]
    return found


def metric_names(expr: str) -> set[str]:
    """The names of ``expr`` that are exported metrics' (``skingpt4_*``, ``vllm:*``); recording
    rules (``skingpt4:*``), functions and label names are left out by their shape."""
    return {n for n in NAME.findall(STRING.sub('""', expr))
            if n.startswith(("skingpt4_", "vllm:"))}


# --- what the server and vLLM export


class _Inert:
    def inc(self, labels=(), amount=1.0): ...
    def set(self, value, labels=()): ...
    def observe(self, value, labels=()): ...


class _NameBackend:
    """A metrics backend that only notes the exported names of what it is asked to make."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def counter(self, name, doc, labels):
        self.names.add(name + "_total")
        return _Inert()

    def gauge(self, name, doc, labels):
        self.names.add(name)
        return _Inert()

    def histogram(self, name, doc, labels, buckets):
        self.names.update(name + suffix for suffix in HISTOGRAM_SERIES)
        return _Inert()


def skingpt4_exported() -> set[str]:
    backend = _NameBackend()
    Metrics(backend)
    return backend.names


def family(name: str) -> str:
    """A histogram's name without its series' suffix."""
    return re.sub(r"_(bucket|sum|count)$", "", name)


def vllm_declared() -> dict[str, str]:
    """``{name: counter|gauge|histogram}`` of vLLM's Prometheus loggers (read, not imported)."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin, "vLLM is not installed in this environment"
    source = (Path(spec.origin).parent / "v1" / "metrics" / "loggers.py").read_text()
    declared = {name: kind for kind, name in
                re.findall(r'_(counter|gauge|histogram)_cls\(\s*name="(vllm:\w+)"', source)}
    assert "vllm:time_to_first_token_seconds" in declared, "vLLM's loggers changed shape"
    return declared


def vllm_exported(declared: dict[str, str]) -> dict[str, tuple[str, str]]:
    """``{exported name: (declared name, kind)}``: counters end in ``_total`` (prometheus_client
    adds it), histograms come as ``_bucket``, ``_sum`` and ``_count``."""
    exported = {}
    for name, kind in declared.items():
        if kind == "counter":
            exported[name.removesuffix("_total") + "_total"] = (name, kind)
        elif kind == "histogram":
            exported.update({name + s: (name, kind) for s in HISTOGRAM_SERIES})
        else:
            exported[name] = (name, kind)
    return exported


# --- promtool


def test_rules_check():
    assert "SUCCESS" in promtool("check", "rules", RULES.name)


def test_rules_unit_tests():
    assert "SUCCESS" in promtool("test", "rules", RULES_TEST.name)


def test_config_check(tmp_path):
    """The config as shipped, with the key file it names made in a temporary folder."""
    config = yaml.safe_load(CONFIG.read_text())
    assert config["rule_files"] == ["rules.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    embedded, ray = jobs["skingpt4"], jobs["skingpt4-ray"]
    assert set(embedded["authorization"]) == {"type", "credentials_file"}, "a key file, no key"
    assert ray["file_sd_configs"] == [{"files": ["/tmp/ray/prom_metrics_service_discovery.json"]}]

    key = tmp_path / "api-key"
    key.write_text("a-scrape-key\n")
    embedded["authorization"]["credentials_file"] = str(key)
    config["rule_files"] = [str(RULES)]
    copied = tmp_path / "prometheus.yml"
    copied.write_text(yaml.safe_dump(config, sort_keys=False))
    output = promtool("check", "config", str(copied), cwd=tmp_path)
    assert "SUCCESS: 1 rule files found" in output


def test_every_expression_parses(tmp_path):
    """One recording rule per expression in a throwaway rules file: ``promtool check rules``
    parses each (promtool 2.42 has no query-parse command); a group names the source."""
    groups = [{"name": where, "rules": [{"record": f"parse_check:expr_{i}", "expr": expr}]}
              for i, (where, expr) in enumerate(all_promql().items())]
    path = tmp_path / "expressions.yml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    assert f"SUCCESS: {len(groups)} rules found" in promtool("check", "rules", str(path),
                                                            cwd=tmp_path)


# --- names


def test_skingpt4_names_are_exported():
    """A metric renamed in serving/api/metrics.py breaks this test until the files follow."""
    exported = skingpt4_exported()
    used = {where: metric_names(expr) for where, expr in all_promql().items()}
    assert any(names for names in used.values())
    unknown = {where: sorted(n for n in names if n.startswith("skingpt4_") and n not in exported)
               for where, names in used.items()}
    unknown = {where: names for where, names in unknown.items() if names}
    assert not unknown, f"not in serving/api/metrics.py: {unknown}"


def test_dashboard_shows_every_skingpt4_metric():
    """A metric added to serving/api/metrics.py needs a panel (and a rule, if it is alerted on);
    a panel shows the metrics of the recording rules it plots too."""
    recorded = records()
    shown = set()
    for expr in dashboard_queries(dashboard()).values():
        shown |= metric_names(expr)
        for name in set(NAME.findall(STRING.sub('""', expr))) & set(recorded):
            shown |= metric_names(recorded[name])
    families = {family(n) for n in shown}
    missing = sorted(n for n in skingpt4_exported() if family(n) not in families)
    assert not missing, f"no panel in {DASHBOARD.relative_to(ROOT)} shows {missing}"


def test_vllm_names_are_declared():
    exported = vllm_exported(vllm_declared())
    unknown = {where: sorted(n for n in metric_names(expr)
                             if n.startswith("vllm:") and n not in exported)
               for where, expr in all_promql().items()}
    unknown = {where: names for where, names in unknown.items() if names}
    assert not unknown, f"not in vLLM's loggers: {unknown}"


# --- structure


def test_alerts_compare_recording_rules():
    recorded = records()
    names = {a["alert"] for a in alerts()}
    assert {"SkinGPT4High5xxRate", "SkinGPT4AdmissionSaturated", "SkinGPT4AdmissionRefusing",
            "SkinGPT4SlowFirstToken", "SkinGPT4BatchStuck", "SkinGPT4WorkerRestartStorm"} <= names
    for alert in alerts():
        used = set(NAME.findall(STRING.sub('""', alert["expr"])))
        rules_used = {n for n in used if ":" in n}
        assert rules_used and rules_used <= set(recorded), (alert["alert"], rules_used)
        assert not metric_names(alert["expr"]), f"{alert['alert']}: a raw metric; record it first"
        assert alert.get("for"), alert["alert"]
        assert alert["labels"]["severity"] in ("critical", "warning"), alert["alert"]
        assert {"summary", "description"} <= set(alert["annotations"]), alert["alert"]


def test_every_alert_is_tested_firing_and_quiet():
    firing, quiet = set(), set()
    for test in rules_test_file()["tests"]:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names <= firing, f"never seen firing: {names - firing}"
    assert names <= quiet, f"never seen quiet: {names - quiet}"


def test_dashboard_shape():
    board = dashboard()
    assert 39 <= board["schemaVersion"] < 42
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Engine", "Policy", "Batch API", "Ray"]
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    # No datasource of an installation's own: every reference is the variable (or Grafana's
    # built-in annotations).
    uids = {ref["uid"] for ref in datasource_refs(board)}
    assert uids <= {"${datasource}", "-- Grafana --"}, uids


def datasource_refs(node) -> Iterator[dict]:
    """Every ``"datasource"`` object anywhere in the dashboard."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and isinstance(value, dict):
                yield value
            yield from datasource_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_refs(item)


def test_dashboard_uses_recording_rules_where_they_exist():
    """A panel that computes what a rule records would drift from the alert's number."""
    recorded = {" ".join(expr.split()): name for name, expr in records().items()}
    for where, expr in dashboard_queries(dashboard()).items():
        flat = " ".join(expr.split())
        assert flat not in recorded, f"{where}: use {recorded[flat]}"


# --- on a real Prometheus


def exported_page() -> bytes:
    """The server's metrics page with each metric given a value, the labels the rules and the
    panels select on included, and vLLM's metrics that they use (model_name, engine labels)."""
    registry = CollectorRegistry()
    m = Metrics(PrometheusBackend(registry))
    for status, code in (("200", ""), ("503", "server_busy"), ("500", "internal_error")):
        m.requests.inc(("/v1/chat/completions", "POST", status, code))
    m.request_seconds.observe(1.5, ("/v1/chat/completions",))
    m.photos.inc(("/v1/chat/completions",))
    m.tokens.inc(("none", "prompt"), 70)
    m.tokens.inc(("none", "output"), 30)
    m.admission_wait.observe(0.0)
    m.admission_reserved.set(2**20)
    m.admission_budget.set(2**30)
    m.admission_waiting.set(0)
    m.admission_refusals.inc(("queue_full",))
    m.upload_timeouts.inc(("slow",))
    m.decode_seconds.observe(0.02, ("ok",))
    m.compile_seconds.observe(0.2, ("ok",))
    m.worker_restarts.inc(("photo", "timeout"))
    m.batches.set(1, ("in_progress", "none"))
    m.batches.set(2, ("completed", "none"))
    m.batch_lines.set(3, ("waiting",))
    m.batch_lines.set(1, ("in_flight",))
    m.batch_line_outcomes.inc(("none", "completed"))
    m.batch_line_seconds.observe(4.0)
    m.batch_gate_wait.observe(0.5)
    m.stored_bytes.set(5000, ("none",))
    m.stored_files.set(2, ("none",))
    m.ingress_retries.inc()
    m.router_affinity.inc(("hit",))
    m.router_affinity.inc(("miss",))

    declared = vllm_declared()
    exported = vllm_exported(declared)
    used = {exported[n] for expr in all_promql().values() for n in metric_names(expr)
            if n.startswith("vllm:")}
    labels = ("model_name", "engine")
    for name, kind in sorted(used):
        if kind == "counter":
            Counter(name, name, labels, registry=registry).labels("skingpt4", "0").inc(10)
        elif kind == "gauge":
            Gauge(name, name, labels, registry=registry).labels("skingpt4", "0").set(0.25)
        else:
            Histogram(name, name, labels, registry=registry).labels("skingpt4", "0").observe(0.3)
    return generate_latest(registry)


def ray_named(page: bytes) -> bytes:
    """``page`` as a Ray node's metrics export port shows it: ``ray_skingpt4_*`` and
    ``ray_vllm_*`` (vLLM's ``:`` made ``_`` for OpenTelemetry)."""
    return re.sub(rb"(?m)^(# (?:HELP|TYPE) )?(skingpt4_|vllm:)",
                  lambda m: (m.group(1) or b"") + b"ray_" + m.group(2).replace(b":", b"_"), page)


@pytest.mark.slow  # a real Prometheus: about 8 s
def test_queries_return_series_on_embedded_and_ray_scrapes(tmp_path):
    """Prometheus scrapes both pages with the Ray job's renaming and the rules loaded: the Ray
    names become the embedded ones, and every panel's query and every recording rule returns
    series (a label the data lacks, or a name typo, would leave one empty)."""
    ray_job = next(job for job in yaml.safe_load(CONFIG.read_text())["scrape_configs"]
                   if "file_sd_configs" in job)
    page = exported_page()
    with static_target(page) as embedded, static_target(ray_named(page)) as ray, \
            prometheus([embedded.address, ray.address], None, RULES, tmp_path,
                       copy.deepcopy(ray_job["metric_relabel_configs"])) as prom:
        # Two scrapes of both targets (a rate needs two), then every rule group's evaluation.
        for target in (embedded.address, ray.address):
            prom.wait_for(f'count_over_time(up{{instance="{target}"}}[1m]) >= 2', bool, 20)
        for name in records():
            prom.wait_for(name, bool, timeout_s=10)
        instances = prom.query("count by (instance) (skingpt4_http_requests_total)")
        assert {r["metric"]["instance"] for r in instances} == {embedded.address, ray.address}
        ttft = prom.query("count by (instance) (vllm:time_to_first_token_seconds_bucket)")
        assert {r["metric"]["instance"] for r in ttft} == {embedded.address, ray.address}
        assert prom.query('{__name__=~"ray_(skingpt4|vllm)_.+"}') == []
        for where, expr in dashboard_queries(dashboard()).items():
            assert prom.query(expr), f"{where}: no series for {expr}"
