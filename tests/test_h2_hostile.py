"""Hostile HTTP/2 peers against the fast engine, over real sockets: control-frame floods
(CVE-2019-9512 PING, CVE-2019-9515 SETTINGS, empty and unknown frames), a peer that never
reads what it asks for, and request data for streams the relay does not read yet (an istiod
that never answers).  Each ends in a bounded agent: ENHANCE_YOUR_CALM (a GOAWAY, or a
RST_STREAM for one stream), counted and logged, and the agent serves the next client.

The process tests run a real ``xdsfast run`` and read its memory from /proc; the others
run the engine in this process, where its own accounting says what it holds."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from conftest import XdsfastFactory, XdsfastProcess
from support import eventually, free_port
from twins import both

from xdsfast import _ext
from xdsfast.engines import SERVICE, Downstream, Mode, Status, StreamError, fast
from xdsfast.engines.fast import protocol
from xdsfast.engines.fast.h2numbers import ErrorCode, Flag, FrameType
from xdsfast.peers import mesh
from xdsfast.peers.adsclient import AdsClient, StreamClosed
from xdsfast.peers.backend import http_get
from xdsfast.peers.controlplane import ControlPlane
from xdsfast.typeurls import CLUSTER

core: Any = _ext.load("_h2")  # the engine's core, compiled or twin, as it chose
MIB = 1 << 20
FLOOD_LIMIT = 100 * MIB  # a flood stops here, or when the agent closes the connection
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HOSTILE_LINE = b"hostile HTTP/2 peer"

Frame = tuple[int, int, int, bytes]


@pytest.fixture
def engine() -> str:
    """Only the fast engine here (the conftest's fixture runs both)."""
    return "fast"


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((ftype, flags))
        + struct.pack(">I", sid)
        + payload
    )


def grpc_message(body: bytes) -> bytes:
    return b"\0" + struct.pack(">I", len(body)) + body


def parse(data: bytes) -> list[Frame]:
    """The whole frames in ``data``."""
    out, pos = [], 0
    while len(data) - pos >= 9:
        length = int.from_bytes(data[pos : pos + 3], "big")
        if len(data) - pos - 9 < length:
            break
        sid = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        out.append((data[pos + 3], data[pos + 4], sid, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return out


def goaway_codes(frames: list[Frame]) -> list[int]:
    return [int.from_bytes(f[3][4:8], "big") for f in frames if f[0] == FrameType.GOAWAY]


def rss(pid: int, key: str = "VmRSS") -> int:
    """A process's resident memory (``VmHWM``: its peak since start or the last reset)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} for {pid}")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def headers_block(path: str = f"/{SERVICE}/{Mode.SOTW.value}") -> bytes:
    """A request's header block, literal without indexing (no HPACK state needed)."""
    out = b""
    for name, value in (
        (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x"),
        ("content-type", "application/grpc"), ("te", "trailers"),
    ):  # fmt: skip
        out += b"\x00" + bytes((len(name),)) + name.encode() + bytes((len(value),)) + value.encode()
    return out


async def connect(address: str | tuple[str, int]) -> socket.socket:
    """A raw non-blocking socket: nothing reads it unless the test does."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address)
    return sock


async def flood(sock: socket.socket, chunk: bytes, limit: int = FLOOD_LIMIT) -> int:
    """Write ``chunk`` again and again, never reading, until ``limit`` bytes or the peer
    closes; the bytes written.  (The deadline per write only guards against a hang.)"""
    loop = asyncio.get_running_loop()
    sent = 0
    with contextlib.suppress(ConnectionError):  # closed by the agent
        while sent < limit:
            await asyncio.wait_for(loop.sock_sendall(sock, chunk), 60)
            sent += len(chunk)
    return sent


async def read_to_end(sock: socket.socket, until: bytes | None = None) -> bytes:
    """Everything the peer sent that is still to read, until EOF (or a reset), or until
    the ACK of the PING whose payload is ``until``."""
    loop = asyncio.get_running_loop()
    out = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 30):
            out += chunk
            if until is not None and (FrameType.PING, Flag.ACK, 0, until) in parse(out):
                break
    return out


class Peer:
    """A hand-driven HTTP/2 client for these tests: keeps the windows the server gives
    (SETTINGS, WINDOW_UPDATE), answers SETTINGS, records resets, trailers and GOAWAY, and
    sends what the windows allow (``pump``); ``sync`` is a PING round trip, after which
    every frame the server wrote before its ACK has been read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn_window = 65_535
        self.initial_window = 65_535
        self.max_frame = 16_384
        self.windows: dict[int, int] = {}
        self.pending: dict[int, memoryview] = {}  # what each stream still has to send
        self.sent = 0  # DATA payload bytes sent
        self.resets: dict[int, int] = {}
        self.ended: set[int] = set()  # trailers or RST seen
        self.goaways: list[int] = []
        self.data: dict[int, int] = {}  # DATA bytes received per stream
        self.pings = 0
        self.data_seen = asyncio.Event()
        self._acks: dict[bytes, asyncio.Future[None]] = {}
        self.eof = asyncio.Event()
        self._task = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, path: str) -> Peer:
        reader, writer = await asyncio.open_unix_connection(path)
        peer = cls(reader, writer)
        writer.write(PREFACE + frame(FrameType.SETTINGS, 0, 0))
        return peer

    async def _read(self) -> None:
        buf = b""
        try:
            while chunk := await self.reader.read(1 << 20):
                buf += chunk
                frames = parse(buf)
                buf = buf[sum(9 + len(f[3]) for f in frames) :]
                for f in frames:
                    self._on(f)
        except ConnectionError:
            pass
        self.eof.set()
        for waiter in self._acks.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("closed"))

    def _on(self, f: Frame) -> None:
        ftype, flags, sid, payload = f
        if ftype == FrameType.SETTINGS and not flags & Flag.ACK:
            for pos in range(0, len(payload), 6):
                key, value = struct.unpack(">HI", payload[pos : pos + 6])
                if key == 4:
                    for stream in self.windows:
                        self.windows[stream] += value - self.initial_window
                    self.initial_window = value
                elif key == 5:
                    self.max_frame = value
            self.writer.write(frame(FrameType.SETTINGS, Flag.ACK, 0))
        elif ftype == FrameType.WINDOW_UPDATE:
            increment = int.from_bytes(payload, "big")
            if sid == 0:
                self.conn_window += increment
            elif sid in self.windows:
                self.windows[sid] += increment
        elif ftype == FrameType.PING and flags & Flag.ACK:
            waiter = self._acks.pop(payload, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif ftype == FrameType.RST_STREAM:  # (the first: then DATA in flight meets STREAM_CLOSED)
            self.resets.setdefault(sid, int.from_bytes(payload, "big"))
            self.ended.add(sid)
        elif ftype == FrameType.HEADERS and flags & Flag.END_STREAM:
            self.ended.add(sid)
        elif ftype == FrameType.DATA:
            self.data[sid] = self.data.get(sid, 0) + len(payload)
            self.data_seen.set()
        elif ftype == FrameType.GOAWAY:
            self.goaways.append(int.from_bytes(payload[4:8], "big"))

    def open_stream(self, sid: int, body: bytes | memoryview = b"") -> None:
        self.windows[sid] = self.initial_window
        self.pending[sid] = memoryview(body)
        self.writer.write(frame(FrameType.HEADERS, Flag.END_HEADERS, sid, headers_block()))

    def pump(self, frame_size: int = 1 << 20, end: bool = True) -> int:
        """Send what the windows allow; the bytes sent.  A stream whose data is all sent
        is half-closed (``end``)."""
        before = self.sent
        for sid, left in list(self.pending.items()):
            if sid in self.ended:
                del self.pending[sid]
                continue
            while len(left) and self.conn_window > 0 and self.windows[sid] > 0:
                n = min(len(left), self.conn_window, self.windows[sid], self.max_frame, frame_size)
                self.writer.write(frame(FrameType.DATA, 0, sid, bytes(left[:n])))
                left = left[n:]
                self.conn_window -= n
                self.windows[sid] -= n
                self.sent += n
            self.pending[sid] = left
            if not len(left):
                del self.pending[sid]
                if end:
                    self.writer.write(frame(FrameType.DATA, Flag.END_STREAM, sid))
        return self.sent - before

    async def sync(self) -> None:
        self.pings += 1
        payload = self.pings.to_bytes(8, "big")
        waiter = self._acks[payload] = asyncio.get_running_loop().create_future()
        self.writer.write(frame(FrameType.PING, 0, 0, payload))
        await asyncio.wait_for(waiter, 30)

    async def send_all(self, limit: int, frame_size: int = 1 << 20) -> None:
        """Pump and sync until nothing more can be sent (the windows stay shut), everything
        is sent, or ``limit`` bytes were sent."""
        while self.pending and self.sent < limit and not self.eof.is_set():
            self.pump(frame_size)
            await self.sync()
            if not self.pump(frame_size):
                await self.sync()  # late WINDOW_UPDATEs come before this ACK
                if not self.pump(frame_size):
                    return

    def close(self) -> None:
        self._task.cancel()
        self.writer.close()


# -- a real ``xdsfast run`` ---------------------------------------------------------------------


@pytest_asyncio.fixture
async def served_cp() -> AsyncIterator[ControlPlane]:
    cp = ControlPlane("127.0.0.1:0")
    cp.set_mesh(mesh.sample_mesh(listener_port=15001, backend_port=8080))
    await cp.start()
    try:
        yield cp
    finally:
        await cp.stop()


async def serves_a_fresh_client(relay: XdsfastProcess) -> None:
    client = AdsClient(f"unix:{relay.socket_path}")
    await client.open()
    try:
        await client.request(CLUSTER)
        assert (await client.recv(timeout=20)).type_url == CLUSTER
    finally:
        await client.close()


async def answers_status(relay: XdsfastProcess) -> None:
    assert relay.status_port is not None
    status, _, body = await http_get("127.0.0.1", relay.status_port, "/stats/prometheus")
    assert status == 200 and b"istio_agent" in body


FLOODS = {
    "PING": frame(FrameType.PING, 0, 0, b"flooding"),
    "SETTINGS": frame(FrameType.SETTINGS, 0, 0, struct.pack(">HI", 3, 100)),
    "unknown": frame(0x42, 0, 0, b"?"),
}
WHAT = {"PING": "PING frames", "SETTINGS": "SETTINGS frames", "unknown": "frames of unknown type"}


@pytest.mark.parametrize(
    ("kind", "tcp"),
    [("PING", False), ("SETTINGS", False), ("unknown", False), ("PING", True)],
    ids=["ping-unix", "settings-unix", "unknown-unix", "ping-xds-listen"],
)
async def test_a_control_frame_flood_from_a_client_that_never_reads(
    kind: str, tcp: bool, xdsfast_run: XdsfastFactory, served_cp: ControlPlane
) -> None:
    """Up to 100 MiB of one control frame, never reading the ACKs: the agent ends the
    connection with GOAWAY ENHANCE_YOUR_CALM (counted, one log line) long before, its RSS
    stays under 100 MB, and the next client is served."""
    port = free_port()
    args = ("--xds-listen", f"127.0.0.1:{port}") if tcp else ()
    relay = await xdsfast_run("--discovery-address", served_cp.address, *args)
    assert relay.proc is not None
    pid = relay.proc.pid
    sock = await connect(("127.0.0.1", port) if tcp else str(relay.socket_path))
    reset_peak(pid)
    hello = PREFACE + frame(FrameType.SETTINGS, 0, 0)
    sent = await flood(sock, hello + FLOODS[kind] * (65536 // len(FLOODS[kind])), len(hello))
    sent += await flood(sock, FLOODS[kind] * (65536 // len(FLOODS[kind])))
    peak = rss(pid, "VmHWM")
    assert peak < 100 * MIB, (kind, peak, sent)
    assert sent < FLOOD_LIMIT, "the agent read the whole flood"
    got = parse(await read_to_end(sock))
    sock.close()
    # Its GOAWAY waits behind the replies this client does not read: the connection is
    # dropped (CLOSE_GRACE) with it; a client that reads gets it (the in-process tests).
    assert {f[0] for f in got} <= {
        FrameType.SETTINGS, FrameType.PING, FrameType.GOAWAY, FrameType.WINDOW_UPDATE
    }  # fmt: skip
    await serves_a_fresh_client(relay)
    assert relay.status_port is not None
    _, _, metrics = await http_get("127.0.0.1", relay.status_port, "/stats/prometheus")
    assert b'xdsfast_hostile_peers_total{kind="control_flood"} 1\n' in metrics
    await relay.stop()
    assert relay.stderr.count(HOSTILE_LINE) == 1, relay.stderr.decode()[-2000:]
    assert f"flood of {WHAT[kind]}".encode() in relay.stderr


async def test_a_ping_flood_from_istiod(xdsfast_run: XdsfastFactory) -> None:
    """A control plane that answers the handshake, then floods PINGs and never reads: the
    agent's connection to it ends with GOAWAY ENHANCE_YOUR_CALM, the Envoy stream ends,
    RSS stays under 100 MB and the agent still answers."""
    loop = asyncio.get_running_loop()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    port = server.getsockname()[1]

    flooded: asyncio.Future[int] = loop.create_future()

    async def hostile() -> list[Frame]:
        sock, _ = await loop.sock_accept(server)
        sock.setblocking(False)
        try:
            await loop.sock_recv(sock, len(PREFACE))  # (the rest is never read)
            sent = await flood(sock, frame(FrameType.SETTINGS, 0, 0), 1)
            sent += await flood(sock, FLOODS["PING"] * 4096)
            flooded.set_result(sent)
            return parse(await read_to_end(sock))
        finally:
            sock.close()

    done = asyncio.ensure_future(hostile())
    try:
        relay = await xdsfast_run("--discovery-address", f"127.0.0.1:{port}")
        assert relay.proc is not None
        pid = relay.proc.pid
        reset_peak(pid)
        client = AdsClient(f"unix:{relay.socket_path}")
        await client.open()
        await client.request(CLUSTER)
        sent = await asyncio.wait_for(asyncio.shield(flooded), 120)
        peak = rss(pid, "VmHWM")
        assert peak < 100 * MIB, (peak, sent)
        assert sent < FLOOD_LIMIT, "the agent read the whole flood"
        got = await asyncio.wait_for(done, 60)
        assert {f[0] for f in got} <= {
            FrameType.SETTINGS, FrameType.PING, FrameType.GOAWAY, FrameType.WINDOW_UPDATE,
            FrameType.HEADERS, FrameType.DATA,
        }  # fmt: skip
        with pytest.raises(StreamClosed):  # the relay ended Envoy's stream with the upstream
            await client.recv(timeout=30)
        await client.close()
        await answers_status(relay)
        await relay.stop()
        assert relay.stderr.count(HOSTILE_LINE) == 1, relay.stderr.decode()[-2000:]
    finally:
        done.cancel()
        server.close()


async def test_hundreds_of_streams_towards_an_istiod_that_never_answers(
    xdsfast_run: XdsfastFactory,
) -> None:
    """200 streams with 3 MiB of requests each (600 MiB offered, respecting flow control)
    while istiod accepts and stays silent: what the agent takes is bounded (its data waits
    in the windows, not in memory), its RSS grows by far less than the offer, and it still
    answers."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4096)  # never accepted: the dial hangs after TCP connects
    try:
        relay = await xdsfast_run("--discovery-address", f"127.0.0.1:{silent.getsockname()[1]}")
        assert relay.proc is not None
        pid = relay.proc.pid
        before = rss(pid)
        reset_peak(pid)
        body = (grpc_message(b"r" * (MIB - 5))) * 3
        peer = await Peer.open(str(relay.socket_path))
        try:
            await peer.sync()
            for i in range(200):
                peer.open_stream(2 * i + 1, body)
            await peer.send_all(limit=200 * len(body))
            peak = rss(pid, "VmHWM")
            await answers_status(relay)
        finally:
            peer.close()
        # The engine's bound: one connection's window (16 MiB) of requests for streams not
        # read (measured with main's relay, which waits out each dial: 16 MiB taken, RSS
        # +19 MiB), plus what 200 streams cost.  A relay that ends replaced streams at once
        # takes less still.
        assert peak - before < 64 * MIB, (before, peak, peer.sent)
        assert peak < 300 * MIB
    finally:
        silent.close()


# -- the engine in this process ------------------------------------------------------------------


class Hold:
    """A handler that reads nothing until released (an upstream not established yet),
    then everything, counting bytes per stream."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.received: dict[int, int] = {}
        self.done: set[int] = set()

    async def __call__(self, downstream: Downstream, mode: Mode) -> Status:
        sid = downstream._stream.id  # type: ignore[attr-defined]
        await self.release.wait()
        try:
            while (data := await downstream.recv()) is not None:
                self.received[sid] = self.received.get(sid, 0) + len(data)
        except StreamError as exc:
            return exc.status
        self.done.add(sid)
        return Status()


ServerFactory = Callable[..., Awaitable[fast.FastServer]]


@pytest_asyncio.fixture
async def make_server(short_tmp: Path) -> AsyncIterator[ServerFactory]:
    servers: list[fast.FastServer] = []

    async def make(handler: Any, max_recv: int = 4 * MIB) -> fast.FastServer:
        srv = fast.FastServer(handler, fast.ServerSettings(max_recv_msg_size=max_recv))
        await srv.start(str(short_tmp / f"s{len(servers)}.sock"), None)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        await srv.stop(0)


def path_of(srv: fast.FastServer) -> str:
    assert srv._unix_path is not None
    return srv._unix_path


async def test_streams_not_read_yet_hold_one_connection_window_then_flow(
    make_server: ServerFactory,
) -> None:
    """24 streams x 3 MiB towards a handler that does not read yet: the connection's window
    is not credited for data only buffered, so 16 MiB get in, not 72; once the handler
    reads, every stream completes (an Envoy that behaves is not hurt)."""
    hold = Hold()
    srv = await make_server(hold)
    unread = core.unread_total()  # (other tests' fake connections may have left some)
    body = grpc_message(b"q" * (MIB - 5)) * 3
    peer = await Peer.open(path_of(srv))
    try:
        await peer.sync()
        for i in range(24):
            peer.open_stream(2 * i + 1, body)
        await peer.send_all(limit=64 * MIB)
        assert peer.sent <= fast.CONN_WINDOW, peer.sent
        (conn,) = srv.connections
        assert getattr(conn, "unread", 0) <= core.UNREAD_MAX
        hold.release.set()  # the upstream is ready: the relay reads
        while peer.pending:
            await peer.send_all(limit=200 * MIB)
            if peer.pending:
                await peer.sync()
        await eventually(lambda: len(hold.done) == 24, "every stream read to its end")
        assert set(hold.received.values()) == {3 * (MIB - 5)}
        assert not peer.resets and not peer.goaways
        assert core.unread_total() == unread
    finally:
        peer.close()


async def test_tiny_messages_for_a_stream_not_read_yet_are_bounded(
    make_server: ServerFactory,
) -> None:
    """1-byte messages cost far more held than they take of the window: the stream is
    reset with ENHANCE_YOUR_CALM once what it holds passes the connection's budget."""
    srv = await make_server(Hold())
    peer = await Peer.open(path_of(srv))
    before = fast.HOSTILE.counts["unread_requests"]
    unread = core.unread_total()
    try:
        await peer.sync()
        peer.open_stream(1, grpc_message(b"x") * (5 * MIB // 6))
        await peer.send_all(limit=5 * MIB, frame_size=60_000)
        # (4 MiB of window: 700k messages, 45 MB held; the budget, 32 MiB, is reached first)
        assert peer.resets.get(1) == ErrorCode.ENHANCE_YOUR_CALM, (peer.resets, peer.sent)
        assert fast.HOSTILE.counts["unread_requests"] == before + 1
        await peer.sync()  # the connection is fine
        assert not peer.goaways
    finally:
        peer.close()
    await eventually(lambda: not srv.connections, "the connection closed")
    assert core.unread_total() == unread


async def test_the_process_budget_for_streams_not_read_yet(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two connections, each within its own budget, together over the process's: the stream
    that crosses it is reset (ENHANCE_YOUR_CALM); the other is untouched."""
    unread = core.unread_total()
    monkeypatch.setattr(core, "UNREAD_PROCESS_MAX", unread + MIB, raising=False)
    srv = await make_server(Hold())
    body = grpc_message(b"p" * 6000) * 100  # ~600 KB each
    first, second = await Peer.open(path_of(srv)), await Peer.open(path_of(srv))
    try:
        for peer in (first, second):
            await peer.sync()
            peer.open_stream(1, body)
            await peer.send_all(limit=4 * MIB)
        assert not first.resets
        assert second.resets.get(1) == ErrorCode.ENHANCE_YOUR_CALM, second.resets
    finally:
        first.close()
        second.close()
    await eventually(lambda: not srv.connections, "the connections closed")
    assert core.unread_total() == unread


async def test_replies_to_a_peer_that_never_reads_are_capped(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PINGs within the rate budget (raised here), never reading the ACKs: once the
    transport is backed up, past 1000 replies the connection is ended, and dropped even
    though its peer does not read what is left."""
    monkeypatch.setattr(protocol, "CLOSE_GRACE", 0.2)
    srv = await make_server(Hold())
    sock = await connect(path_of(srv))
    await flood(sock, PREFACE + frame(FrameType.SETTINGS, 0, 0), 1)
    await eventually(lambda: len(srv.connections) == 1, "connected")
    (conn,) = srv.connections
    conn.control_burst = conn.control_rate = conn.budget = 1e12  # no rate limit
    before = fast.HOSTILE.counts["unread_replies"]
    sent = await flood(sock, FLOODS["PING"] * 4096, limit=64 * MIB)
    await eventually(lambda: conn.lost.done(), "the connection dropped, unread")
    sock.close()
    assert sent < 64 * MIB
    assert fast.HOSTILE.counts["unread_replies"] == before + 1


@pytest.mark.parametrize(
    "flooding",
    [FLOODS["PING"], FLOODS["SETTINGS"], FLOODS["unknown"], frame(FrameType.DATA, 0, 1),
     frame(0x9, 0, 1), frame(0x2, 0, 1, b"\0\0\0\0\x10")],
    ids=["PING", "SETTINGS", "unknown", "empty DATA", "empty CONTINUATION", "PRIORITY"],
)  # fmt: skip
async def test_a_flood_from_a_client_that_reads_ends_in_enhance_your_calm(
    make_server: ServerFactory, flooding: bytes
) -> None:
    """The rate budget: 5000 at once, the replies read, get GOAWAY ENHANCE_YOUR_CALM."""
    srv = await make_server(Hold())
    sock = await connect(path_of(srv))
    opening = PREFACE + frame(FrameType.SETTINGS, 0, 0)
    if flooding[3] == 0x9:  # CONTINUATION: after a HEADERS without END_HEADERS
        opening += frame(FrameType.HEADERS, 0, 1, headers_block())
    elif flooding[3] in (0, 2):
        opening += frame(FrameType.HEADERS, Flag.END_HEADERS, 1, headers_block())
    reading = asyncio.ensure_future(read_to_end(sock, until=b"the end!"))
    await flood(sock, opening + flooding * 5000 + frame(FrameType.PING, 0, 0, b"the end!"), 1)
    got = parse(await reading)  # (the GOAWAY comes before that PING's ACK, if any)
    sock.close()
    assert goaway_codes(got) == [ErrorCode.ENHANCE_YOUR_CALM]


async def test_a_ping_after_each_response_is_never_cut(make_server: ServerFactory) -> None:
    """gRPC's BDP probes: a PING each time data arrived.  1500 of them, more than the
    budget's burst, each after a response: none counts, the connection stays."""

    async def echo(downstream: Downstream, mode: Mode) -> Status:
        while (data := await downstream.recv()) is not None:
            await downstream.send(data)
        return Status()

    srv = await make_server(echo)
    peer = await Peer.open(path_of(srv))
    try:
        await peer.sync()
        peer.open_stream(1)
        for i in range(1500):
            peer.data_seen.clear()
            peer.writer.write(frame(FrameType.DATA, 0, 1, grpc_message(b"%d" % i)))
            await asyncio.wait_for(peer.data_seen.wait(), 30)  # the echo, then the PING
            await peer.sync()
        assert not peer.goaways and not peer.eof.is_set()
    finally:
        peer.close()


def test_a_prefix_whose_bytes_never_come_costs_little() -> None:
    """A stream the relay does not read yet allocates at most PREALLOC_UNREAD for a message
    it was promised (here 4 MiB, of which 100 bytes come), then grows as bytes arrive."""
    compiled = both()[1].h2  # (allocation is the compiled core's: skipped where none)
    assembler = compiled.Assembler(4 * MIB)
    assembler.prealloc = compiled.PREALLOC_UNREAD
    chunk = b"\0" + struct.pack(">I", 4 * MIB) + b"x" * 100
    tracemalloc.start()
    try:
        assert assembler.feed(chunk, 0, len(chunk)) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 << 10, peak


def test_a_message_over_the_preallocation_is_not_copied_at_the_end() -> None:
    """An 80 MiB message (over PREALLOC_MAX, 64 MiB: istiod's pushes have no limit) grows
    in place up to its length and is handed out as it is: its size at the peak, not twice
    it (a bytearray, then its bytes copy)."""
    compiled = both()[1].h2  # (allocation is the compiled core's: skipped where none)
    size = 80 * MIB
    assembler = compiled.Assembler(1 << 40)
    read = bytearray(b"m" * (256 << 10))  # what each read brings
    tracemalloc.start()
    try:
        head = b"\0" + struct.pack(">I", size)
        assert assembler.feed(head, 0, len(head)) is None
        left, got = size, None
        while left:
            n = min(left, len(read))
            got = assembler.feed(read, 0, n)
            left -= n
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got is not None and len(got) == 1 and len(got[0]) == size
    assert got[0][:3] == got[0][-3:] == b"mmm"
    assert peak < size * 1.2, peak / size


def test_hostile_lines_are_throttled(caplog: pytest.LogCaptureFixture) -> None:
    """One warning per kind per interval, then a count of those not logged."""
    hostile = protocol._Hostile()
    with caplog.at_level("WARNING"):
        for _ in range(5):
            hostile.note("control_flood", "test", "flood of PING frames")
    assert hostile.counts["control_flood"] == 5
    assert [r.getMessage() for r in caplog.records].count(
        "hostile HTTP/2 peer (test): flood of PING frames"
    ) == 1
