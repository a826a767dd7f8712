"""The DNS proxy's metrics under Istio's names, registered with the process's metrics.

The counters are plain integers bumped on the hot path (an attribute
increment, no lock) and read when scraped; Istio's DNS counters end in
``_total`` (``istio_agent_dns_requests_total``).
"""

from __future__ import annotations

from collections.abc import Callable

from xdsfast.metrics import PREFIX, Count, Histogram, ReadGauge, Registry, Total

UPSTREAM_BUCKETS = (0.001, 0.005, 0.01, 0.1, 1.0, 5.0)  # Istio's


def register_table_gauges(registry: Registry, stats: Callable[[], tuple[int, int, int]]) -> None:
    """``xdsfast_dns_table_{hosts,names,bytes}`` (xdsfast's own) from ``stats()``: the
    compiled name table served now (``DnsTable.stats``)."""
    for index, what, doc in (
        (0, "hosts", "NameTable entries in the DNS name table served now."),
        (1, "names", "Names the DNS name table answers (A and AAAA each), CNAMEs included."),
        (2, "bytes", "Memory held by the DNS name table served now (buffers and index)."),
    ):
        registry.register(
            ReadGauge(f"xdsfast_dns_table_{what}", doc, lambda i=index: stats()[i])  # type: ignore[misc]
        )


def register_table_builds(registry: Registry, superseded: Callable[[], int]) -> None:
    """``xdsfast_dns_table_builds_superseded_total`` (xdsfast's own) from ``superseded()``
    (``DnsTable.superseded``)."""
    registry.register(
        Total(
            "xdsfast_dns_table_builds_superseded_total",
            "DNS name table builds stopped early because a newer NameTable (or new rules) "
            "arrived; the newest is built next.",
            superseded,
        )
    )


class DnsMetrics:
    """Requests served, forwarded, failed upstream, forward latency; and (xdsfast's own,
    Istio has none) messages not served as queries."""

    def __init__(self, registry: Registry) -> None:
        self.requests = 0
        self.upstream_requests = 0
        self.upstream_failures = 0
        self.malformed = Count(
            "xdsfast_dns_malformed_messages_total",
            "DNS messages not served as queries, by reply: formerr (a malformed query, also "
            "counted in istio_agent_dns_requests_total) or none (shorter than a header, or a "
            "response: dropped unanswered).",
            label="reply",
        )
        self.upstream_duration = Histogram(
            PREFIX + "dns_upstream_request_duration_seconds",
            "Time to get an answer from the upstream resolvers, per forwarded query.",
            UPSTREAM_BUCKETS,
        )
        registry.register(self.upstream_duration)
        registry.register(
            Total(PREFIX + "dns_requests_total", "DNS queries served.", lambda: self.requests)
        )
        registry.register(
            Total(
                PREFIX + "dns_upstream_requests_total",
                "DNS queries forwarded upstream.",
                lambda: self.upstream_requests,
            )
        )
        registry.register(
            Total(
                PREFIX + "dns_upstream_failures_total",
                "Forwarded DNS queries that no upstream answered (SERVFAIL).",
                lambda: self.upstream_failures,
            )
        )
        registry.register(self.malformed)
