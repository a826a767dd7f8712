"""Smoke tests of the benchmarks' rows against Istio's own agent: each runs at a tiny size
and reports sane fields.  They measure nothing (no figure is checked against a target):
they keep the istio-agent relay row and the DNS side by side from rotting between runs.

The stock pilot-agent comes from :func:`istio_peers.peers` (built once per session; no Go
toolchain: the tests ERROR and say so; ``XDSFAST_SKIP_ISTIO=1`` skips them).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from istio_peers import Peers, peers
from support import load_benchmark

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def istio() -> Peers:
    return peers()


@pytest.fixture
def agent_binary(istio: Peers, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The benchmarks' pilot-agent is the session's (not a second build-script run)."""
    relay_bench = load_benchmark("relay_bench")
    monkeypatch.setattr(relay_bench.peers_module(), "pilot_agent_binary", lambda: istio.pilot_agent)
    return istio.pilot_agent


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_relay_bench_istio_agent_row(
    agent_binary: Path, delta: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every workload runs through the stock pilot-agent, plaintext and TLS, and the row
    reports throughput ratios, relay CPU, added p50 and RSS; xdsfast's row is held
    against it (the issue's targets) in the summary and the printed table."""
    relay_bench = load_benchmark("relay_bench")
    out = tmp_path / "run.json"
    rows = "direct,xdsfast-fast,istio-agent,direct-tls,istio-agent-tls"
    argv = ["--storm", "2", "--small", "30", "--burst", "30", "--big", "1", "--rounds", "1"]
    argv += ["--only", rows, "--json", str(out), *(["--delta"] if delta else [])]
    assert relay_bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "against the stock pilot-agent" in printed
    summary: dict[str, Any] = json.loads(out.read_text())["summary"]
    for name in ("istio-agent", "istio-agent-tls"):
        row = summary[name]
        assert row["core"] == "stock pilot-agent (Go)"
        assert row["idle_rss"] > 0
        for workload in ("storm", "small", "burst", "big"):
            agg = row[workload]
            assert agg["count"] > 0 and agg["rate"] > 0, (name, workload, agg)
            assert agg["peak_rss"] > 0 and agg["relay_cpu"] >= 0, (name, workload, agg)
            if workload != "big":  # big reports its peak RSS, not a ratio
                assert agg["ratio"] > 0, (name, workload, agg)
        # Two ~5 MB pushes decoded and re-encoded by a Go process: CPU ticks, always.
        assert row["storm"]["relay_cpu"] > 0
        assert isinstance(row["small"]["added_p50"], float)
        assert row["small"]["p50"] > 0
    assert summary["istio-agent-tls"]["baseline"] == "direct-tls"
    versus = summary["xdsfast-fast"]["vs_agent"]
    assert versus["agent"] == "istio-agent"
    assert versus["idle_rss"] > 0
    for workload in ("storm", "small", "burst", "big"):
        assert versus[workload]["rate"] > 0
        assert versus[workload]["peak_rss"] > 0
    assert "vs_agent" not in summary["istio-agent"]


def test_dns_side_by_side_tiny(agent_binary: Path) -> None:
    """dnsperf against xdsfast, the stock pilot-agent's DNS proxy (fed its NameTable by a
    control plane after an LDS request) and dnsmasq, at 50 hosts: every row reports q/s,
    latency, CPU per query, RSS and the time to the first answer from the table."""
    bench_dns = load_benchmark("bench_dns")
    dnsperf, dnsmasq = bench_dns.dnsperf_tools()
    if dnsperf is None:
        pytest.skip("dnsperf is not installed (apt-get install dnsperf): side by side not run")
    servers: tuple[str, ...] = ("xdsfast", "istio-agent", "dnsmasq")
    if dnsmasq is None:
        warnings.warn("dnsmasq is not installed (dnsmasq-base): its row skipped", stacklevel=1)
        servers = servers[:2]
    results = bench_dns.dnsperf_side_by_side(50, 1, servers)
    assert tuple(results) == servers
    for name, r in results.items():
        assert r["qps"] > 0 and r["sent"] > 0, (name, r)
        assert r["avg_us"] > 0 and r["p99_us"] >= r["p50_us"] > 0, (name, r)
        assert r["cpu_us_per_query"] > 0, (name, r)
        assert r["rss_mib"] > 0 and r["peak_rss_mib"] > 0, (name, r)
        assert r["first_answer_ms"] > 0, (name, r)
        assert 0 <= r["lost"] <= r["sent"], (name, r)
    text = bench_dns.side_by_side_table(50, results)
    assert all(name in text for name in servers)
