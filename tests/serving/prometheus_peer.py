"""A real Prometheus as a test peer: it scrapes loopback targets every second, evaluates a rules
file every second, and answers instant queries, so a test can check that the dashboard's and the
rules' PromQL (deploy/) works on what a server exports.

    with prometheus(["127.0.0.1:8000"], API_KEY, RULES, tmp_path) as prom:
        prom.wait_for('skingpt4:http_requests:rate5m', bool, timeout_s=30)

Prometheus hands new targets to its scrapers every 5 s, so the first scrape comes about 5 s after
the start; a rate needs a second scrape, a recording rule over it one more evaluation.
:func:`static_target` serves a fixed ``/metrics`` page, for tests of the queries alone.

``/usr/bin/prometheus`` comes with the Debian package ``prometheus`` (``make setup`` installs it,
through scripts/setup-system.sh). Prometheus listens on 127.0.0.1 only and scrapes loopback
addresses only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from serving.engine.process import free_port

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# Loopback only: a proxy from the environment must not see these requests.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PrometheusQueryError(RuntimeError):
    """Prometheus refused a query (``bad_data``: the expression does not parse, or
    ``execution``); the message is Prometheus's own."""


def prometheus_binary() -> str:
    """The ``prometheus`` command; an error that says how to install it when it is missing."""
    found = shutil.which("prometheus")
    if found is None:
        raise RuntimeError("prometheus is not installed; run `make setup` (it installs the Debian "
                           "package prometheus through scripts/setup-system.sh)")
    return found


@dataclass
class Prometheus:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log: Path

    def query(self, expr: str) -> list[dict]:
        """The instant query's result (``data.result``: for a vector, a list of
        ``{"metric": {...}, "value": [time, "text"]}``). Raises :class:`PrometheusQueryError`."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with _DIRECT.open(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:  # 400 bad_data, 422 execution, 503 timeout
            try:
                body = json.load(exc)
            except ValueError:
                raise PrometheusQueryError(f"{expr!r}: HTTP {exc.code}") from None
        if body.get("status") != "success":
            raise PrometheusQueryError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def wait_for(self, expr: str, predicate: Callable[[list[dict]], bool],
                 timeout_s: float) -> list[dict]:
        """Queries ``expr`` until ``predicate`` holds for its result, and returns that result;
        :class:`TimeoutError` with the last result after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expr!r} after {timeout_s:g} s: {result}")
            time.sleep(0.25)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def _check_loopback(target: str) -> None:
    host = target.rsplit(":", 1)[0]
    if host not in LOOPBACK_HOSTS or not target.rsplit(":", 1)[-1].isdigit():
        raise ValueError(f"target {target!r}: give HOST:PORT with a loopback host "
                         f"({', '.join(LOOPBACK_HOSTS)})")


def write_config(path: Path, targets: list[str], bearer_token: str | None, rules: Path | None,
                 metric_relabel_configs: list[dict] | None = None) -> None:
    """A config with one job, ``skingpt4``, scraping ``targets``' /metrics every second."""
    job: dict = {"job_name": "skingpt4", "static_configs": [{"targets": list(targets)}]}
    if bearer_token is not None:
        token = path.parent / "bearer-token"
        token.write_text(bearer_token)
        token.chmod(0o600)
        job["authorization"] = {"type": "Bearer", "credentials_file": str(token)}
    if metric_relabel_configs:
        job["metric_relabel_configs"] = metric_relabel_configs
    config: dict = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [job],
    }
    if rules is not None:
        config["rule_files"] = [str(Path(rules).resolve())]
    path.write_text(yaml.safe_dump(config, sort_keys=False))


@contextmanager
def prometheus(targets: list[str], bearer_token: str | None, rules: Path | None, tmp: Path,
               metric_relabel_configs: list[dict] | None = None) -> Iterator[Prometheus]:
    """Prometheus on a free 127.0.0.1 port, its data under ``tmp``, scraping ``targets``
    (``HOST:PORT``, loopback) with ``bearer_token``, ``rules`` loaded and
    ``metric_relabel_configs`` (e.g. the Ray job's of deploy/prometheus/prometheus.yml) applied;
    ready when it is yielded, stopped on exit."""
    for target in targets:
        _check_loopback(target)
    binary = prometheus_binary()
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "prometheus.yml"
    write_config(config, targets, bearer_token, rules, metric_relabel_configs)
    port = free_port()
    log = tmp / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_ready(prom)
        yield prom
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(prom: Prometheus) -> None:
    """Until ``/-/ready`` answers 200; an error with Prometheus's log if it exits or is slow."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if prom.process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {prom.process.returncode}:\n"
                               f"{prom.log_tail()}")
        try:
            with _DIRECT.open(f"{prom.url}/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:  # not listening yet, or 503 while it starts
            pass
        time.sleep(0.1)
    raise RuntimeError(f"prometheus was not ready in {START_TIMEOUT_S:g} s:\n{prom.log_tail()}")


@dataclass
class StaticTarget:
    address: str  # 127.0.0.1:PORT
    authorizations: list[str] = field(default_factory=list)  # each scrape's Authorization header


@contextmanager
def static_target(page: bytes) -> Iterator[StaticTarget]:
    """A loopback HTTP server whose ``/metrics`` answers ``page`` (Prometheus's text format)."""
    target = StaticTarget("")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            target.authorizations.append(self.headers.get("Authorization", ""))
            status, body = (200, page) if self.path == "/metrics" else (404, b"")
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # a line per scrape would flood the test's output
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    target.address = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield target
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
