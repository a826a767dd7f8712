"""``xdsfast demo --check``, the README's first command, as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import needs_envoy


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xdsfast", "demo", "--check", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.envoy
@needs_envoy
@pytest.mark.parametrize("mode", [[], ["--sotw"]], ids=["delta", "sotw"])
def test_demo_with_envoy(mode: list[str]) -> None:
    out = demo(*mode)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "LIVE after" in text
    assert "through Envoy -> 200 'hello from the xdsfast demo backend'" in text
    assert "NDS NameTable v1: 1 resource(s)" in text and "consumed by xdsfast (DNS), ACK" in text
    assert "RDS RouteConfiguration v1" in text
    assert "the listener now answers 'pushed by the demo'" in text
    assert text.rstrip().endswith("every step worked")


def test_demo_with_the_builtin_client() -> None:
    out = demo("--no-envoy")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "built-in ADS client" in out.stdout
    assert "CDS Cluster v1: 1 resource(s)" in out.stdout and ", forwarded, ACK" in out.stdout
    assert "backend.default.svc.cluster.local -> 10.0.0.1" in out.stdout
    assert out.stderr == ""
