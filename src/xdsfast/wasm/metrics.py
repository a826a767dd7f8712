"""Istio's ``istio_agent_wasm_*`` metrics, added to the process's :class:`Metrics`.

Istio exports these counters without ``_total``, so they are exact-named
:class:`Count` objects (like the xDS-proxy counters); the duration histogram is in
milliseconds, with Istio's power-of-two buckets.
"""

from __future__ import annotations

from xdsfast.metrics import PREFIX, Count, Gauge, Histogram, Metrics

CONVERSION_BUCKETS = tuple(float(2**i) for i in range(15))  # 1 ms .. 16384 ms, Istio's


class WasmMetrics:
    """Cache entries and lookups, remote fetches, ECDS conversions and their duration."""

    def __init__(self, metrics: Metrics) -> None:
        p = PREFIX + "wasm_"
        self.cache_entries = Gauge(p + "cache_entries", "Wasm modules in the local cache.")
        self.cache_lookups = Count(
            p + "cache_lookup_count", "Wasm module cache lookups, by hit.", label="hit"
        )
        self.remote_fetches = Count(
            p + "remote_fetch_count",
            "Remote Wasm module fetches, by result: success, download_failure, "
            "manifest_failure, checksum_mismatched or fetch_failure.",
            label="result",
        )
        self.conversions = Count(
            p + "config_conversion_count",
            "Wasm extension configs converted (per resource), by result: success, "
            "no_remote_load, marshal_failure, unmarshal_failure, fetch_failure or "
            "miss_remote_fetch_hint.",
            label="result",
        )
        self.unsupported = Count(
            "xdsfast_wasm_unsupported_sources_total",
            "Wasm code sources xdsfast refuses to fetch (oci:// images, other schemes), "
            "by scheme; each also counts as a conversion fetch_failure (fallback filter).",
            label="scheme",
        )
        self.conversion_duration = Histogram(
            p + "config_conversion_duration",
            "Time to convert the Wasm configs of one ECDS response, in milliseconds.",
            CONVERSION_BUCKETS,
        )
        for metric in (
            self.cache_entries,
            self.cache_lookups,
            self.remote_fetches,
            self.conversions,
            self.unsupported,
            self.conversion_duration,
        ):
            metrics.register(metric)
