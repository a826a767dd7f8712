"""``xdsfast status``, ``xdsfast dig``, ``xdsfast check`` and the Grafana dashboard.

The commands run as real processes (``python -m xdsfast ...``) against a real agent:
in-process here (its event loop keeps running while the command runs), fed by the
istiod stand-in and, where marked, a real Envoy.  Stand-ins for what is not the agent
(an upstream resolver, a broken status server, a hostile DNS server) listen on
127.0.0.1 ports the kernel picks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import pytest_asyncio
from conftest import AgentFactory
from support import free_port, needs_envoy

from xdsfast import dnsreply, statusreport, wire
from xdsfast.agent import Agent
from xdsfast.config import Config
from xdsfast.dns.wire import MAX_POINTERS, WireError
from xdsfast.nds_pb2 import NameTable
from xdsfast.peers import mesh
from xdsfast.peers.backend import Backend, http_get
from xdsfast.peers.controlplane import ControlPlane
from xdsfast.peers.envoy import EnvoyProcess
from xdsfast.status import name_table_pieces
from xdsfast.typeurls import CLUSTER, NAME_TABLE, ROUTE

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "xdsfast.json"
UPSTREAM_IP = "192.0.2.7"  # what the stand-in resolver answers for every A question
BACKEND = "backend.default.svc.cluster.local"


# -- running the command line --------------------------------------------------------------


class Ran:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}--- stderr\n{self.err}"


async def xdsfast(*args: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> Ran:
    """``python -m xdsfast ARGS`` as a process; the test's event loop keeps serving meanwhile.

    Started from a thread with :mod:`subprocess` (vfork, then exec) rather than the loop's
    fork: a fork of this process, which holds the control plane's gRPC threads, can crash
    in the child before it gets to exec."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "xdsfast", *args],
        capture_output=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )
    return Ran(done.returncode, done.stdout.decode(), done.stderr.decode())


class Background:
    """A command left running while the test goes on (started as :func:`xdsfast` does)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, *args: str, env: dict[str, str] | None = None) -> Background:
        proc = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-m", "xdsfast", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        return cls(proc)

    async def readline(self, timeout: float = 30.0) -> bytes:
        assert self.proc.stdout is not None
        return await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)

    async def read(self, timeout: float = 30.0) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        return await asyncio.wait_for(asyncio.to_thread(os.read, fd, 65536), timeout)

    async def interrupt(self, timeout: float = 30.0) -> tuple[int, bytes]:
        """Ctrl-C: (exit code, what it wrote on stderr)."""
        self.proc.send_signal(signal.SIGINT)
        try:
            code = await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        assert self.proc.stderr is not None
        return code, await asyncio.to_thread(self.proc.stderr.read)


def one_line_error(ran: Ran, code: int = 1) -> str:
    """The command failed with ``code`` and said why in one line (no traceback)."""
    assert ran.code == code, ran
    lines = ran.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in ran.err, ran
    return lines[0]


def status_args(agent: Agent) -> list[str]:
    return ["--status-address", f"127.0.0.1:{agent.status.port}"]


def dns_args(agent: Agent) -> list[str]:
    assert agent.dns is not None and agent.dns.server is not None
    return ["--dns-address", f"127.0.0.1:{agent.dns.server.port}"]


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


# -- an upstream resolver stand-in ---------------------------------------------------------


def resolver_reply(query: bytes) -> bytes:
    """A recursive resolver's answer: RA set, TTL 60, A questions get UPSTREAM_IP."""
    qend = query.index(0, 12) + 5
    is_a = query[qend - 4 : qend] == b"\x00\x01\x00\x01"
    head = struct.pack("!HHHHHH", struct.unpack("!H", query[:2])[0], 0x8180, 1, int(is_a), 0, 0)
    answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(UPSTREAM_IP)
    return head + query[12:qend] + (answer if is_a else b"")


class Resolver(asyncio.DatagramProtocol):
    """Answers over UDP and TCP on one 127.0.0.1 port, counting the questions."""

    def __init__(self) -> None:
        self.questions = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.server: asyncio.Server | None = None
        self.port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's is no subclass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.questions += 1
        assert self.transport is not None
        self.transport.sendto(resolver_reply(data), addr)

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                self.questions += 1
                reply = resolver_reply(await reader.readexactly(length))
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        writer.close()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(20):  # UDP and TCP on the same free port
            await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
            assert self.transport is not None
            self.port = self.transport.get_extra_info("sockname")[1]
            try:
                self.server = await asyncio.start_server(self._tcp, "127.0.0.1", self.port)
                return
            except OSError:
                self.transport.close()
        raise RuntimeError("no free port for UDP and TCP")

    async def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest_asyncio.fixture
async def resolver() -> AsyncIterator[Resolver]:
    server = Resolver()
    await server.start()
    yield server
    await server.stop()


def agent_config(short_tmp: Path, control_plane: ControlPlane, resolver: Resolver) -> Config:
    resolv = short_tmp / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\nsearch default.svc.cluster.local svc.cluster.local\n")
    return Config(
        discovery_address=control_plane.address,
        plaintext=True,
        xds_socket=str(short_tmp / "XDS"),
        dns_enabled=True,
        dns_address="127.0.0.1:0",
        resolv_conf=str(resolv),
        dns_upstreams=(f"127.0.0.1:{resolver.port}",),
        pod_namespace="default",
        domain="default.svc.cluster.local",
        status_address="127.0.0.1:0",
        heap_release_interval=0,
    )


@pytest_asyncio.fixture
async def agent(
    short_tmp: Path, control_plane: ControlPlane, resolver: Resolver
) -> AsyncIterator[Agent]:
    """An in-process agent with DNS on, forwarding to the resolver stand-in; no Envoy yet."""
    started = Agent(agent_config(short_tmp, control_plane, resolver))
    await started.start()
    yield started
    await started.stop()


class Mesh:
    """The agent with a real Envoy fed through it, the sample mesh served."""

    def __init__(self, agent: Agent, envoy: EnvoyProcess, cp: ControlPlane, port: int) -> None:
        self.agent, self.envoy, self.cp, self.port = agent, envoy, cp, port


@pytest_asyncio.fixture
async def with_envoy(
    agent: Agent, control_plane: ControlPlane, backend: Backend, short_tmp: Path
) -> AsyncIterator[Mesh]:
    port = free_port()
    control_plane.set_mesh(mesh.sample_mesh(listener_port=port, backend_port=backend.port))
    envoy = EnvoyProcess(f"unix:{agent.config.xds_socket}", delta=True, workdir=short_tmp)
    await envoy.start()
    try:
        await envoy.wait_ready()
        await agent.dns_table.wait_updates(1, timeout=15)
        await control_plane.wait_for_request(lambda r: r.type_url == NAME_TABLE and r.is_ack)
        yield Mesh(agent, envoy, control_plane, port)
    finally:
        await envoy.stop()


# -- xdsfast status ------------------------------------------------------------------------

TYPE_ROW = re.compile(r"^  (\w+) +(\S+) +(\S+) +(ACK|NACK|waiting|-) +(\d+) +(\d+(?:\.\d)? \w+) +")


def type_rows(text: str) -> dict[str, tuple[str, ...]]:
    return {m.group(1): m.groups()[1:] for m in map(TYPE_ROW.match, text.splitlines()) if m}


@pytest.mark.envoy
@needs_envoy
async def test_status_shows_streams_readiness_the_name_table_and_the_core(
    with_envoy: Mesh,
) -> None:
    agent = with_envoy.agent
    ran = await xdsfast("status", *status_args(agent))
    assert ran.code == 0 and ran.err == "", ran
    lines = ran.out.splitlines()
    assert all(len(line) <= 100 for line in lines), ran
    assert (
        lines[0]
        == f"xdsfast agent at http://127.0.0.1:{agent.status.port} (core: {wire.IMPLEMENTATION})"
    )
    assert "ready      yes" in lines
    assert "NameTable  2 hosts (NDS version 1)" in lines
    assert re.search(r"^stream 1 \(delta ADS\) from unix:, connected \d+s ago$", ran.out, re.M)
    rows = type_rows(ran.out)
    assert list(rows) == ["CDS", "EDS", "LDS", "RDS", "NDS"], ran
    assert all(row[2] == "ACK" for row in rows.values()), ran
    (nds,) = [sent for sent in with_envoy.cp.responses if sent.type_url == NAME_TABLE]
    assert rows["NDS"][:4] == ("1", nds.nonce, "ACK", "1")

    # --json holds the same, in full, with the type URLs.
    ran = await xdsfast("status", *status_args(agent), "--json")
    snapshot = orjson.loads(ran.out)
    (stream,) = snapshot["streams"]
    by_type = {row["type"]: row for row in stream["types"]}
    _, _, raw = await http_get("127.0.0.1", agent.status.port, "/debug/xds")
    cds = orjson.loads(raw)["streams"][0]["types"][CLUSTER]
    assert by_type["CDS"]["type_url"] == CLUSTER
    for key in ("version", "nonce", "ack", "ack_nonce", "responses", "bytes", "last_push"):
        assert by_type["CDS"][key] == cds[key], key
    assert snapshot["ready"] is True and snapshot["core"] == wire.IMPLEMENTATION
    assert snapshot["name_table"] == {"hosts": 2, "version": "1"}
    assert snapshot["counters"]["xds_responses"] == len(with_envoy.cp.responses)

    assert snapshot["name_table"] == {"hosts": 2, "version": "1"}


def rds_state(snapshot: dict[str, Any]) -> tuple[int, str | None, str] | None:
    """(stream id, RDS ack, RDS version) of a ``status --json`` snapshot, if it has RDS."""
    for stream in snapshot.get("streams", []):
        for row in stream["types"]:
            if row["type"] == "RDS":
                return stream["id"], row["ack"], row["version"]
    return None


@pytest.mark.envoy
@needs_envoy
async def test_status_through_a_nack_and_a_reconnect(with_envoy: Mesh) -> None:
    agent, cp = with_envoy.agent, with_envoy.cp
    watch = await Background.start(
        "status", *status_args(agent), "--watch", "--json", "--interval", "0.1"
    )
    seen: list[tuple[int, str | None, str] | None] = []

    async def read_watch() -> None:
        while line := await watch.readline(60):
            seen.append(rds_state(orjson.loads(line)))

    async def watch_saw(state: Callable[[tuple[int, str | None, str]], bool]) -> bool:
        return any(s is not None and state(s) for s in seen)

    reader = asyncio.ensure_future(read_watch())
    try:
        bad = cp.set_resources(ROUTE, {mesh.ROUTE_NAME: mesh.bad_route()})
        await cp.wait_for_request(
            lambda r: r.type_url == ROUTE and r.is_nack and r.response_version == bad
        )
        ran = await xdsfast("status", *status_args(agent))
        assert ran.code == 0, ran
        assert type_rows(ran.out)["RDS"][0] == bad and type_rows(ran.out)["RDS"][2] == "NACK", ran
        (nack,) = [line for line in ran.out.splitlines() if "NACK (code 13): " in line]
        assert "wildcard" in nack and len(nack) <= 100, nack
        await wait_until(lambda: watch_saw(lambda s: s[1:] == ("NACK", bad)))

        # istiod goes away and comes back: Envoy's stream ends, Envoy reconnects.
        since = len(cp.requests)
        await cp.restart()
        good = cp.set_resources(ROUTE, {mesh.ROUTE_NAME: mesh.direct_route("after")})
        await cp.wait_for_request(
            lambda r: r.type_url == ROUTE and r.is_ack and r.response_version == good,
            since=since,
            timeout=20,
        )
        ran = await xdsfast("status", *status_args(agent), "--json")
        snapshot = orjson.loads(ran.out)
        state = rds_state(snapshot)
        assert state is not None and state[0] > 1 and state[1:] == ("ACK", good), ran
        assert snapshot["counters"]["istiod_connection_terminations"], ran
        ran = await xdsfast("status", *status_args(agent))
        assert re.search(rf"^stream {state[0]} \(delta ADS\)", ran.out, re.M), ran
        assert "istiod streams ended: " in ran.out and "NACK" not in ran.out, ran
        await wait_until(lambda: watch_saw(lambda s: s[0] > 1 and s[1:] == ("ACK", good)))
    finally:
        code, err = await watch.interrupt()
        await reader
    assert (code, err) == (0, b"")


async def test_status_and_check_before_the_first_name_table(agent: Agent) -> None:
    ran = await xdsfast("status", *status_args(agent))
    assert ran.code == 0, ran
    reason = "DNS is on and no NameTable has been received from istiod yet"
    assert f"ready      no: {reason}" in ran.out.splitlines(), ran
    assert "NameTable  none received (DNS off, or istiod has not sent one yet)" in ran.out
    assert "streams    no Envoy stream is connected" in ran.out
    ran = await xdsfast("check", *status_args(agent))
    assert one_line_error(ran) == f"xdsfast: not ready: {reason}"
    assert ran.out == ""


@pytest.mark.envoy
@needs_envoy
async def test_check_is_0_once_ready(with_envoy: Mesh) -> None:
    ran = await xdsfast("check", *status_args(with_envoy.agent))
    assert (ran.code, ran.out, ran.err) == (0, "ready\n", ""), ran


async def test_status_watch_refreshes_in_place_and_ctrl_c_exits_0(agent: Agent) -> None:
    proc = await Background.start("status", *status_args(agent), "--watch", "--interval", "0.1")
    out = b""
    try:
        while out.count(b"\x1b[H") < 3:  # the cursor goes home before each refresh
            out += await proc.read()
    finally:
        code, err = await proc.interrupt()
    frames = out.split(b"\x1b[H")[1:3]
    assert all(b"every 0.1s, Ctrl-C stops" in frame for frame in frames)
    assert all(b"ready      no: DNS is on" in frame for frame in frames)
    assert (code, err) == (0, b"")


# -- xdsfast dig ---------------------------------------------------------------------------

TRANSPORTS = [pytest.param([], id="udp"), pytest.param(["--tcp"], id="tcp")]


def answer_lines(out: str) -> list[list[str]]:
    """The records of dig's answer section, split into fields."""
    section = (
        out.split(";; ANSWER SECTION:\n", 1)[1].split("\n\n", 1)[0] if "ANSWER SEC" in out else ""
    )
    return [line.split() for line in section.splitlines()]


@pytest.mark.envoy
@needs_envoy
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_dig_answers_from_the_name_table(with_envoy: Mesh, transport: list[str]) -> None:
    where = dns_args(with_envoy.agent)
    ran = await xdsfast("dig", BACKEND, *where, *transport)
    assert ran.code == 0 and ran.err == "", ran
    assert ran.out.splitlines()[1] == (
        ";; from the NameTable: answered by the agent itself (AA set, RA clear, TTL 30)"
    )
    assert "status: NOERROR" in ran.out and ";; flags: qr aa rd; QUERY: 1, ANSWER: 1," in ran.out
    assert answer_lines(ran.out) == [[BACKEND + ".", "30", "IN", "A", "10.0.0.1"]]
    port = with_envoy.agent.dns.server.port  # type: ignore[union-attr]
    assert f";; SERVER: 127.0.0.1#{port} ({'TCP' if transport else 'UDP'})" in ran.out

    ran = await xdsfast("dig", "api.example.com", "AAAA", *where, *transport)
    assert answer_lines(ran.out) == [["api.example.com.", "30", "IN", "AAAA", "2001:2::1"]], ran
    ran = await xdsfast("dig", "backend.default", *where, *transport)  # Istio's naming rules
    assert answer_lines(ran.out) == [["backend.default.", "30", "IN", "A", "10.0.0.1"]], ran
    # A known name without the asked family: NOERROR and no records, from the table still.
    ran = await xdsfast("dig", BACKEND, "AAAA", *where, *transport)
    assert "ANSWER: 0," in ran.out and ";; from the NameTable" in ran.out, ran


@pytest.mark.envoy
@needs_envoy
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_dig_shows_a_forwarded_answer(
    with_envoy: Mesh, resolver: Resolver, transport: list[str]
) -> None:
    before = resolver.questions
    ran = await xdsfast("dig", "www.example.org", *dns_args(with_envoy.agent), *transport)
    assert ran.code == 0 and ran.err == "", ran
    assert ran.out.splitlines()[1] == (
        ";; forwarded: an upstream resolver's answer, passed on by the agent"
    )
    assert ";; flags: qr rd ra;" in ran.out
    assert answer_lines(ran.out) == [["www.example.org.", "60", "IN", "A", UPSTREAM_IP]]
    assert resolver.questions == before + 1


async def test_dig_before_the_first_name_table_is_servfail_from_the_agent(
    agent: Agent, resolver: Resolver
) -> None:
    for transport in ([], ["--tcp"]):
        ran = await xdsfast("dig", BACKEND, *dns_args(agent), *transport)
        assert ran.code == 0 and ran.err == "", ran
        assert ran.out.splitlines()[1] == (
            ";; from the agent: SERVFAIL, no NameTable from istiod yet, or no upstream "
            "resolver answered"
        )
        assert "status: SERVFAIL" in ran.out and "ANSWER SECTION" not in ran.out
    # Without --dns-address: the agent's own setting, DNS_PROXY_ADDR, as in its container.
    address = dns_args(agent)[1]
    ran = await xdsfast("dig", BACKEND, env={"DNS_PROXY_ADDR": address})
    assert "status: SERVFAIL" in ran.out and f"@{address} +udp" in ran.out, ran
    assert resolver.questions == 0


# -- a missing agent, bad input ------------------------------------------------------------


def closed_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("command", ["status", "check"])
async def test_no_agent_is_one_line_and_exit_1(command: str) -> None:
    port = closed_port()
    ran = await xdsfast(command, "--status-address", f"127.0.0.1:{port}")
    prefix = "xdsfast: not ready: " if command == "check" else "xdsfast: "
    expected = f"{prefix}no xdsfast agent at http://127.0.0.1:{port}: connection refused"
    assert one_line_error(ran) == expected
    assert ran.out == ""


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_dig_without_a_dns_proxy_is_one_line_and_exit_1(transport: list[str]) -> None:
    port = closed_port(socket.SOCK_STREAM if transport else socket.SOCK_DGRAM)
    ran = await xdsfast("dig", BACKEND, "--dns-address", f"127.0.0.1:{port}", *transport)
    where = f"127.0.0.1#{port}"
    assert one_line_error(ran) == f"xdsfast: no DNS proxy at {where} ({where}: connection refused)"


async def test_dig_gives_up_at_its_timeout() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        ran = await xdsfast(
            "dig", BACKEND, "--dns-address", f"127.0.0.1:{port}", "--timeout", "0.3"
        )
    assert one_line_error(ran) == f"xdsfast: no answer from 127.0.0.1#{port} within 0.3s"


@pytest.mark.parametrize(
    "args",
    [
        ("status", "--status-address", "nohost"),
        ("check", "--status-address", "127.0.0.1:99999"),
        ("status", "--watch", "--interval", "0"),
        ("check", "--timeout", "soon"),
        ("dig", BACKEND, "--dns-address", "[::1"),
        ("dig", "bad..name"),
        ("dig", "x" * 64 + ".example"),
        ("dig", BACKEND, "BOGUS"),
        ("dig",),
    ],
    ids=str,
)
async def test_bad_input_is_one_line_and_exit_2(args: tuple[str, ...]) -> None:
    ran = await xdsfast(*args)
    assert one_line_error(ran, 2).startswith("xdsfast: error: ")


async def test_inspect_commands_import_neither_grpc_protobuf_nor_asyncio(agent: Agent) -> None:
    """``check`` runs as an exec probe every few seconds: it must start fast."""
    show = (
        "import sys; from xdsfast.cli import main; code = main(sys.argv[1:]); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'grpc', 'google', 'asyncio', 'uvloop', 'dnslib', 'orjson'})); sys.exit(code)"
    )
    for args in (
        ["check", *status_args(agent)],
        ["dig", BACKEND, *dns_args(agent)],
        ["status", *status_args(agent)],
    ):
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", show, *args], capture_output=True, timeout=30
        )
        loaded = done.stdout.decode().strip().splitlines()[-1]
        allowed = "['orjson']" if args[0] == "status" else "[]"  # status parses /debug/xds
        assert loaded == allowed, (args, loaded)


# -- hostile and broken peers --------------------------------------------------------------


class StandIn(asyncio.DatagramProtocol):
    """A DNS server on 127.0.0.1 that sends whatever ``udp`` returns for a query."""

    def __init__(self, udp: Callable[[bytes], list[bytes]]) -> None:
        self.udp = udp
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's is no subclass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        for datagram in self.udp(data):
            self.transport.sendto(datagram, addr)


@contextlib.asynccontextmanager
async def dns_stand_in(udp: Callable[[bytes], list[bytes]]) -> AsyncIterator[int]:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: StandIn(udp), local_addr=("127.0.0.1", 0)
    )
    try:
        yield transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


def reply_with(query: bytes, records: bytes, count: int, flags: int = 0x8180) -> bytes:
    qend = query.index(0, 12) + 5
    return query[:2] + struct.pack("!HHHHH", flags, 1, count, 0, 0) + query[12:qend] + records


async def test_dig_skips_datagrams_that_are_not_its_reply() -> None:
    def udp(query: bytes) -> list[bytes]:
        real = resolver_reply(query)
        other = real[:-4] + socket.inet_aton("203.0.113.9")
        wrong_id = bytes([query[0] ^ 0xFF]) + other[1:]
        not_a_reply = other[:2] + bytes([other[2] & 0x7F]) + other[3:]  # QR clear
        other_question = other.replace(b"\x07example", b"\x07exampla")
        return [b"junk", wrong_id, not_a_reply, other_question, real]

    async with dns_stand_in(udp) as port:
        ran = await xdsfast("dig", "a.example", "--dns-address", f"127.0.0.1:{port}")
    assert ran.code == 0, ran
    assert answer_lines(ran.out) == [["a.example.", "60", "IN", "A", UPSTREAM_IP]]


@pytest.mark.parametrize(
    "records",
    [
        pytest.param(
            b"\xc0\x1b" + struct.pack("!HHIH", 1, 1, 60, 4) + b"\x01\x02\x03\x04", id="loop"
        ),
        pytest.param(b"\x05abc", id="short"),
        pytest.param(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 400) + b"\x01", id="rdlength"),
    ],
)
async def test_dig_reports_a_malformed_reply_and_exits_1(records: bytes) -> None:
    async with dns_stand_in(lambda q: [reply_with(q, records, 1)]) as port:
        ran = await xdsfast("dig", "a.example", "--dns-address", f"127.0.0.1:{port}")
    assert ran.code == 1 and "Traceback" not in ran.err, ran
    assert re.search(r"^;; malformed reply: ", ran.out, re.M), ran


async def test_dig_escapes_what_it_prints() -> None:
    """Names and text from the wire reach the terminal with dig's escapes, never as
    control characters."""
    label = b"\x1b[2Jhi\x07."  # a label with ESC, BEL and a dot in it
    name = bytes([len(label)]) + label + b"\x00"
    record = b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 60, len(name)) + name
    txt = b"\x04\x1b[0m"
    record2 = b"\xc0\x0c" + struct.pack("!HHIH", 16, 1, 60, len(txt)) + txt
    async with dns_stand_in(lambda q: [reply_with(q, record + record2, 2)]) as port:
        ran = await xdsfast("dig", "a.example", "ANY", "--dns-address", f"127.0.0.1:{port}")
    assert ran.code == 0, ran
    assert "\x1b" not in ran.out and "\x07" not in ran.out and "\x08" not in ran.out
    assert "\\027[2Jhi\\007\\.." in ran.out and '"\\027[0m"' in ran.out, ran


def pointer_chain(hops: int) -> bytes:
    """A reply whose second answer's name takes ``hops`` compression pointers to read,
    each pointing back (into the first record's data), to the name ``a.``."""
    head = struct.pack("!HHHHHH", 1, 0x8180, 0, 2, 0, 0)
    start = len(head) + 1 + 10  # the first record's data: after its root name and header
    chain, offsets = b"\x01a\x00", [start]
    for _ in range(hops - 1):
        offsets.append(start + len(chain))
        chain += struct.pack("!H", 0xC000 | offsets[-2])
    first = b"\x00" + struct.pack("!HHIH", 65280, 1, 0, len(chain)) + chain
    second = struct.pack("!HHHIH", 0xC000 | offsets[-1], 1, 1, 0, 4) + b"\x01\x02\x03\x04"
    return head + first + second


def test_decoding_is_bounded() -> None:
    """One pointer more than allowed is an error, not a longer walk; as many as allowed
    is a name (the bound is where it says)."""
    reply = dnsreply.decode(pointer_chain(MAX_POINTERS))
    assert (
        reply.problem == "" and reply.answer[1].name == "a." and reply.answer[1].data == "1.2.3.4"
    )
    reply = dnsreply.decode(pointer_chain(MAX_POINTERS + 1))
    assert reply.problem == (
        f"malformed reply: name follows more than {MAX_POINTERS} compression pointers"
    )
    with pytest.raises(WireError):
        dnsreply.read_name(
            pointer_chain(MAX_POINTERS + 1), len(pointer_chain(MAX_POINTERS + 1)) - 16
        )


def test_where_an_answer_came_from() -> None:
    """Local: AA, no RA, TTL 30 on every record, nothing but answers.  The agent's own
    errors: no AA, no RA, no records.  Anything else, forwarded."""
    query = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\x01a\x00\x00\x01\x00\x01"

    def reply(flags: int, *ttls: int) -> dnsreply.Reply:
        records = b"".join(
            b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, ttl, 4) + b"\x0a\x00\x00\x01" for ttl in ttls
        )
        return dnsreply.decode(reply_with(query, records, len(ttls), flags))

    table, agent, forwarded = dnsreply.FROM_TABLE, dnsreply.FROM_AGENT, dnsreply.FORWARDED
    assert dnsreply.source(reply(0x8500, 30, 30)) == table  # qr aa rd
    assert dnsreply.source(reply(0x8500)) == table  # a known name without the family
    assert dnsreply.source(reply(0x8580, 30)) == forwarded  # ra: a recursive resolver's
    assert dnsreply.source(reply(0x8500, 30, 60)) == forwarded  # not the agent's TTL
    assert dnsreply.source(reply(0x8182)) == forwarded  # a resolver's SERVFAIL (ra)
    assert dnsreply.source(reply(0x8102)) == agent  # SERVFAIL, no aa, no ra
    assert dnsreply.source(reply(0x8105)) == agent  # REFUSED
    assert dnsreply.source(reply(0x8103)) == forwarded  # NXDOMAIN comes from upstreams


async def test_status_states_and_ages() -> None:
    """waiting: Envoy has not answered the last response; -: no response yet."""
    now = time.time()

    def stamp(ago: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now - ago))

    def state(nonce: str, ack: str | None, ack_nonce: str, responses: int, ago: float) -> Any:
        return {
            "version": "v",
            "nonce": nonce,
            "ack": ack,
            "ack_nonce": ack_nonce,
            "responses": responses,
            "bytes": 1536,
            "last_push": stamp(ago) if responses else None,
            "error_detail": None,
        }

    prefix = "type.googleapis.com/"
    xds = {
        "streams": [
            {
                "id": 3,
                "mode": "sotw",
                "peer": "127.0.0.1:5555",
                "connected": stamp(7300),
                "types": {
                    prefix + "envoy.config.cluster.v3.Cluster": state("n2", "ACK", "n1", 2, 5),
                    prefix + "envoy.config.listener.v3.Listener": state("n3", None, "", 1, 200),
                    prefix + "envoy.config.route.v3.RouteConfiguration": state("", None, "", 0, 0),
                    prefix + "istio.workload.Address": state("n4", "ACK", "n4", 1, 90000),
                    prefix + "envoy.extensions.transport_sockets.tls.v3.Secret": state(
                        "n5", "NACK", "n5", 1, 0
                    ),
                },
            }
        ]
    }
    routes: dict[str, bytes | None] = {
        "/healthz/ready": http_answer(200, b"ready\n"),
        "/debug/xds": http_answer(200, json.dumps(xds).encode()),
        "/stats/prometheus": http_answer(200, b""),
        "/debug/ndsz": http_answer(404, b"{}"),
    }
    async with StatusStandIn(routes) as port:
        ran = await xdsfast("status", "--status-address", f"127.0.0.1:{port}")
    assert ran.code == 0, ran
    rows = type_rows(ran.out)
    assert rows["CDS"][2:] == ("waiting", "2", "1.5 KiB"), ran
    assert rows["LDS"][2] == "waiting" and rows["RDS"][2] == "-", ran
    assert rows["WDS"][2] == "ACK" and rows["SDS"][2] == "NACK", ran
    assert re.search(r"^  CDS .* [56]s ago$", ran.out, re.M), ran
    assert re.search(r"^  LDS .* 3m2\ds ago$", ran.out, re.M), ran
    assert re.search(r"^  WDS .* 1d01h ago$", ran.out, re.M), ran
    assert "stream 3 (state-of-the-world ADS) from 127.0.0.1:5555, connected 2h01m ago" in ran.out
    assert "NameTable  none received" in ran.out


class StatusStandIn:
    """A status server that answers each path with canned bytes (None: never answers)."""

    def __init__(self, routes: dict[str, bytes | None]) -> None:
        self.routes = routes
        self.server: asyncio.Server | None = None
        self.asked: list[str] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ")[1].decode()
            self.asked.append(path)
            answer = self.routes.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            if answer is None:
                await asyncio.sleep(3600)
            writer.write(answer or b"")
            await writer.drain()
        writer.close()

    async def __aenter__(self) -> int:
        await self.start()
        return self.port

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port: int = self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


def http_answer(status: int, body: bytes) -> bytes:
    return f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def test_hosts_are_counted_across_any_chunking() -> None:
    """The host count of a streamed /debug/ndsz is exact however the bytes arrive."""
    table = NameTable()
    for i in range(1000):
        info = table.table[f"svc-{i}.ns.svc.cluster.local"]
        info.ips.extend([f"10.0.{i // 250}.{i % 250}", "2001:db8::1"])
        info.alt_hosts.append(f'odd"\\\n    "name-{i}')  # escapes only: no raw newline
    body = b"".join(name_table_pieces(table))
    assert len(orjson.loads(body)["table"]) == 1000
    for sizes in ([1], [2, 3, 5, 7, 11], [len(body)]):
        counter, pos, turn = statusreport.HostCounter(), 0, 0
        while pos < len(body):
            counter(body[pos : pos + sizes[turn % len(sizes)]])
            pos += sizes[turn % len(sizes)]
            turn += 1
        assert counter.hosts == 1000, sizes


async def test_watch_counts_a_name_table_once() -> None:
    """--watch asks /debug/ndsz again only when the NDS nonce changes."""
    nds = {
        "version": "7",
        "nonce": "n7",
        "ack": "ACK",
        "ack_nonce": "n7",
        "responses": 1,
        "bytes": 9,
        "last_push": None,
        "error_detail": None,
    }
    xds = {"streams": [{"id": 1, "mode": "delta", "peer": "p", "types": {NAME_TABLE: nds}}]}
    table = b'{\n  "table": {\n    "a.example": {},\n    "b.example": {}\n  }\n}\n'
    stand_in = StatusStandIn(
        {
            "/healthz/ready": http_answer(200, b"ready\n"),
            "/debug/xds": http_answer(200, json.dumps(xds).encode()),
            "/stats/prometheus": http_answer(200, b""),
            "/debug/ndsz": http_answer(200, table),
        }
    )
    await stand_in.start()
    watch = await Background.start(
        "status",
        "--status-address",
        f"127.0.0.1:{stand_in.port}",
        "--watch",
        "--json",
        "--interval",
        "0.05",
    )
    try:
        snapshots = [orjson.loads(await watch.readline()) for _ in range(4)]
    finally:
        await watch.interrupt()
        await stand_in.stop()
    assert all(s["name_table"] == {"hosts": 2, "version": "7"} for s in snapshots)
    assert stand_in.asked.count("/debug/xds") >= 4
    assert stand_in.asked.count("/debug/ndsz") == 1


@pytest.mark.parametrize(
    ("ready", "error"),
    [
        (None, "no answer within 0.5s"),
        (b"garbage\r\n\r\n", "not an HTTP response: not xdsfast's status server"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000, "response head over 65536 bytes"),
        (http_answer(503, b"x" * 70000), "response body over 65536 bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed in the middle"),
    ],
    ids=["silent", "garbage", "endless-head", "big-body", "cut-short"],
)
@pytest.mark.parametrize("command", ["status", "check"])
async def test_a_broken_status_server_is_one_line_and_exit_1(
    command: str, ready: bytes | None, error: str
) -> None:
    async with StatusStandIn({"/healthz/ready": ready}) as port:
        ran = await xdsfast(command, "--status-address", f"127.0.0.1:{port}", "--timeout", "0.5")
    line = one_line_error(ran)
    assert line.startswith("xdsfast: ") and error in line, line


async def test_status_cleans_what_it_shows() -> None:
    """Strings from the status server reach the terminal without control characters,
    and fields of the wrong type are blanks, not a traceback."""
    xds = {
        "streams": [
            {
                "id": "one",
                "mode": "\x1b[31mdelta",
                "peer": "unix:\x07",
                "connected": "yesterday",
                "types": {
                    "type.googleapis.com/evil.\x1b[2JType": {
                        "version": "v\x1b[1m",
                        "nonce": ["n"],
                        "ack": "NACK",
                        "ack_nonce": None,
                        "error_detail": {"code": "13", "message": "bad\nthing\x1b[0m" * 40},
                        "responses": 1,
                        "bytes": -1,
                        "last_push": "2020-13-45T99:99:99.000Z",
                    },
                    "type.googleapis.com/envoy.config.cluster.v3.Cluster": [],
                },
            },
            "not a stream",
        ]
    }
    routes: dict[str, bytes | None] = {
        "/healthz/ready": http_answer(503, b"not ready: \x1b[5mblink\n"),
        "/debug/xds": http_answer(200, json.dumps(xds).encode()),
        "/stats/prometheus": http_answer(200, b'xdsfast_core_info{implementation="\x1b"} 1\n'),
        "/debug/ndsz": http_answer(200, b"{}"),
    }
    async with StatusStandIn(routes) as port:
        ran = await xdsfast("status", "--status-address", f"127.0.0.1:{port}")
    assert ran.code == 0, ran
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", ran.out), ran
    assert all(len(line) <= 100 for line in ran.out.splitlines()), ran
    assert "ready      no: ?[5mblink" in ran.out
    assert "NACK (code 0): bad thing?[0m" in ran.out


# -- the demo's pointers -------------------------------------------------------------------


async def test_demo_prints_where_to_look_and_its_commands_work() -> None:
    """``xdsfast demo`` left running prints ready-to-paste ``status`` and ``dig`` lines:
    pasted, they work against the demo."""
    proc = await Background.start("demo", "--no-envoy", env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = ""
    try:
        while "running. Ctrl-C stops." not in out:
            line = await proc.readline(60)
            assert line, out
            out += line.decode()
        commands = [
            line.split()
            for line in out.splitlines()
            if line.strip().startswith(("xdsfast status ", "xdsfast dig "))
        ]
        urls = re.findall(r"http://127\.0\.0\.1:\d+/\S+", out)
        assert {url.rsplit("/", 2)[-1] for url in urls} >= {"xds", "ndsz", "prometheus"}, out
        assert re.search(r"DNS proxy on 127\.0\.0\.1:\d+ \(UDP and TCP\)", out), out
        kinds = [(c[1], c[2] if c[1] == "dig" else "") for c in commands]
        assert ("status", "") in kinds and ("dig", BACKEND) in kinds, out
        for command in commands:
            args = [a for a in command[1:] if a != "--watch"]
            ran = await xdsfast(*args)
            assert ran.code == 0 and ran.err == "", (command, ran)
            if args[0] == "dig":
                assert ";; from the NameTable" in ran.out and answer_lines(ran.out), ran
            else:
                assert "ready      yes" in ran.out and "NameTable  2 hosts" in ran.out, ran
        for url in urls:
            host_port, path = url[len("http://") :].split("/", 1)
            status, _, _ = await http_get("127.0.0.1", int(host_port.split(":")[1]), "/" + path)
            assert status == 200, url
    finally:
        code, err = await proc.interrupt()
    assert (code, err) == (0, b"")


# -- the Grafana dashboard -----------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or"}
_KEYWORDS |= {"unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions or
    aggregations (followed by ``(``), keywords, label names or strings."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values, $variables
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        if expr[match.end() :].lstrip().startswith("(") or match.group(0).lower() in _KEYWORDS:
            continue
        if match.start() and expr[match.start() - 1] in "$.0123456789":
            continue
        names.add(match.group(0))
    return names


def dashboard_queries(document: Any) -> tuple[list[str], list[str]]:
    """(every panel target's PromQL, every templating query) of a Grafana dashboard."""
    exprs: list[str] = []

    def walk(panels: list[Any]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(document["panels"])
    variables = [
        v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        for v in document["templating"]["list"]
        if v["type"] == "query"
    ]
    return exprs, variables


def exposed_names(text: str) -> set[str]:
    """Every name a scrape of ``text`` can select: samples, families declared with no
    sample yet, and a histogram family's _bucket, _sum and _count."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_metric_names_of_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{x=~"$y",le!="1"}[$__rate_interval])))'
        ' / on(pod) group_left(z) b_total offset 5m - 2 * sum without (q) (c{d="e"})'
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


async def test_every_metric_the_dashboard_queries_is_exported(make_agent: AgentFactory) -> None:
    document = json.loads(DASHBOARD.read_text())
    exprs, variables = dashboard_queries(document)
    used = set().union(*map(metric_names, exprs))
    for query in variables:
        match = re.fullmatch(
            r"label_values\(\s*([a-zA-Z_:][\w:]*)(?:\{[^}]*\})?\s*,\s*\w+\s*\)", query
        )
        assert match, query
        used.add(match.group(1))
    # What the issue asks the dashboard to show.
    for wanted in (
        "xdsfast_xds_push_latency_seconds_bucket",
        "xdsfast_xds_bytes_total",
        "istio_agent_xds_proxy_requests",
        "istio_agent_xds_proxy_responses",
        "istio_agent_istiod_connection_failures",
        "istio_agent_istiod_connection_terminations",
        "istio_agent_dns_requests_total",
        "istio_agent_dns_upstream_failures_total",
    ):
        assert wanted in used, wanted
    agent = await make_agent()  # DNS on: its metrics are exported too
    status, _, body = await http_get("127.0.0.1", agent.status.port, "/stats/prometheus")
    assert status == 200
    exposed = exposed_names(body.decode())
    assert sorted(used - exposed) == []
    assert "not_a_metric_total" not in exposed  # the check can fail


def test_the_dashboard_is_well_formed() -> None:
    document = json.loads(DASHBOARD.read_text())
    panels = document["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(set(refs)) == len(refs), panel["title"]
        if panel["type"] != "row":
            assert refs and panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert document["uid"] == "xdsfast"
