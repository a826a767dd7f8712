"""Smoke tests of the benchmarks' rows against Istio's own agent, and of relay_bench's big
pushes: each runs at a tiny size and reports sane fields.  They measure nothing (no figure
is checked against a target): they keep the istio-agent relay row, the big-push workloads
and the DNS side by side from rotting between runs.

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


# Big pushes at 1.5 MiB (the huge one 5 times that): cut through by the fast engine, which
# streams a response from THROUGH_MIN (1 MiB) on, yet quick everywhere.
TINY_BIG = 9 << 20  # over the fast engine's cut-through size (8 MiB)


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
    argv += ["--big-size", str(TINY_BIG)]  # the stock agent decodes each push: keep them small
    argv += ["--only", rows, "--json", str(out), *(["--delta"] if delta else [])]
    assert relay_bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "against the stock pilot-agent" in printed
    summary: dict[str, Any] = json.loads(out.read_text())["summary"]
    for name in ("istio-agent", "istio-agent-tls"):
        row = summary[name]
        assert row["core"] == "stock pilot-agent (Go)"
        assert row["idle_rss"] > 0
        for workload in relay_bench.WORKLOADS:
            agg = row[workload]
            assert agg["count"] > 0 and agg["rate"] > 0, (name, workload, agg)
            assert agg["peak_rss"] > 0 and agg["relay_cpu"] >= 0, (name, workload, agg)
            assert agg["ratio"] > 0, (name, workload, agg)
        # Two ~5 MB pushes decoded and re-encoded by a Go process: CPU ticks, always.
        assert row["storm"]["relay_cpu"] > 0
        assert isinstance(row["small"]["added_p50"], float)
        assert row["small"]["p50"] > 0
    assert summary["istio-agent-tls"]["baseline"] == "direct-tls"
    versus = summary["xdsfast-fast"]["vs_agent"]
    assert versus["agent"] == "istio-agent"
    assert versus["idle_rss"] > 0
    for workload in relay_bench.WORKLOADS:
        assert versus[workload]["rate"] > 0
        assert versus[workload]["peak_rss"] > 0
    assert "vs_agent" not in summary["istio-agent"]


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_relay_bench_big_pushes_tiny(
    delta: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--big`` at a tiny size: the big-push throughput (a ratio to direct) and the peak
    RSS over idle of one big and one huge push, per row, in the JSON and the tables; the
    fast engine's row counts every big push cut through, the grpcio engine's none (it
    stores and forwards): the figures are of the path they claim."""
    from xdsfast.engines.fast.protocol import THROUGH_MIN

    assert TINY_BIG > THROUGH_MIN  # else the fast engine holds them whole: nothing to see
    relay_bench = load_benchmark("relay_bench")
    out = tmp_path / "run.json"
    argv = ["--storm", "0", "--small", "0", "--burst", "0", "--big", "2", "--rounds", "2"]
    argv += ["--big-size", str(TINY_BIG), "--only", "direct,xdsfast-fast,xdsfast"]
    argv += ["--json", str(out), *(["--delta"] if delta else [])]
    assert relay_bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("one big push:") == 2 and "big pushes: 2 x" in printed
    payload = json.loads(out.read_text())
    assert payload["settings"]["huge_bytes"] == 5 * TINY_BIG
    summary: dict[str, Any] = payload["summary"]
    assert set(summary) == {"direct", "xdsfast-fast", "xdsfast"}
    sizes = {"big": TINY_BIG, "peak_big": TINY_BIG, "peak_huge": 5 * TINY_BIG}
    for name, row in summary.items():
        assert not any(w in row for w in ("storm", "small", "burst")), (name, row)
        for workload, size in sizes.items():
            agg = row[workload]
            assert agg["count"] == (2 if workload == "big" else 1), (name, workload, agg)
            assert 0.7 * size < agg["message_bytes"] < 1.3 * size, (name, workload, agg)
            assert agg["rate"] > 0 and agg["ratio"] > 0, (name, workload, agg)
            if name == "direct":
                assert "peak_rss" not in agg and "streamed" not in agg, (name, workload, agg)
                continue
            assert agg["peak_rss"] > 0 and agg["rss_before"] > 0, (name, workload, agg)
            assert agg["peak_over_before"] == pytest.approx(
                max(r["peak_rss"] - r["rss_before"] for r in payload["runs"][workload][name])
            )
            streamed = agg["count"] if name == "xdsfast-fast" else 0
            assert agg["streamed"] == streamed, (name, workload, agg)
    assert summary["xdsfast-fast"]["big"]["mbps"] > 0


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
