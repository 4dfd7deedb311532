"""The request policy's metrics (:mod:`serving.api.metrics`) through Ray's metrics API, for the
processes of a Ray deployment: each node's metrics agent exports them on its export port with
Ray's ``ray_`` prefix (``ray_skingpt4_http_requests_total``), beside vLLM's ``ray_vllm_*``.
deploy/prometheus/prometheus.yml's Ray job renames both back, so one dashboard serves both
modes (docs/observability.md)."""

from __future__ import annotations

from collections.abc import Sequence

from serving.api import metrics as policy_metrics


class _RayMetric:
    """One Ray metric; label values by position, as :mod:`serving.api.metrics` gives them."""

    def __init__(self, metric, labels: Sequence[str]) -> None:
        self.metric, self.labels = metric, tuple(labels)

    def _tags(self, values: Sequence[str]) -> dict[str, str] | None:
        return dict(zip(self.labels, values, strict=True)) if self.labels else None

    def inc(self, labels: Sequence[str] = (), amount: float = 1.0) -> None:
        if amount > 0:  # Ray's counters take no 0 (a series appears with its first event)
            self.metric.inc(amount, tags=self._tags(labels))

    def set(self, value: float, labels: Sequence[str] = ()) -> None:
        self.metric.set(value, tags=self._tags(labels))

    def observe(self, value: float, labels: Sequence[str] = ()) -> None:
        self.metric.observe(value, tags=self._tags(labels))


class RayBackend:
    """:class:`serving.api.metrics.Backend` on ``ray.util.metrics``."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.ray = metrics

    def counter(self, name, doc, labels):
        # Ray adds "_total" to a counter's exported name, as prometheus_client does
        return _RayMetric(self.ray.Counter(name, description=doc, tag_keys=tuple(labels)), labels)

    def gauge(self, name, doc, labels):
        return _RayMetric(self.ray.Gauge(name, description=doc, tag_keys=tuple(labels)), labels)

    def histogram(self, name, doc, labels, buckets):
        return _RayMetric(self.ray.Histogram(name, description=doc, boundaries=list(buckets),
                                             tag_keys=tuple(labels)), labels)


def use_ray_metrics() -> None:
    """This process's policy metrics go through Ray (once; before the first is made)."""
    if not policy_metrics.backend_chosen():
        policy_metrics.use_backend(RayBackend())
