"""Every metric of the process, in Prometheus text format with Istio's exact names.

The exposition is written here rather than with prometheus-client: that library
costs ~3 MB of idle RSS (it pulls in http.server, email, urllib.request and
wsgiref) for what is a few string joins.  Istio exports its xDS-proxy counters
without a ``_total`` suffix (``istio_agent_xds_proxy_requests``), which is why
these are plain integers with exact names; they are also what the relay bumps
per message: an attribute increment, no lock.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from xdsfast import _ext, route

PREFIX = "istio_agent_"

Labels = dict[str, str]


class Exposed(Protocol):
    """One metric family as the process exposes it."""

    def text(self) -> str:
        """Its HELP, TYPE and sample lines, newline-terminated."""
        ...

    def sample(self, name: str, labels: Labels | None) -> float | None:
        """One sample's value by exposed name and labels, or None if not this family's."""
        ...


class Registry(Protocol):
    """Where a component registers its metrics: :class:`Metrics`.  The parameter is
    ``Any`` so that callers still passing a prometheus-client ``CollectorRegistry``
    (benchmarks/bench_dns.py) keep type-checking; such a registry only holds them."""

    def register(self, metric: Any, /) -> None: ...


class Count(route.Tally):
    """A counter with Istio's exact name (no ``_total``), optionally per label value; its
    unlabelled ``value`` is the route core's (a C field when compiled)."""

    __slots__ = ("by", "doc", "label", "name")

    def __init__(self, name: str, doc: str, label: str | None = None) -> None:
        super().__init__()
        self.name = name
        self.doc = doc
        self.label = label
        self.by: dict[str, int] = {}

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def inc_label(self, value: str, amount: int = 1) -> None:
        self.by[value] = self.by.get(value, 0) + amount

    def get(self, label_value: str | None = None) -> int:
        return self.value if label_value is None else self.by.get(label_value, 0)

    def sample(self, name: str, labels: Labels | None) -> float | None:
        """Any one label value selects (its key is not checked); none, the unlabelled total."""
        if name != self.name:
            return None
        return self.get(next(iter(labels.values())) if labels else None)

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

    def sample(self, name: str, labels: Labels | None) -> float | None:
        return self.value if name == self.name else None

    def text(self) -> str:
        return (
            f"# HELP {self.name} {self.doc}\n# TYPE {self.name} gauge\n{self.name} {self.value}\n"
        )


class Total:
    """A counter exposed as ``name`` (which ends in ``_total``) whose value is read from
    its owner at scrape time, so the owner's hot path bumps a plain attribute."""

    __slots__ = ("doc", "name", "read")
    kind = "counter"

    def __init__(self, name: str, doc: str, read: Callable[[], float]) -> None:
        self.name = name
        self.doc = doc
        self.read = read

    def sample(self, name: str, labels: Labels | None) -> float | None:
        return float(self.read()) if name == self.name and not labels else None

    def text(self) -> str:
        n = self.name
        return f"# HELP {n} {self.doc}\n# TYPE {n} {self.kind}\n{n} {_float(self.read())}\n"


class ReadGauge(Total):
    """A gauge whose value is read from its owner when scraped (a size, not a count)."""

    __slots__ = ()
    kind = "gauge"


class Info:
    """Constant labels on a sample of value 1 (``<name>_info``), as Prometheus info metrics."""

    __slots__ = ("doc", "labels", "name")

    def __init__(self, name: str, doc: str, labels: Labels) -> None:
        self.name = name + "_info"
        self.doc = doc
        self.labels = dict(labels)

    def sample(self, name: str, labels: Labels | None) -> float | None:
        return 1.0 if name == self.name and (labels or {}) == self.labels else None

    def text(self) -> str:
        n = self.name
        pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in self.labels.items())
        return f"# HELP {n} {self.doc}\n# TYPE {n} gauge\n{n}{{{pairs}}} 1.0\n"


DIRECTIONS = ("request", "response")


class TypeBytes(route.ByteTotals):
    """Bytes of one type URL, per direction; the relay adds to these per message."""

    __slots__ = ()


class BytesByType:
    """A counter labelled ``type_url`` and ``direction`` (request: Envoy -> istiod,
    response: istiod -> Envoy or the agent), kept as one :class:`TypeBytes` per type."""

    __slots__ = ("by", "doc", "name")

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.doc = doc
        self.by: dict[str, TypeBytes] = {}

    def of(self, type_url: str) -> TypeBytes:
        """The totals of one type, created on first use (callers keep the reference)."""
        totals = self.by.get(type_url)
        if totals is None:
            totals = self.by[type_url] = TypeBytes()
        return totals

    def get(self, type_url: str, direction: str) -> int:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be request or response, not {direction!r}")
        totals = self.by.get(type_url)
        return 0 if totals is None else int(getattr(totals, direction))

    def sample(self, name: str, labels: Labels | None) -> float | None:
        if name != self.name:
            return None
        return self.get(labels["type_url"], labels["direction"]) if labels else None

    def text(self) -> str:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} counter"]
        for type_url, totals in sorted(self.by.items()):
            for direction in DIRECTIONS:
                lines.append(
                    f'{self.name}{{type_url="{_escape(type_url)}",direction="{direction}"}} '
                    f"{getattr(totals, direction)}"
                )
        return "\n".join(lines) + "\n"


# Forwarding a response takes microseconds unless Envoy is slow to read.
PUSH_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0
)  # fmt: skip


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _float(value: float) -> str:
    """A sample value as a float (``3.0``), the way these metrics have always been shown."""
    value = float(value)
    if math.isfinite(value):
        return repr(value)
    return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")


class LatencyHistogram(route.Latencies):
    """A histogram observed per forwarded response: the counting is ``route.Latencies``
    (compiled: no call into Python; prometheus-client's costs ~2 µs an observation, more
    than the rest of the relay's per-message bookkeeping), the name and exposition here."""

    __slots__ = ("doc", "name")

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...]) -> None:
        super().__init__(bounds)
        self.name = name
        self.doc = doc

    def get(self, suffix: str) -> float:
        return float(self.count) if suffix == "_count" else self.sum

    def sample(self, name: str, labels: Labels | None) -> float | None:
        """``_count`` and ``_sum``, and ``_bucket`` by its ``le`` label (cumulative)."""
        if name in (f"{self.name}_count", f"{self.name}_sum"):
            return self.get(name[len(self.name) :])
        if name == f"{self.name}_bucket" and labels and "le" in labels:
            for le, running in self._cumulative():
                if le == labels["le"]:
                    return float(running)
        return None

    def _cumulative(self) -> list[tuple[str, int]]:
        """(``le`` label, observations at or below it) per bucket, ``+Inf`` last."""
        out, running = [], 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out

    def text(self) -> str:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} histogram"]
        lines += [f'{self.name}_bucket{{le="{le}"}} {n}' for le, n in self._cumulative()]
        lines += [f"{self.name}_sum {self.sum!r}", f"{self.name}_count {self.count}"]
        return "\n".join(lines) + "\n"


class Histogram(LatencyHistogram):
    """The same histogram shown as the DNS and Wasm histograms always were: float counts,
    ``_count`` before ``_sum``."""

    __slots__ = ()

    def text(self) -> str:
        n = self.name
        lines = [f"# HELP {n} {self.doc}", f"# TYPE {n} histogram"]
        lines += [f'{n}_bucket{{le="{le}"}} {_float(c)}' for le, c in self._cumulative()]
        lines += [f"{n}_count {_float(self.count)}", f"{n}_sum {_float(self.sum)}"]
        return "\n".join(lines) + "\n"


class Metrics:
    """Every metric of one xdsfast process, exposed in registration order."""

    def __init__(self) -> None:
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
        self.streamed_responses = Count(
            "xdsfast_xds_streamed_responses_total",
            "Responses written to Envoy as they arrived from istiod (cut-through), not held "
            "whole first.",
        )
        self.consumed_responses = Count(
            "xdsfast_xds_consumed_responses_total",
            "Responses the agent consumed itself (NameTable), by result: applied or rejected.",
            label="result",
        )
        self.xds_bytes = BytesByType(
            "xdsfast_xds_bytes_total",
            "Bytes of discovery messages, by type URL and direction: request (Envoy -> istiod) "
            "or response (istiod -> Envoy, or consumed by the agent).",
        )
        self.push_latency = LatencyHistogram(
            "xdsfast_xds_push_latency_seconds",
            "From a response's arrival from istiod to its write to Envoy completing.",
            tuple(PUSH_LATENCY_BUCKETS),
        )
        self.exposed: list[Exposed] = [
            self.istiod_connection_failures,
            self.istiod_connection_terminations,
            self.envoy_connection_terminations,
            self.xds_proxy_requests,
            self.xds_proxy_responses,
            self.pilot_xds_recv_max,
            self.dropped_responses,
            self.bad_messages,
            self.streamed_responses,
            self.consumed_responses,
            self.xds_bytes,
            self.push_latency,
            Info(
                "xdsfast_core",
                "The compiled cores in use: cython (compiled) or python (the pure-Python twin),"
                " for all (implementation: cython, python or mixed) and for each.",
                {"implementation": _ext.summary()}
                | {name.lstrip("_"): kind for name, kind in _ext.implementations().items()},
            ),
        ]

    def register(self, metric: Exposed, /) -> None:
        """Expose another component's metric (DNS, Wasm) after those already here."""
        self.exposed.append(metric)

    def exposition(self) -> bytes:
        """Prometheus text format, as served on ``/stats/prometheus``."""
        return "".join(metric.text() for metric in self.exposed).encode()

    def sample(self, name: str, labels: Labels | None = None) -> float | None:
        """One sample's value by its exposed name (None if absent), for tests and debug."""
        for metric in self.exposed:
            found = metric.sample(name, labels)
            if found is not None:
                return found
        return None
