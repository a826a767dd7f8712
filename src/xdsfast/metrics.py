"""The Prometheus registry, with Istio's metric names.

Istio exports its xDS-proxy counters without a ``_total`` suffix
(``istio_agent_xds_proxy_requests``), which prometheus-client's own Counter
cannot do, so those are plain integers exposed through a collector with the
exact names.  They are also what the relay bumps per message: an attribute
increment, no lock.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

PREFIX = "istio_agent_"


class Count:
    """A counter with Istio's exact name (no ``_total``), optionally per label value."""

    __slots__ = ("by", "doc", "label", "name", "value")

    def __init__(self, name: str, doc: str, label: str | None = None) -> None:
        self.name = name
        self.doc = doc
        self.label = label
        self.value = 0
        self.by: dict[str, int] = {}

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def inc_label(self, value: str, amount: int = 1) -> None:
        self.by[value] = self.by.get(value, 0) + amount

    def get(self, label_value: str | None = None) -> int:
        return self.value if label_value is None else self.by.get(label_value, 0)

    def text(self) -> str:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} counter"]
        if self.label is None:
            lines.append(f"{self.name} {self.value}")
        else:
            for value, count in sorted(self.by.items()):
                lines.append(f'{self.name}{{{self.label}="{_escape(value)}"}} {count}')
        return "\n".join(lines) + "\n"


class Gauge:
    """A gauge with an exact name, set from the hot path without a lock."""

    __slots__ = ("doc", "name", "value")

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.doc = doc
        self.value = 0.0

    def text(self) -> str:
        return (
            f"# HELP {self.name} {self.doc}\n# TYPE {self.name} gauge\n{self.name} {self.value}\n"
        )


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Every metric of one xdsfast process.

    Istio-named exact counters live in ``exact``; histograms and the rest (DNS,
    later issues) in a prometheus-client ``registry``; ``exposition`` joins both.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        p = PREFIX
        self.istiod_connection_failures = Count(
            p + "istiod_connection_failures",
            "Upstream (istiod) connections that could not be made.",
        )
        self.istiod_connection_terminations = Count(
            p + "istiod_connection_terminations",
            "Upstream (istiod) streams ended, by type: cancelled (expected) or error.",
            label="type",
        )
        self.envoy_connection_terminations = Count(
            p + "envoy_connection_terminations",
            "Downstream (Envoy) streams ended, by type: cancelled (expected) or error.",
            label="type",
        )
        self.xds_proxy_requests = Count(
            p + "xds_proxy_requests", "Requests sent upstream, Envoy's and the agent's own."
        )
        self.xds_proxy_responses = Count(
            p + "xds_proxy_responses", "Responses received from upstream."
        )
        self.pilot_xds_recv_max = Gauge(
            p + "pilot_xds_recv_max", "Largest request received from Envoy, in bytes."
        )
        self.dropped_responses = Count(
            "xdsfast_xds_dropped_responses_total",
            "Upstream responses not forwarded to Envoy, by reason.",
            label="reason",
        )
        self.bad_messages = Count(
            "xdsfast_xds_malformed_messages_total",
            "Messages that are not well-formed discovery messages, by direction.",
            label="direction",
        )
        self.consumed_responses = Count(
            "xdsfast_xds_consumed_responses_total",
            "Responses the agent consumed itself (NameTable), by result: applied or rejected.",
            label="result",
        )
        self.exact: list[Count | Gauge] = [
            self.istiod_connection_failures,
            self.istiod_connection_terminations,
            self.envoy_connection_terminations,
            self.xds_proxy_requests,
            self.xds_proxy_responses,
            self.pilot_xds_recv_max,
            self.dropped_responses,
            self.bad_messages,
            self.consumed_responses,
        ]

    def exposition(self) -> bytes:
        """Prometheus text format, as served on ``/stats/prometheus``."""
        exact = "".join(metric.text() for metric in self.exact).encode()
        return exact + generate_latest(self.registry)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample's value by its exposed name (None if absent), for tests and debug."""
        for metric in self.exact:
            if metric.name == name:
                if isinstance(metric, Gauge):
                    return metric.value
                return metric.get(next(iter(labels.values())) if labels else None)
        return self.registry.get_sample_value(name, labels)
