"""The request policy's and the Batch API's metrics (docs/observability.md), beside vLLM's
engine metrics: Prometheus names with the ``skingpt4_`` prefix, base units (seconds, bytes),
counters ending in ``_total`` once exported, histograms for durations.

Each metric is declared once here (:class:`Metrics`) against a backend: ``prometheus_client``'s
default registry in the embedded server (vLLM's ``/metrics`` serves that registry, so both
appear on one page), or Ray's metrics API in Ray mode (:mod:`serving.cluster.metrics` installs
it with :func:`use_backend`; the names are the same, with Ray's ``ray_`` prefix on each node's
export port).

No label carries a question, a photo, a file name, a ``custom_id`` or an API key: a tenant is
:func:`key_id`, a short digest of its key; routes are the served routes' templates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

# Seconds: from a cache hit to a long answer or a slow upload.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)
# Seconds: photo decodes and schema compiles (bounded by their timeouts, a few seconds).
WORK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

NO_TENANT = "none"  # the tenant label of a server without API keys


def key_id(key: str | None) -> str:
    """The label and log value that stands for an API key: the first 12 hex digits of its
    SHA-256 (never the key; enough to tell a platform's keys apart)."""
    if not key:
        return NO_TENANT
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class Counter(Protocol):
    def inc(self, labels: Sequence[str] = (), amount: float = 1.0) -> None: ...


class Gauge(Protocol):
    def set(self, value: float, labels: Sequence[str] = ()) -> None: ...


class Histogram(Protocol):
    def observe(self, value: float, labels: Sequence[str] = ()) -> None: ...


class Backend(Protocol):
    """Makes the metrics: a name without ``_total`` for counters (each backend adds it)."""

    def counter(self, name: str, doc: str, labels: Sequence[str]) -> Counter: ...
    def gauge(self, name: str, doc: str, labels: Sequence[str]) -> Gauge: ...
    def histogram(self, name: str, doc: str, labels: Sequence[str],
                  buckets: Sequence[float]) -> Histogram: ...


class _Prometheus:
    """One ``prometheus_client`` metric, its label children cached by their values."""

    def __init__(self, metric, method: str) -> None:
        self.metric, self.method = metric, method
        self.children: dict[tuple[str, ...], object] = {}

    def _child(self, labels: Sequence[str]):
        key = tuple(labels)
        child = self.children.get(key)
        if child is None:
            child = self.metric.labels(*key) if key else self.metric
            self.children[key] = child
        return child

    def inc(self, labels: Sequence[str] = (), amount: float = 1.0) -> None:
        self._child(labels).inc(amount)

    def set(self, value: float, labels: Sequence[str] = ()) -> None:
        self._child(labels).set(value)

    def observe(self, value: float, labels: Sequence[str] = ()) -> None:
        self._child(labels).observe(value)


class PrometheusBackend:
    """``prometheus_client``'s default registry (the one vLLM's ``/metrics`` serves)."""

    def __init__(self, registry=None) -> None:
        import prometheus_client

        self.client = prometheus_client
        self.registry = registry if registry is not None else prometheus_client.REGISTRY

    def counter(self, name, doc, labels):
        return _Prometheus(self.client.Counter(name, doc, labels, registry=self.registry), "inc")

    def gauge(self, name, doc, labels):
        return _Prometheus(self.client.Gauge(name, doc, labels, registry=self.registry), "set")

    def histogram(self, name, doc, labels, buckets):
        return _Prometheus(self.client.Histogram(name, doc, labels, buckets=buckets,
                                                 registry=self.registry), "observe")


class Metrics:
    """Every metric of the request policy, the Batch API and Ray's ingress; one per process
    (:func:`metrics`). The label names are given with each; values are short, fixed words, a
    route template or a :func:`key_id`."""

    def __init__(self, backend: Backend) -> None:
        c, g, h = backend.counter, backend.gauge, backend.histogram
        # --- HTTP: every request the middleware sees
        self.requests = c("skingpt4_http_requests", "Requests answered, by route template, "
                          "method, status and error code ('' when it succeeded).",
                          ("route", "method", "status", "code"))
        self.request_seconds = h("skingpt4_http_request_duration_seconds", "From the request's "
                                 "first byte to its answer's last, by route template.",
                                 ("route",), DURATION_BUCKETS)
        self.photos = c("skingpt4_photos", "Photos in the requests received (refused ones "
                        "too).", ("route",))
        self.tokens = c("skingpt4_tokens", "Prompt and output tokens of answered requests, by "
                        "tenant and kind (prompt, output); streamed answers count when they "
                        "report usage.", ("tenant", "kind"))
        # --- admission: the byte budget of request bodies
        self.admission_wait = h("skingpt4_admission_wait_seconds", "Time a request body waited "
                                "for the byte budget (0 when it fit at once).", (),
                                DURATION_BUCKETS)
        self.admission_reserved = g("skingpt4_admission_reserved_bytes", "Bytes of the budget "
                                    "that request bodies hold now.", ())
        self.admission_budget = g("skingpt4_admission_budget_bytes", "The byte budget of "
                                  "request bodies (--max-inflight-mb).", ())
        self.admission_waiting = g("skingpt4_admission_queue_length", "Requests waiting for the "
                                   "byte budget or a photo decoder now.", ())
        self.admission_refusals = c("skingpt4_admission_refusals", "503s given by admission, by "
                                    "reason: queue_full, timeout, gave_way (a body that held "
                                    "part of a full budget and gave it back).", ("reason",))
        self.upload_timeouts = c("skingpt4_upload_timeouts", "Request bodies that did not "
                                 "arrive in time, by kind: deadline, slow (408) and stalled "
                                 "(400).", ("kind",))
        # --- the photo and schema worker processes
        self.decode_seconds = h("skingpt4_photo_decode_seconds", "Time to decode and shrink one "
                                "photo in a worker, by outcome (ok, refused, timeout, died, cancelled).",
                                ("outcome",), WORK_BUCKETS)
        self.compile_seconds = h("skingpt4_schema_compile_seconds", "Time to compile one "
                                 "response_format schema in a worker, by outcome.", ("outcome",),
                                 WORK_BUCKETS)
        self.worker_restarts = c("skingpt4_worker_restarts", "Worker processes replaced, by "
                                 "pool (photo, schema) and reason (timeout, died).",
                                 ("pool", "reason"))
        # --- the Batch API
        self.batches = g("skingpt4_batches", "Batches in the store, by status and tenant.",
                         ("status", "tenant"))
        self.batch_lines = g("skingpt4_batch_lines", "Batch lines now waiting for a place or in "
                             "flight, by state (waiting, in_flight).", ("state",))
        self.batch_line_outcomes = c("skingpt4_batch_line_results", "Batch lines recorded, by "
                                     "tenant and outcome: completed (to the output file), "
                                     "failed (to the error file: refused, failed, cancelled "
                                     "or expired), retried (a server error, tried again in "
                                     "the next pass).", ("tenant", "outcome"))
        self.batch_line_seconds = h("skingpt4_batch_line_duration_seconds", "Time one batch "
                                    "line's request takes, from its check to its answer.", (),
                                    DURATION_BUCKETS)
        self.batch_gate_wait = h("skingpt4_batch_live_gate_wait_seconds", "Time a batch line "
                                 "waited for live traffic to leave it room.", (),
                                 DURATION_BUCKETS)
        self.stored_bytes = g("skingpt4_stored_bytes", "Bytes of files the Batch API stores, by "
                              "tenant.", ("tenant",))
        self.stored_files = g("skingpt4_stored_files", "Files the Batch API stores, by tenant.",
                              ("tenant",))
        # --- Ray's ingress
        self.ingress_retries = c("skingpt4_ingress_retries", "Requests the ingress sent again "
                                 "after a replica failed under them.", ())
        self.router_affinity = c("skingpt4_router_affinity", "Consult routing decisions, by "
                                 "result: hit (the replica the consult id hashes to can take "
                                 "it), miss (that replica is not among those offered: the "
                                 "consult moves), none (no consult id, or no replica offered: "
                                 "prefix affinity decides).", ("result",))
        # Counters of rare events exist from the start at 0, so that a rate over them is 0,
        # not "no data", until the first one happens.
        for reason in ("queue_full", "timeout", "gave_way"):
            self.admission_refusals.inc((reason,), 0)
        for kind in ("deadline", "slow", "stalled"):
            self.upload_timeouts.inc((kind,), 0)
        for pool in ("photo", "schema"):
            for reason in ("timeout", "died"):
                self.worker_restarts.inc((pool, reason), 0)
        for result in ("hit", "miss", "none"):
            self.router_affinity.inc((result,), 0)


_metrics: Metrics | None = None
_backend: Backend | None = None


def use_backend(backend: Backend) -> None:
    """Where this process's metrics go (before the first :func:`metrics`); Ray's ingress and
    replicas set Ray's metrics API here."""
    global _backend
    if _metrics is not None:
        raise RuntimeError("the metrics were already made with another backend")
    _backend = backend


def backend_chosen() -> bool:
    """Whether this process's backend is set (by :func:`use_backend`, or by a first use)."""
    return _metrics is not None or _backend is not None


def metrics() -> Metrics:
    """This process's metrics, made on first use."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics(_backend or PrometheusBackend())
    return _metrics
