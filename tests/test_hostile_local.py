"""Hostile peers and files next to the agent (issue 17, points 5-9): a connection flood
on the status port, a huge /debug/ndsz, a FIFO or /dev/zero as the token, unusable TLS
material, and the modes of the socket's directories.

Real sockets and real ``xdsfast run`` processes, loopback only; no timing thresholds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from conftest import AgentFactory, XdsfastFactory, XdsfastProcess

from xdsfast import status as status_module
from xdsfast.nds_pb2 import NameTable
from xdsfast.peers.adsclient import AdsClient
from xdsfast.peers.backend import http_get
from xdsfast.peers.controlplane import ControlPlane
from xdsfast.peers.pki import Authority
from xdsfast.status import StatusServer, _json, name_table_json
from xdsfast.typeurls import CLUSTER

READY = b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
NOT_READY = b"not ready: warming up\n"


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for ``predicate`` (polled), failing with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def ask(
    port: int, request: bytes = READY, host: str = "127.0.0.1", timeout: float = 10.0
) -> tuple[int, bytes]:
    """One request on a fresh connection; (status, body) once the server closes it."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


class Flood:
    """Connections that send a partial request head (every other one) or nothing."""

    def __init__(self) -> None:
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.ended: list[asyncio.Task[bytes]] = []

    async def open(self, port: int, count: int, host: str = "127.0.0.1") -> None:
        for i in range(count):
            reader, writer = await asyncio.open_connection(host, port)
            if i % 2:
                writer.write(b"GET /healthz/ready HTTP/1.1\r\nX-Slow: ")
            self.conns.append((reader, writer))
            self.ended.append(asyncio.ensure_future(reader.read()))

    async def trickle(self) -> None:
        """One more byte on every open partial head (a slowloris keeps its heads alive)."""
        for i, (_, writer) in enumerate(self.conns):
            if i % 2 and not self.ended[i].done():
                writer.write(b"x")
        await asyncio.sleep(0)

    @property
    def open_count(self) -> int:
        return sum(not task.done() for task in self.ended)

    def close(self) -> None:
        for task in self.ended:
            task.cancel()
        for _, writer in self.conns:
            writer.close()


@pytest_asyncio.fixture
async def flood() -> AsyncIterator[Flood]:
    attack = Flood()
    yield attack
    attack.close()


@pytest_asyncio.fixture
async def status_servers() -> AsyncIterator[Callable[..., Awaitable[StatusServer]]]:
    started: list[StatusServer] = []

    async def start(address: str = "127.0.0.1:0", **options: Any) -> StatusServer:
        settings: dict[str, Any] = {
            "ready": lambda: NOT_READY.decode().strip(),
            "metrics": lambda: b"up 1\n",
            "ndsz": lambda: None,
            "xds": dict,
            "timeout": 30.0,  # the flood is not cut short by the head deadline
        }
        server = StatusServer(**{**settings, **options})
        await server.start(address)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


# -- 5. slowloris on the status port ----------------------------------------------------------


@pytest.mark.parametrize("per_peer", [None, 64], ids=["per-peer share", "one peer may fill it"])
async def test_readiness_answers_through_a_slowloris_flood(
    status_servers: Callable[..., Awaitable[StatusServer]], flood: Flood, per_peer: int | None
) -> None:
    """100 trickling connections (nothing, or half a head): readiness still answers with
    its own reason, never "too many connections", and the server holds no more than its
    cap (the rest were closed)."""
    server = await status_servers(**({} if per_peer is None else {"max_per_peer": per_peer}))
    await flood.open(server.port, 100)
    # Wait until every connection of the flood is either held by the server or closed.
    await until(lambda: flood.open_count <= 64, "the server to stop holding over 64")
    await flood.trickle()
    for _ in range(3):  # probes keep getting through, the flood going on
        assert await ask(server.port) == (503, NOT_READY)
        await flood.trickle()
    assert server.connections <= server.max_connections
    await until(lambda: flood.open_count <= server.max_connections, "the flood to be capped")
    if per_peer is None:  # one peer gets its share of the budget, no more
        assert flood.open_count <= server.max_per_peer
    assert server.refused == 0 and server.evicted >= 100 - server.max_connections


async def test_a_flood_from_one_peer_does_not_close_another_peers_connections(
    status_servers: Callable[..., Awaitable[StatusServer]], flood: Flood
) -> None:
    """At the cap, the connection closed is one of the peer holding the most: an idle
    keep-alive connection from 127.0.0.1, though the oldest, outlives a flood from ::1."""
    server = await status_servers(max_connections=8, max_per_peer=8)
    # The same server also listening on ::1, so the flood comes from another peer address.
    v6 = await asyncio.start_server(server._serve, "::1", 0)
    v6_port = v6.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /healthz/ready HTTP/1.1\r\n\r\n")  # kept alive, then idle
        await asyncio.wait_for(reader.readuntil(NOT_READY), 10)
        await flood.open(v6_port, 30, host="::1")
        await until(lambda: flood.open_count <= 7, "the flood to be capped")
        assert await ask(server.port) == (503, NOT_READY)  # a probe from 127.0.0.1 gets in
        writer.write(b"GET /healthz/ready HTTP/1.1\r\n\r\n")  # and the idle one is still there
        await asyncio.wait_for(reader.readuntil(NOT_READY), 10)
        assert server.connections <= 8
    finally:
        writer.close()
        v6.close()


# -- 6. a big /debug/ndsz does not stall the loop ---------------------------------------------


def big_table(hosts: int) -> NameTable:
    table = NameTable()
    for i in range(hosts):
        info = table.table[f"svc-{i}.ns-{i % 97}.svc.cluster.local"]
        info.ips.append(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
        info.registry = "Kubernetes"
        info.shortname = f"svc-{i}"
        info.namespace = f"ns-{i % 97}"
        if i % 10 == 0:
            info.alt_hosts.extend([f"svc-{i}.ns-{i % 97}", f"svc-{i}.ns-{i % 97}.svc"])
    return table


def test_ndsz_pieces_are_the_whole_json_byte_for_byte() -> None:
    for hosts in (0, 1, 255, 256, 257, 3000):
        table = big_table(hosts)
        table.table["ünïcode.example"].alt_hosts.append('q"uote')
        table.table["empty.example"].SetInParent()
        assert b"".join(status_module.name_table_pieces(table)) == _json(name_table_json(table)), (
            hosts
        )


async def test_readiness_is_answered_while_a_big_ndsz_is_rendered(
    make_agent: AgentFactory, control_plane: ControlPlane
) -> None:
    """A readiness request sent once the agent has begun a big /debug/ndsz is answered
    before the first byte of the ndsz answer: the render does not hold the loop."""
    agent = await make_agent(discovery_address=control_plane.address)
    table = big_table(40_000)
    agent.dns_table.update(table, "1")
    await agent.dns_table.wait_updates(1, timeout=60)
    asked = asyncio.Event()
    source = agent.status._ndsz

    def ndsz() -> object:  # the agent's own source, telling the test it was asked
        asked.set()
        return source()

    agent.status._ndsz = ndsz  # type: ignore[assignment]
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.status.port)
    order: list[str] = []
    try:
        writer.write(b"GET /debug/ndsz HTTP/1.1\r\nConnection: close\r\n\r\n")

        async def ndsz_answer() -> bytes:
            first = await reader.readexactly(1)
            order.append("ndsz")
            return first + await reader.read()

        answer = asyncio.ensure_future(asyncio.wait_for(ndsz_answer(), 60))
        await asyncio.wait_for(asked.wait(), 30)
        assert await ask(agent.status.port) == (200, b"ready\n")
        order.append("ready")
        body = (await answer).partition(b"\r\n\r\n")[2]
    finally:
        writer.close()
    assert order == ["ready", "ndsz"]
    assert body == _json(name_table_json(table))


async def test_concurrent_ndsz_requests_share_one_render(
    status_servers: Callable[..., Awaitable[StatusServer]],
) -> None:
    """Requests for the same table get the same bytes, made once (memory: one body)."""
    table = big_table(2_000)
    calls: list[int] = []

    def ndsz() -> NameTable:
        calls.append(1)
        return table

    server = await status_servers(ndsz=ndsz)
    request = b"GET /debug/ndsz HTTP/1.1\r\nConnection: close\r\n\r\n"
    answers = await asyncio.gather(*(ask(server.port, request) for _ in range(4)))
    assert {a for a in answers} == {(200, _json(name_table_json(table)))}
    assert len(calls) == 4
    assert server._ndsz_shared is not None and server._ndsz_shared() is None  # freed after


# -- 7 and 8: the token and the TLS material, in a real process ------------------------------


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@contextlib.asynccontextmanager
async def rss_guard(relay: XdsfastProcess, limit_mib: int) -> AsyncIterator[None]:
    """Kill the relay if its RSS passes ``limit_mib`` (a regression must not take the
    machine's memory with it); the test then fails on the peak it checks."""
    assert relay.proc is not None
    pid = relay.proc.pid

    async def watch() -> None:
        while relay.proc is not None and relay.proc.returncode is None:
            with contextlib.suppress(OSError):
                if rss_kib(pid) > limit_mib * 1024:
                    relay.proc.kill()
                    return
            await asyncio.sleep(0.005)

    watcher = asyncio.ensure_future(watch())
    try:
        yield
    finally:
        watcher.cancel()


async def stream_ends(relay: XdsfastProcess) -> grpc.StatusCode | None:
    """How an Envoy-like stream through the relay ends (it dials istiod on the stream's
    headers; nothing is written, so no write races the end)."""
    client = AdsClient(f"unix:{relay.socket_path}")
    await client.open()
    try:
        return (await client.wait_closed(timeout=20)).code
    finally:
        await client.close()


async def connection_failures(relay: XdsfastProcess) -> float:
    assert relay.status_port is not None
    status, _, body = await http_get("127.0.0.1", relay.status_port, "/stats/prometheus")
    assert status == 200
    match = re.search(rb"^istio_agent_istiod_connection_failures(?:\{\})? (\S+)$", body, re.M)
    assert match, body
    return float(match.group(1))


async def check_one_counted_line(relay: XdsfastProcess, says: str) -> None:
    """The dial failed: counted once, one log line saying ``says``, no traceback, and the
    agent still answers on its status port."""
    assert relay.status_port is not None
    assert await connection_failures(relay) == 1
    assert (await http_get("127.0.0.1", relay.status_port, "/healthz/ready"))[0] == 200
    assert await relay.stop() == 0
    log = relay.stderr.decode(errors="replace")
    lines = [line for line in log.splitlines() if "cannot reach istiod" in line]
    assert len(lines) == 1, log
    assert says in lines[0], lines[0]
    assert "Traceback" not in log and "Task exception" not in log, log


TOKEN_ATTACKS = {
    "FIFO": ("fifo", "the token file {} is not a regular file"),
    "/dev/zero": ("zero", "the token file {} is not a regular file"),
    "directory": ("dir", "the token file {} is a directory"),
    "over 64 KiB": ("big", "the token file {} is over 64 KiB"),
}


@pytest.mark.parametrize(("kind", "says"), TOKEN_ATTACKS.values(), ids=TOKEN_ATTACKS.keys())
async def test_a_hostile_token_file_fails_the_dial_in_one_counted_line(
    xdsfast_run: XdsfastFactory,
    control_plane: ControlPlane,
    short_tmp: Path,
    kind: str,
    says: str,
) -> None:
    """The token is read without blocking and with a size limit: a FIFO does not freeze
    the agent, /dev/zero does not fill its memory; the dial fails, counted, in one line."""
    token = short_tmp / "istio-token"
    if kind == "fifo":
        os.mkfifo(token)
    elif kind == "zero":
        token.symlink_to("/dev/zero")
    elif kind == "dir":
        token.mkdir()
    else:
        token.write_bytes(b"a" * (64 * 1024 + 1))
    control_plane.set_resources(CLUSTER, {})
    relay = await xdsfast_run(
        "--discovery-address", control_plane.address, "--token-path", str(token)
    )
    assert relay.proc is not None and relay.status_port is not None
    async with rss_guard(relay, 400):
        assert await stream_ends(relay) == grpc.StatusCode.UNAVAILABLE
        assert (await http_get("127.0.0.1", relay.status_port, "/healthz/ready"))[0] == 200
        peak_mib = rss_kib(relay.proc.pid, "VmHWM") / 1024
    assert peak_mib < 200
    assert not control_plane.requests
    await check_one_counted_line(relay, says.format(token))


ROOT_ATTACKS = {
    "empty": ("empty", "istiod's root CA {} is empty"),
    "garbage": ("garbage", "istiod's root CA {} holds no PEM certificate"),
    "broken PEM": ("broken", "istiod's root CA {} holds a PEM certificate that cannot be parsed"),
    "binary": ("binary", "istiod's root CA {} is not PEM text"),
    "FIFO": ("fifo", "istiod's root CA {} is not a regular file"),
    "directory": ("dir", "istiod's root CA {} is a directory"),
    "gone": ("gone", "istiod's root CA {} does not exist"),
}


@pytest.mark.parametrize(("kind", "says"), ROOT_ATTACKS.values(), ids=ROOT_ATTACKS.keys())
async def test_an_unusable_root_ca_fails_the_dial_in_one_counted_line(
    xdsfast_run: XdsfastFactory,
    control_plane: ControlPlane,
    short_tmp: Path,
    kind: str,
    says: str,
) -> None:
    """XDS_ROOT_CA good at start-up, then replaced: Envoy's stream ends UNAVAILABLE, the
    failure is counted and logged in one exact line, no traceback, nothing blocks."""
    root = short_tmp / "root-cert.pem"
    root.write_bytes(Authority("cluster.local root").pem)
    relay = await xdsfast_run(
        "--discovery-address",
        control_plane.address,
        env={"XDS_ROOT_CA": str(root), "ISTIOD_SAN": "istiod.istio-system.svc"},
        plaintext=False,
    )
    root.unlink()
    if kind == "empty":
        root.write_bytes(b"")
    elif kind == "garbage":
        root.write_bytes(b"this is not a certificate\n")
    elif kind == "broken":
        root.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    elif kind == "binary":
        root.write_bytes(b"\x00\xff-----BEGIN CERTIFICATE-----\n")
    elif kind == "fifo":
        os.mkfifo(root)
    elif kind == "dir":
        root.mkdir()
    assert await stream_ends(relay) == grpc.StatusCode.UNAVAILABLE
    assert not control_plane.requests
    await check_one_counted_line(relay, says.format(root))


# -- 9a. the socket's directories ------------------------------------------------------------


def umask() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    raise AssertionError("no Umask in /proc/self/status")


async def test_directories_made_for_the_socket_are_0750(
    make_agent: AgentFactory, control_plane: ControlPlane, short_tmp: Path
) -> None:
    """Every directory xdsfast creates on the way to its socket is 0750 (SECURITY.md); one
    that was already there keeps its mode."""
    existing = short_tmp / "existing"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    socket_path = existing / "a" / "b" / "c" / "XDS"
    await make_agent(discovery_address=control_plane.address, xds_socket=str(socket_path))
    assert stat.S_ISSOCK(socket_path.lstat().st_mode)
    expected = 0o750 & ~umask()
    for directory in (existing / "a", existing / "a" / "b", existing / "a" / "b" / "c"):
        assert stat.S_IMODE(directory.stat().st_mode) == expected, directory
    assert stat.S_IMODE(existing.stat().st_mode) == 0o755
