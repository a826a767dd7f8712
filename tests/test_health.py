"""Workload health checks: the probes against real servers, and the reports through the relay."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from xdsfast.agent import Agent
from xdsfast.config import Config
from xdsfast.health import HealthChecker, Probe, ProbeError, check, probe_from_config
from xdsfast.peers import mesh
from xdsfast.peers.adsclient import AdsClient
from xdsfast.peers.controlplane import ControlPlane
from xdsfast.typeurls import CLUSTER, HEALTH, LISTENER

MODES = [pytest.param(False, id="sotw"), pytest.param(True, id="delta")]


class App:
    """The workload: an HTTP server whose answer a test can flip, recording its callers."""

    def __init__(self) -> None:
        self.status = 200
        self.seen: list[tuple[str, str]] = []  # (peer address, request head)
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.seen.append((writer.get_extra_info("peername")[0], head.decode()))
        writer.write(f"HTTP/1.1 {self.status} X\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()


@pytest_asyncio.fixture
async def app() -> AsyncIterator[App]:
    server = App()
    await server.start()
    yield server
    assert server.server is not None
    server.server.close()


# -- configuration ----------------------------------------------------------------------------


def test_probe_from_proxy_config_with_istios_defaults() -> None:
    probe = probe_from_config({"httpGet": {"port": 8080}}, "10.0.0.5")
    assert probe == Probe("http", host="10.0.0.5", port=8080, path="/", scheme="http")
    assert (probe.timeout, probe.period, probe.failure_threshold) == (1.0, 10.0, 1)
    tcp = probe_from_config({"tcpSocket": {"port": 9}, "periodSeconds": 3}, "h")
    assert (tcp.kind, tcp.port, tcp.period) == ("tcp", 9, 3.0)
    grpc_probe = probe_from_config({"grpc": {"port": 7, "service": "s"}}, "h")
    assert (grpc_probe.kind, grpc_probe.service) == ("grpc", "s")
    assert probe_from_config({"exec": {"command": ["true"]}}, "h").command == ("true",)


@pytest.mark.parametrize(
    "spec",
    [{}, {"httpGet": {"port": "http"}}, {"exec": {"command": []}}, {"tcpSocket": {"port": 0}}],
)
def test_unusable_probes_are_refused(spec: dict[str, Any]) -> None:
    with pytest.raises(ProbeError):
        probe_from_config(spec, "h")


def test_config_reads_the_probe_from_proxy_config() -> None:
    env = {
        "XDS_ROOT_CA": "SYSTEM",
        "INSTANCE_IP": "10.1.1.1",
        "PROXY_CONFIG": "readinessProbe:\n  httpGet: {path: /ready, port: 8080}\n",
    }
    config = Config.build({}, env)
    assert config.readiness_probe is not None
    assert (config.readiness_probe.host, config.readiness_probe.path) == ("10.1.1.1", "/ready")


# -- the probes, against real servers -------------------------------------------------------


async def test_http_probe(app: App) -> None:
    probe = Probe("http", host="127.0.0.1", port=app.port, path="/ready", headers=(("Host", "x"),))
    assert await check(probe) is None
    peer, head = app.seen[-1]
    assert peer == "127.0.0.6"  # Istio's probe source address
    assert head.startswith("GET /ready HTTP/1.1")
    assert "User-Agent: istio-probe/1.0" in head and "Host: x" in head
    app.status = 302
    assert await check(probe) is None  # 200-399 is healthy
    app.status = 503
    assert await check(probe) == "http probe: status 503"


async def test_tcp_probe(app: App) -> None:
    assert await check(Probe("tcp", host="127.0.0.1", port=app.port)) is None
    assert app.server is not None
    app.server.close()
    await app.server.wait_closed()
    error = await check(Probe("tcp", host="127.0.0.1", port=app.port))
    assert error is not None and error.startswith("tcp probe failed")


async def test_grpc_probe() -> None:
    answers = {b"": b"\x08\x01", b"\x0a\x03bad": b"\x08\x02"}

    async def health(request: bytes, _: Any) -> bytes:
        return answers[request]

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(health)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        assert await check(Probe("grpc", host="127.0.0.1", port=port)) is None
        error = await check(Probe("grpc", host="127.0.0.1", port=port, service="bad"))
        assert error == "grpc probe: status 2 (not SERVING)"
    finally:
        await server.stop(0)


async def test_exec_probe() -> None:
    assert await check(Probe("exec", command=("true",))) is None
    assert await check(Probe("exec", command=("false",))) == "exec probe: exit code 1"
    slow = Probe("exec", command=("sleep", "30"), timeout=0.2)
    assert await check(slow) == "exec probe timed out after 0.2s"


def test_reports_only_changes_after_thresholds() -> None:
    reports: list[str | None] = []
    checker = HealthChecker(Probe("tcp", success_threshold=2, failure_threshold=3), reports.append)
    for result in [None, "down", None, None, None, "down", "down", None, "down", "down", "down"]:
        checker.observe(result)
    assert reports == [None, "down"]


# -- through the relay --------------------------------------------------------------------


def health_reports(cp: ControlPlane, stream_id: int | None = None) -> list[Any]:
    return [r for r in cp.requests if r.type_url == HEALTH and stream_id in (None, r.stream_id)]


@pytest.mark.parametrize("delta", MODES)
async def test_health_reports_follow_the_first_lds_and_survive_reconnects(
    app: App, control_plane: ControlPlane, short_tmp: Path, delta: bool
) -> None:
    control_plane.set_mesh(mesh.sample_mesh(listener_port=15001, backend_port=8080))
    probe = Probe("http", host="127.0.0.1", port=app.port, period=0.02)
    agent = Agent(
        Config(
            discovery_address=control_plane.address,
            xds_socket=str(short_tmp / "XDS"),
            status_address="127.0.0.1:0",
            readiness_probe=probe,
        )
    )
    await agent.start()
    client = AdsClient(f"unix:{short_tmp}/XDS", delta=delta)
    try:
        await client.open()
        await client.request(CLUSTER)
        await client.recv()
        assert agent.health is not None
        await control_plane.wait_for(
            lambda: agent.health is not None and bool(agent.health.healthy)
        )
        await control_plane.wait_for_request(lambda r: r.type_url == CLUSTER)
        assert health_reports(control_plane) == []  # held back until the first LDS request

        await client.request(LISTENER)
        healthy = await control_plane.wait_for_request(lambda r: r.type_url == HEALTH)
        assert not healthy.request.HasField("error_detail")
        assert not healthy.request.HasField("node")

        app.status = 500
        sick = await control_plane.wait_for_request(
            lambda r: r.type_url == HEALTH and r.request.HasField("error_detail")
        )
        assert sick.request.error_detail.code == 13
        assert "status 500" in sick.request.error_detail.message

        # A new stream gets the cached (unhealthy) report right after its first LDS request.
        await client.close()
        client = AdsClient(f"unix:{short_tmp}/XDS", delta=delta)
        await client.open()
        await client.request(LISTENER)
        again = await control_plane.wait_for_request(
            lambda r: r.type_url == HEALTH and r.stream_id != sick.stream_id
        )
        assert "status 500" in again.request.error_detail.message
    finally:
        await client.close()
        await agent.stop()
