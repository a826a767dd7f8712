"""The DNS proxy's metrics under Istio's names, in the process's Prometheus registry.

The counters are plain integers bumped on the hot path (an attribute
increment, no lock) and exported through a collector; Istio's DNS counters
end in ``_total`` (``istio_agent_dns_requests_total``), which is exactly what
a Prometheus counter family called ``istio_agent_dns_requests`` exposes.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from xdsfast.metrics import PREFIX

UPSTREAM_BUCKETS = (0.001, 0.005, 0.01, 0.1, 1.0, 5.0)  # Istio's


class DnsMetrics:
    """Requests served, forwarded, failed upstream, and forward latency."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = 0
        self.upstream_requests = 0
        self.upstream_failures = 0
        self.upstream_duration = Histogram(
            PREFIX + "dns_upstream_request_duration_seconds",
            "Time to get an answer from the upstream resolvers, per forwarded query.",
            buckets=UPSTREAM_BUCKETS,
            registry=registry,
        )
        registry.register(_Counters(self))


class _Counters:
    def __init__(self, metrics: DnsMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        for name, doc, value in (
            ("dns_requests", "DNS queries served.", m.requests),
            ("dns_upstream_requests", "DNS queries forwarded upstream.", m.upstream_requests),
            (
                "dns_upstream_failures",
                "Forwarded DNS queries that no upstream answered (SERVFAIL).",
                m.upstream_failures,
            ),
        ):
            yield CounterMetricFamily(PREFIX + name, doc, value=value)
