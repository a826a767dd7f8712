"""The relays side by side, for asv: both engines against a direct connection, in one run.

``setup_cache`` runs ``relay_bench`` once per ADS flavour (small sizes, so asv stays quick);
the ``track_`` methods read its summary.  Ratios against direct are the numbers to compare
across commits: they cancel the load of a shared machine.  ``fast-tls`` is the fast engine
dialing the control plane over TLS; its ratios and added latency are against ``direct-tls``
(the client over TLS straight to the control plane), so they show the relay, not TLS.

``RelayVsIstioAgent`` holds the fast engine against the stock pilot-agent (the relay it
replaces; built by ``scripts/build-istio-peers``, skipped without Go): throughput, relay CPU
per message and RSS as ratios to the agent's, the issue's targets being throughput >= 1.0,
CPU <= 0.5 and RSS <= 1.0.

The relay's memory for one ~20 MB push is in ``bench_relay_memory.py``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from . import relay_bench

MIB = 1024 * 1024
ROWS = {"grpcio": "xdsfast", "fast": "xdsfast-fast", "fast-tls": "xdsfast-fast-tls"}


def _summary(delta: bool) -> dict[str, dict[str, Any]]:
    arrangements = ("direct", "direct-tls", *ROWS.values())
    settings = relay_bench.Settings(
        storm=10, small=1000, burst=2000, delta=delta, rounds=1, arrangements=arrangements
    )
    results = relay_bench.run_bench(settings)
    return relay_bench.summarize(results, settings.arrangements)


class RelaySideBySide:
    params: ClassVar = (["sotw", "delta"], list(ROWS))
    param_names: ClassVar = ["mode", "engine"]
    timeout = 900

    def setup_cache(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {"sotw": _summary(False), "delta": _summary(True)}

    @staticmethod
    def _row(cache: dict[str, Any], mode: str, engine: str) -> dict[str, Any]:
        row: dict[str, Any] = cache[mode][ROWS[engine]]
        return row

    @classmethod
    def _cpu_us(cls, cache: dict[str, Any], mode: str, engine: str, workload: str) -> float:
        per = relay_bench.cpu_per_message(cls._row(cache, mode, engine)[workload], 1e6)
        if per is None:
            raise KeyError(f"{engine} ({mode}) has no relay CPU for {workload}")
        return per

    def track_storm_vs_direct(self, cache: dict[str, Any], mode: str, engine: str) -> float:
        return float(self._row(cache, mode, engine)["storm"]["ratio"])

    def track_small_updates_vs_direct(self, cache: dict[str, Any], mode: str, engine: str) -> float:
        return float(self._row(cache, mode, engine)["small"]["ratio"])

    def track_relay_cpu_per_update(self, cache: dict[str, Any], mode: str, engine: str) -> float:
        return self._cpu_us(cache, mode, engine, "small")

    def track_pushed_updates_vs_direct(
        self, cache: dict[str, Any], mode: str, engine: str
    ) -> float:
        """Small updates pushed back to back, each ACKed: throughput under load."""
        return float(self._row(cache, mode, engine)["burst"]["ratio"])

    def track_relay_cpu_per_pushed_update(
        self, cache: dict[str, Any], mode: str, engine: str
    ) -> float:
        return self._cpu_us(cache, mode, engine, "burst")

    def track_update_latency_p50(self, cache: dict[str, Any], mode: str, engine: str) -> float:
        return float(self._row(cache, mode, engine)["small"]["p50"] * 1e6)

    def track_update_added_latency_p50(
        self, cache: dict[str, Any], mode: str, engine: str
    ) -> float:
        """Relay p50 - direct p50 of the response -> ACK round trip (it crosses the relay
        twice: response down, ACK up); the issue's target is p50 <= 50 µs."""
        return float(self._row(cache, mode, engine)["small"]["added_p50"] * 1e6)

    def track_storm_peak_rss(self, cache: dict[str, Any], mode: str, engine: str) -> float:
        return float(self._row(cache, mode, engine)["storm"]["peak_rss"] / MIB)

    def track_idle_rss(self, cache: dict[str, Any], mode: str, engine: str) -> float:
        return float(self._row(cache, mode, engine)["idle_rss"] / MIB)

    track_storm_vs_direct.unit = "ratio"  # type: ignore[attr-defined]
    track_small_updates_vs_direct.unit = "ratio"  # type: ignore[attr-defined]
    track_relay_cpu_per_update.unit = "µs"  # type: ignore[attr-defined]
    track_pushed_updates_vs_direct.unit = "ratio"  # type: ignore[attr-defined]
    track_relay_cpu_per_pushed_update.unit = "µs"  # type: ignore[attr-defined]
    track_update_latency_p50.unit = "µs"  # type: ignore[attr-defined]
    track_update_added_latency_p50.unit = "µs"  # type: ignore[attr-defined]
    track_storm_peak_rss.unit = "MiB"  # type: ignore[attr-defined]
    track_idle_rss.unit = "MiB"  # type: ignore[attr-defined]


AGENT_WORKLOADS = ["storm", "small", "burst"]


def _agent_summary(delta: bool) -> dict[str, dict[str, Any]]:
    arrangements = ("direct", "xdsfast-fast", relay_bench.ISTIO_AGENT)
    settings = relay_bench.Settings(
        storm=10, small=1000, burst=5000, delta=delta, rounds=1, arrangements=arrangements
    )
    results = relay_bench.run_bench(settings)
    return relay_bench.summarize(results, settings.arrangements)


class RelayVsIstioAgent:
    """The fast engine's figures over the stock pilot-agent's, from one run per ADS flavour:
    above 1 the relay does more (throughput) or costs more (CPU, RSS) than Istio's agent."""

    params: ClassVar = (["sotw", "delta"], AGENT_WORKLOADS)
    param_names: ClassVar = ["mode", "workload"]
    timeout = 900

    def setup_cache(self) -> dict[str, Any]:
        try:
            relay_bench.peers_module().pilot_agent_binary()
        except RuntimeError as exc:  # no Go toolchain: nothing to compare with
            return {"skip": str(exc)}
        return {"sotw": _agent_summary(False), "delta": _agent_summary(True)}

    def setup(self, cache: dict[str, Any], mode: str, workload: str) -> None:
        if "skip" in cache:
            raise NotImplementedError(cache["skip"])

    @staticmethod
    def _versus(cache: dict[str, Any], mode: str) -> dict[str, Any]:
        versus: dict[str, Any] = cache[mode]["xdsfast-fast"]["vs_agent"]
        return versus

    def track_throughput_vs_istio_agent(
        self, cache: dict[str, Any], mode: str, workload: str
    ) -> float:
        return float(self._versus(cache, mode)[workload]["rate"])

    def track_relay_cpu_vs_istio_agent(
        self, cache: dict[str, Any], mode: str, workload: str
    ) -> float:
        return float(self._versus(cache, mode)[workload]["cpu"])

    def track_peak_rss_vs_istio_agent(
        self, cache: dict[str, Any], mode: str, workload: str
    ) -> float:
        return float(self._versus(cache, mode)[workload]["peak_rss"])

    def track_idle_rss_vs_istio_agent(
        self, cache: dict[str, Any], mode: str, workload: str
    ) -> float:
        """The same for every workload: RSS once serving, before any stream."""
        return float(self._versus(cache, mode)["idle_rss"])

    track_throughput_vs_istio_agent.unit = "ratio"  # type: ignore[attr-defined]
    track_relay_cpu_vs_istio_agent.unit = "ratio"  # type: ignore[attr-defined]
    track_peak_rss_vs_istio_agent.unit = "ratio"  # type: ignore[attr-defined]
    track_idle_rss_vs_istio_agent.unit = "ratio"  # type: ignore[attr-defined]
