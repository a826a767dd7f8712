"""The fast engine's HTTP/2 framing: the Cython helpers and their twin, and the server
under hand-built, property-based and fuzzed frames (only ever a protocol error or a
clean close: never a crash, a hang or unbounded memory)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import re
import socket
import struct
import termios
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import cast

import grpc
import hpack
import pytest
import pytest_asyncio
from conftest import AgentFactory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import eventually
from twins import Cores, both

from xdsfast.engines import SERVICE, Code, Downstream, Mode, Status, StreamError
from xdsfast.engines import fast as engine
from xdsfast.engines.fast import _h2_py, h2numbers
from xdsfast.engines.fast.h2numbers import ErrorCode, Flag, FrameType, SettingCode


@pytest.fixture
def h2(twins: Cores) -> ModuleType:
    """The HTTP/2 core of each kind (the ``twins`` fixture: tests/twins.py)."""
    return twins.h2


# -- the helpers, both implementations --------------------------------------------------------


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return _h2_py.frame_header(len(payload), ftype, flags, sid) + payload


def test_frame_header_layout(h2: ModuleType) -> None:
    assert h2.frame_header(0x123456, 9, 0x25, 0x7FFFFFFF) == bytes.fromhex("12345609257fffffff")
    assert h2.frame_header(1, 0, 0, 0x80000001) == bytes.fromhex("000001000000000001")  # R bit
    assert h2.frame_u32(8, 3, 0x81020304) == bytes.fromhex("00000408000000000381020304")


def grpc_frame(body: bytes, flag: int = 0) -> bytes:
    return bytes((flag,)) + struct.pack(">I", len(body)) + body


def test_assembler_cuts_messages_and_stops_at_bad_prefixes(h2: ModuleType) -> None:
    a = h2.Assembler(100)
    wire = grpc_frame(b"abc") + grpc_frame(b"") + grpc_frame(b"ab")
    assert a.feed(b"xx" + wire + b"yy", 2, 2 + len(wire) - 1) == [b"abc", b""]
    assert a.pending
    assert a.feed(wire, len(wire) - 1, len(wire)) == [b"ab"] and not a.pending
    assert a.feed(b"", 0, 0) is None
    compressed = h2.Assembler(100)
    assert compressed.feed(grpc_frame(b"x", flag=1), 0, 6) is None and compressed.error == 1
    big = h2.Assembler(255)
    assert big.feed(b"\0\0\0\1", 0, 4) is None and big.pending and not big.error
    assert big.feed(b"\0", 0, 1) is None and big.error == 2 and big.error_length == 256
    assert big.feed(grpc_frame(b""), 0, 5) is None  # fed no more after an error


@given(
    bodies=st.lists(st.binary(max_size=3000), max_size=6),
    cuts=st.lists(st.integers(1, 4000), max_size=12),
    kind=st.sampled_from([bytes, bytearray, memoryview]),
)
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_assembler_gets_the_same_messages_however_the_payload_is_cut(
    h2: ModuleType, bodies: list[bytes], cuts: list[int], kind: type
) -> None:
    wire = b"".join(grpc_frame(b) for b in bodies)
    assembler = h2.Assembler(1 << 20)
    got: list[bytes] = []
    pos = 0
    for cut in [*cuts, len(wire)]:
        stop = min(pos + cut, len(wire))
        framed = b"pad" + wire[pos:stop] + b"dap"  # feed reads only buf[start:end]
        got.extend(assembler.feed(kind(framed), 3, 3 + stop - pos) or [])
        pos = stop
    assert got == bodies and not assembler.pending and not assembler.error


def reassemble(chunks: list[bytes | memoryview], max_frame: int, sid: int) -> bytes:
    """The payload of the DATA frames ``chunks`` make: each whole, within ``max_frame``,
    on stream ``sid``, no flags."""
    wire = b"".join(bytes(c) for c in chunks)
    payload, pos = b"", 0
    while pos < len(wire):
        length = int.from_bytes(wire[pos : pos + 3], "big")
        assert length <= max_frame and pos + 9 + length <= len(wire)
        assert wire[pos + 3 : pos + 9] == bytes((FrameType.DATA, 0)) + sid.to_bytes(4, "big")
        payload += wire[pos + 9 : pos + 9 + length]
        pos += 9 + length
    return payload


@given(
    data=st.binary(max_size=20_000),
    max_frame=st.integers(1, 9000),
    cut=st.integers(0, 30_000),
    sid=st.integers(1, 2**31 - 1),
)
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_data_frames_carry_the_message_in_pieces(
    h2: ModuleType, data: bytes, max_frame: int, cut: int, sid: int
) -> None:
    body = b"\0" + struct.pack(">I", len(data)) + data
    cut = min(cut, len(body))
    first = h2.data_frames(data, 0, cut, sid, max_frame)
    rest = h2.data_frames(data, cut, len(body), sid, max_frame)
    assert reassemble(first, max_frame, sid) + reassemble(rest, max_frame, sid) == body
    assert [bytes(c) for c in first] == [
        bytes(c) for c in _h2_py.data_frames(data, 0, cut, sid, max_frame)
    ]


def pxd_enums(text: str) -> dict[str, dict[str, int]]:
    """Each ``cdef enum`` of a .pxd (the anonymous one as ""): its members and values.
    Any other line inside an enum fails, so nothing in one goes unchecked."""
    enums: dict[str, dict[str, int]] = {}
    members: dict[str, int] | None = None
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if (head := re.fullmatch(r"cdef enum ?(\w*):", line)) is not None:
            members = enums.setdefault(head.group(1), {})
        elif line.startswith(" "):
            member = re.fullmatch(r" {4}(\w+) = (\w+)", line)
            assert members is not None and member is not None, line
            members[member.group(1)] = int(member.group(2), 0)
        else:
            members = None
    return enums


def test_the_compiled_cores_numbers_are_the_registrys() -> None:
    """h2numbers.pxd (compile-time constants for _h2.pyx) holds h2numbers.py's numbers:
    the same members, the same values, so the two cannot drift.  (Enum members share C's
    one namespace: the PRIORITY flag is PRIORITY_FLAG there.)"""
    pxd = Path(h2numbers.__file__).with_suffix(".pxd").read_text()
    registry: dict[str, dict[str, int]] = {
        enum.__name__: {
            "PRIORITY_FLAG" if enum is Flag and name == "PRIORITY" else name: int(member)
            for name, member in enum.__members__.items()  # (aliases too: ACK)
        }
        for enum in (FrameType, Flag, ErrorCode, SettingCode)
    }
    registry[""] = {
        name: getattr(h2numbers, name)
        for name in ("DEFAULT_WINDOW", "MAX_WINDOW", "DEFAULT_FRAME", "MAX_FRAME")
    }
    assert pxd_enums(pxd) == registry


@given(data=st.binary(max_size=3000), pos=st.integers(0, 40), max_size=st.integers(0, 70_000))
@settings(max_examples=300, deadline=None)
def test_twins_agree_on_any_bytes(data: bytes, pos: int, max_size: int) -> None:
    twin, ours = (cores.h2.Assembler(max_size) for cores in both())
    assert ours.feed(data, pos, len(data)) == twin.feed(data, pos, len(data))
    assert (ours.pending, ours.error, ours.error_length) == (
        twin.pending,
        twin.error,
        twin.error_length,
    )


# -- the server under raw frames ---------------------------------------------------------------


async def echo(downstream: Downstream, mode: Mode) -> Status:
    """Sends every request back; ends with the stream's failure or OK."""
    try:
        while (data := await downstream.recv()) is not None:
            await downstream.send(data)
    except StreamError as exc:
        return exc.status
    return Status()


class Hold:
    """A handler that takes nothing until released (for backpressure)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.got: list[bytes] = []

    async def __call__(self, downstream: Downstream, mode: Mode) -> Status:
        await self.release.wait()
        while (data := await downstream.recv()) is not None:
            self.got.append(data)
        return Status()


@pytest_asyncio.fixture
async def server(short_tmp: Path) -> AsyncIterator[engine.FastServer]:
    srv = engine.FastServer(echo, engine.ServerSettings(max_recv_msg_size=1 << 16))
    await srv.start(str(short_tmp / "h2.sock"), None)
    yield srv
    await srv.stop(0)


class Raw:
    """A hand-driven HTTP/2 client: writes any bytes, reads frames with deadlines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()

    @classmethod
    async def open(cls, path: str, hello: bool = True, window: int | None = None) -> Raw:
        reader, writer = await asyncio.open_unix_connection(path)
        raw = cls(reader, writer)
        if hello:
            settings = b"" if window is None else struct.pack(">HI", 4, window)
            raw.send(engine.PREFACE + frame(FrameType.SETTINGS, 0, 0, settings))
        return raw

    def send(self, data: bytes) -> None:
        with contextlib.suppress(ConnectionError):  # the server may have closed already
            self.writer.write(data)

    def headers(
        self, sid: int, path: str = f"/{SERVICE}/{Mode.SOTW.value}", end: bool = False
    ) -> bytes:
        block = self.encoder.encode(
            [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x"),
             ("content-type", "application/grpc"), ("te", "trailers")]
        )  # fmt: skip
        flags = Flag.END_HEADERS | (Flag.END_STREAM if end else 0)
        return frame(FrameType.HEADERS, flags, sid, block)

    async def frame(self, timeout: float = 5.0) -> tuple[int, int, int, bytes] | None:
        """The next frame, or None at EOF."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(9), timeout)
            length = int.from_bytes(head[:3], "big")
            payload = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        except asyncio.IncompleteReadError:
            return None
        except ConnectionError:
            return None
        return head[3], head[4], int.from_bytes(head[5:], "big") & 0x7FFFFFFF, payload

    async def until(self, *types: int) -> tuple[int, int, int, bytes] | None:
        """Frames are read until one of ``types`` (or EOF: None)."""
        while (got := await self.frame()) is not None:
            if got[0] in types:
                return got
        return None

    async def goaway_code(self) -> int | None:
        """The GOAWAY's error code, then EOF; None when the server just closed."""
        got = await self.until(FrameType.GOAWAY)
        if got is None:
            return None
        assert await self.until() is None  # the connection closes after it
        return int.from_bytes(got[3][4:8], "big")

    def fields(self, block: bytes) -> dict[str, str]:
        return {str(k): str(v) for k, v in self.decoder.decode(block)}

    def close(self) -> None:
        self.writer.close()


def socket_path(srv: engine.FastServer) -> str:
    path = srv._unix_path
    assert path is not None
    return path


def grpc_message(data: bytes, compressed: int = 0) -> bytes:
    return bytes([compressed]) + struct.pack(">I", len(data)) + data


ERROR_CODES = range(1, 14)

BAD = {
    "bad preface": (
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 20,
        False,
        ErrorCode.PROTOCOL_ERROR,
    ),
    "not SETTINGS first": (engine.PREFACE + frame(FrameType.PING, 0, 0, b"12345678"), False, 1),
    "oversized frame": (b"\xff\xff\xff\x00\x00\x00\x00\x00\x01", True, ErrorCode.FRAME_SIZE_ERROR),
    "DATA on stream 0": (frame(FrameType.DATA, 0, 0, b"abc"), True, ErrorCode.PROTOCOL_ERROR),
    "DATA on an idle stream": (frame(FrameType.DATA, 0, 7, b"abc"), True, ErrorCode.PROTOCOL_ERROR),
    "HEADERS on an even stream": (None, True, ErrorCode.PROTOCOL_ERROR),
    "CONTINUATION alone": (
        frame(FrameType.CONTINUATION, 4, 1, b""),
        True,
        ErrorCode.PROTOCOL_ERROR,
    ),
    "PING not 8 bytes": (frame(FrameType.PING, 0, 0, b"1234"), True, ErrorCode.FRAME_SIZE_ERROR),
    "PING on a stream": (frame(FrameType.PING, 0, 1, b"12345678"), True, ErrorCode.PROTOCOL_ERROR),
    "SETTINGS length": (
        frame(FrameType.SETTINGS, 0, 0, b"12345"),
        True,
        ErrorCode.FRAME_SIZE_ERROR,
    ),
    "SETTINGS window too large": (
        frame(FrameType.SETTINGS, 0, 0, struct.pack(">HI", 4, 2**31)),
        True,
        3,
    ),
    "SETTINGS frame size too small": (
        frame(FrameType.SETTINGS, 0, 0, struct.pack(">HI", 5, 100)),
        True,
        ErrorCode.PROTOCOL_ERROR,
    ),
    "window overflow": (
        frame(FrameType.WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1)),
        True,
        3,
    ),
    "WINDOW_UPDATE of 0": (frame(FrameType.WINDOW_UPDATE, 0, 0, b"\0\0\0\0"), True, 1),
    "WINDOW_UPDATE length": (frame(FrameType.WINDOW_UPDATE, 0, 0, b"\0\0\1"), True, 6),
    "RST_STREAM on stream 0": (frame(FrameType.RST_STREAM, 0, 0, b"\0\0\0\0"), True, 1),
    "RST_STREAM on idle stream": (frame(FrameType.RST_STREAM, 0, 9, b"\0\0\0\0"), True, 1),
    "PRIORITY length": (frame(FrameType.PRIORITY, 0, 1, b"\0"), True, ErrorCode.FRAME_SIZE_ERROR),
    "PUSH_PROMISE": (frame(FrameType.PUSH_PROMISE, 4, 1, b"\0\0\0\2"), True, 1),
    "GOAWAY on a stream": (frame(FrameType.GOAWAY, 0, 1, b"\0" * 8), True, 1),
    "HPACK garbage": (frame(FrameType.HEADERS, 4, 1, b"\xff\xff\xff\xff\xff"), True, 9),
    "padding past HEADERS": (frame(FrameType.HEADERS, 0x8 | 4, 1, b"\x09abc"), True, 1),
}


@pytest.mark.parametrize(("data", "hello", "code"), BAD.values(), ids=BAD.keys())
async def test_protocol_errors_end_in_goaway_with_the_right_code(
    server: engine.FastServer, data: bytes | None, hello: bool, code: int
) -> None:
    raw = await Raw.open(socket_path(server), hello=hello)
    raw.send(data if data is not None else raw.headers(2))
    assert await raw.goaway_code() == code
    raw.close()
    await served_again(server)


async def served_again(server: engine.FastServer) -> None:
    """The server still serves (a fresh connection, a round trip)."""
    raw = await Raw.open(socket_path(server))
    raw.send(raw.headers(1) + frame(FrameType.DATA, 0, 1, grpc_message(b"ping")))
    got = await raw.until(FrameType.DATA)
    assert got is not None and got[3] == grpc_message(b"ping")
    raw.close()


async def test_continuation_interrupted_by_another_frame(server: engine.FastServer) -> None:
    raw = await Raw.open(socket_path(server))
    block = raw.headers(1)[9:]
    raw.send(frame(FrameType.HEADERS, 0, 1, block[:3]) + frame(FrameType.PING, 0, 0, b"12345678"))
    assert await raw.goaway_code() == ErrorCode.PROTOCOL_ERROR


async def test_headers_split_over_continuation_and_padding(server: engine.FastServer) -> None:
    raw = await Raw.open(socket_path(server))
    block = raw.headers(1)[9:]
    raw.send(
        frame(FrameType.HEADERS, Flag.PADDED | Flag.PRIORITY, 1,
              b"\x02" + b"\0\0\0\0\x10" + block[:4] + b"\0\0")
        + frame(FrameType.CONTINUATION, 0, 1, block[4:10])
        + frame(FrameType.CONTINUATION, Flag.END_HEADERS, 1, block[10:])
        + frame(FrameType.PRIORITY, 0, 1, b"\0\0\0\0\x10")
        + frame(FrameType.DATA, Flag.PADDED, 1, b"\x03" + grpc_message(b"hello")[:4] + b"\0\0\0")
        + frame(FrameType.DATA, 0, 1, grpc_message(b"hello")[4:])
    )  # fmt: skip
    got = await raw.until(FrameType.DATA)
    assert got is not None and got[3] == grpc_message(b"hello")


async def test_ping_is_answered_with_the_same_payload(server: engine.FastServer) -> None:
    raw = await Raw.open(socket_path(server))
    raw.send(frame(FrameType.PING, 0, 0, b"abcdefgh"))
    got = await raw.until(FrameType.PING)
    assert got == (FrameType.PING, Flag.ACK, 0, b"abcdefgh")


async def test_unknown_path_is_trailers_only_unimplemented(server: engine.FastServer) -> None:
    raw = await Raw.open(socket_path(server))
    raw.send(raw.headers(1, path="/no.Such/Method", end=True))
    got = await raw.until(FrameType.HEADERS)
    assert got is not None and got[1] & Flag.END_STREAM
    headers = raw.fields(got[3])
    assert headers["grpc-status"] == "12" and headers[":status"] == "200"


async def test_compressed_message_fails_the_stream(server: engine.FastServer) -> None:
    raw = await Raw.open(socket_path(server))
    raw.send(raw.headers(1) + frame(FrameType.DATA, 0, 1, grpc_message(b"z", compressed=1)))
    got = await raw.until(FrameType.HEADERS)
    assert got is not None
    assert raw.fields(got[3])["grpc-status"] == str(int(Code.INTERNAL))


async def test_message_over_the_receive_limit_is_resource_exhausted(
    server: engine.FastServer,
) -> None:
    raw = await Raw.open(socket_path(server))
    raw.send(raw.headers(1) + frame(FrameType.DATA, 0, 1, b"\0" + struct.pack(">I", 1 << 20)))
    got = await raw.until(FrameType.HEADERS)
    assert got is not None
    headers = raw.fields(got[3])
    assert headers["grpc-status"] == str(int(Code.RESOURCE_EXHAUSTED))
    assert "larger than max" in headers["grpc-message"]


async def test_reset_stream_cancels_the_handler(short_tmp: Path) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(downstream: Downstream, mode: Mode) -> Status:
        started.set()
        try:
            await downstream.recv()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Status()

    srv = engine.FastServer(handler)
    await srv.start(str(short_tmp / "r.sock"), None)
    try:
        raw = await Raw.open(socket_path(srv))
        raw.send(raw.headers(1))
        await asyncio.wait_for(started.wait(), 5)
        raw.send(frame(FrameType.RST_STREAM, 0, 1, struct.pack(">I", ErrorCode.CANCEL)))
        await asyncio.wait_for(cancelled.wait(), 5)
    finally:
        await srv.stop(0)


async def test_a_slow_reader_backpressures_the_sender(server: engine.FastServer) -> None:
    """The peer's stream window (here 100 bytes) bounds what the engine writes."""
    raw = await Raw.open(socket_path(server), window=100)
    message = bytes(range(256)) * 4
    raw.send(raw.headers(1) + frame(FrameType.DATA, 0, 1, grpc_message(message)))
    received = b""
    while len(received) < 100:
        got = await raw.until(FrameType.DATA)
        assert got is not None
        received += got[3]
    assert len(received) == 100  # not a byte more until the window opens
    (conn,) = server.connections
    assert conn.streams[1].send_window == 0
    raw.send(frame(FrameType.WINDOW_UPDATE, 0, 1, struct.pack(">I", 10_000)))
    while len(received) < len(message) + 5:
        got = await raw.until(FrameType.DATA)
        assert got is not None
        received += got[3]
    assert received == grpc_message(message)


def _net_core(name: str) -> int:
    return int(Path(f"/proc/sys/net/core/{name}").read_text())


@pytest.mark.parametrize("asked", [0, 1 << 20])
async def test_envoy_connections_get_the_send_buffer_asked(short_tmp: Path, asked: int) -> None:
    """``send_buffer`` (XDSFAST_ENVOY_SEND_BUFFER) on a Unix connection, while a big message
    is written: the kernel's buffer is twice what was asked, capped at net.core.wmem_max,
    and holds at least half of it for an Envoy that reads nothing yet; once the message is
    written, it is the kernel's default again (net.core.wmem_default; 0 asked: always)."""
    default = _net_core("wmem_default")
    wide = 2 * min(asked, _net_core("wmem_max")) if asked else default
    size = 8 << 20
    written = asyncio.Event()

    async def push(downstream: Downstream, mode: Mode) -> Status:
        await downstream.send(b"x" * size)
        written.set()
        await asyncio.Event().wait()  # (until the stream or the server ends)
        return Status()

    srv = engine.FastServer(push, engine.ServerSettings(send_buffer=asked))
    await srv.start(str(short_tmp / "b.sock"), None)
    try:
        raw = await Raw.open(socket_path(srv), window=16 << 20)
        reading = cast(asyncio.Transport, raw.writer.transport)
        reading.pause_reading()  # an Envoy that reads nothing yet
        raw.send(frame(FrameType.WINDOW_UPDATE, 0, 0, struct.pack(">I", 16 << 20)))
        raw.send(raw.headers(1))
        await eventually(lambda: bool(srv.connections), "the connection accepted")
        (conn,) = srv.connections
        transport = conn.transport
        assert transport is not None
        server_side = transport.get_extra_info("socket")
        # (the kernel took all it could: the server holds the rest)
        await eventually(lambda: transport.get_write_buffer_size() > 0, "bytes held back")
        assert server_side.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == wide
        queued = bytearray(4)
        fcntl.ioctl(raw.writer.get_extra_info("socket").fileno(), termios.FIONREAD, queued)
        assert int.from_bytes(queued, "little") >= wide // 2
        reading.resume_reading()  # Envoy reads it all
        got = 0
        while got < size + 5:
            data = await raw.until(FrameType.DATA)
            assert data is not None
            got += len(data[3])
        await asyncio.wait_for(written.wait(), 10)
        assert server_side.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == default
        raw.close()
    finally:
        await srv.stop(0)


@pytest.mark.parametrize("engine", ["fast"])
@pytest.mark.parametrize("asked", [0, 768 << 10])
async def test_the_agent_passes_its_configured_send_buffer(
    make_agent: AgentFactory, asked: int
) -> None:
    """Config.envoy_send_buffer (XDSFAST_ENVOY_SEND_BUFFER) reaches Envoy's connections."""
    agent = await make_agent(discovery_address="127.0.0.1:1", envoy_send_buffer=asked)
    srv = cast(engine.FastServer, agent.server)
    _, writer = await asyncio.open_unix_connection(agent.config.xds_socket)
    try:
        await eventually(lambda: bool(srv.connections), "the connection accepted")
        (conn,) = srv.connections
        assert conn.send_buffer == asked
    finally:
        writer.close()


async def test_unconsumed_requests_are_not_credited(short_tmp: Path) -> None:
    """Memory stays bounded: a stream's window is credited back only as the relay reads."""
    hold = Hold()
    srv = engine.FastServer(hold, engine.ServerSettings(max_recv_msg_size=1 << 20))
    await srv.start(str(short_tmp / "m.sock"), None)
    try:
        raw = await Raw.open(socket_path(srv))
        raw.send(raw.headers(1))
        chunk = grpc_message(b"m" * 1000)
        window = engine.STREAM_WINDOW
        sent = 0
        while sent + len(chunk) <= window:  # all the window the server gave
            raw.send(frame(FrameType.DATA, 0, 1, chunk))
            sent += len(chunk)
        raw.send(frame(FrameType.PING, 0, 0, b"syncsync"))
        while (got := await raw.until(FrameType.PING, FrameType.WINDOW_UPDATE)) is not None:
            assert not (got[0] == FrameType.WINDOW_UPDATE and got[2] == 1), "credited unread data"
            if got[0] == FrameType.PING:
                break
        (conn,) = srv.connections
        assert conn.streams[1].held == sent
        hold.release.set()
        got = await raw.until(FrameType.WINDOW_UPDATE)
        while got is not None and got[2] != 1:
            got = await raw.until(FrameType.WINDOW_UPDATE)
        assert got is not None
        raw.send(frame(FrameType.DATA, Flag.END_STREAM, 1, b""))
        await raw.until(FrameType.HEADERS)
        assert len(hold.got) == sent // len(chunk)
    finally:
        await srv.stop(0)


class Sinking:
    """A handler whose sink takes messages starting with ``T`` and leaves the rest to recv();
    it records who got what, and yields between recv()s so messages queue up meanwhile.
    With ``offer``, it offers what queued to the sink before each recv(), as the relay does."""

    def __init__(self, offer: bool = False) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.parked = asyncio.Event()
        self.offer = offer

    def sink(self, data: bytes) -> bool:
        if data.startswith(b"T"):
            self.got.append(("sink", data))
            return True
        return False

    async def __call__(self, downstream: Downstream, mode: Mode) -> Status:
        assert downstream.set_sink(self.sink)
        while True:
            self.parked.set()
            if self.offer:
                downstream.offer_queued()
            data = await downstream.recv()
            if data is None:
                return Status()
            self.got.append(("recv", data))
            for _ in range(3):
                await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def sinking_stream(path: Path, offer: bool = False) -> AsyncIterator[tuple[Sinking, Raw]]:
    """A server with a :class:`Sinking` handler and a raw client whose stream 1 it waits on."""
    handler = Sinking(offer)
    srv = engine.FastServer(handler)
    await srv.start(str(path), None)
    try:
        raw = await Raw.open(socket_path(srv))
        raw.send(raw.headers(1))
        await asyncio.wait_for(handler.parked.wait(), 5)
        yield handler, raw
        raw.close()
    finally:
        await srv.stop(0)


@given(
    kinds=st.lists(st.sampled_from("TR"), min_size=1, max_size=40),
    cuts=st.lists(st.integers(1, 60), min_size=1, max_size=8),
    offer=st.booleans(),
)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_the_sink_never_reorders_messages(
    short_tmp: Path, kinds: list[str], cuts: list[int], offer: bool
) -> None:
    """Whatever the sink takes or leaves, and however the bytes arrive, the messages are
    consumed in the order they were sent, each once; with offer_queued() before each recv(),
    recv() only ever gets what the sink declined."""
    sent = [f"{kind}{i}".encode() * (i % 7 + 1) for i, kind in enumerate(kinds)]

    async def scenario() -> list[tuple[str, bytes]]:
        async with sinking_stream(short_tmp / "s.sock", offer) as (handler, raw):
            payload = b"".join(grpc_message(m) for m in sent)
            pos, i = 0, 0
            while pos < len(payload):  # in pieces, each a DATA frame, yielding in between
                piece = payload[pos : pos + cuts[i % len(cuts)]]
                raw.send(frame(FrameType.DATA, 0, 1, piece))
                await raw.writer.drain()
                await asyncio.sleep(0)
                pos, i = pos + len(piece), i + 1
            raw.send(frame(FrameType.DATA, Flag.END_STREAM, 1))
            assert await raw.until(FrameType.HEADERS) is not None
            return handler.got

    got = asyncio.run(scenario())
    assert [data for _, data in got] == sent
    if offer:
        assert all(data.startswith(b"R") for who, data in got if who == "recv")


async def test_the_sink_takes_messages_while_recv_waits(short_tmp: Path) -> None:
    """The synchronous path is taken when it may be: recv() parked, nothing queued."""
    async with sinking_stream(short_tmp / "t.sock") as (handler, raw):
        raw.send(frame(FrameType.DATA, 0, 1, grpc_message(b"T-alone")))
        raw.send(frame(FrameType.PING, 0, 0, b"syncsync"))
        assert await raw.until(FrameType.PING) is not None  # the server read the DATA before
        assert handler.got == [("sink", b"T-alone")]
        raw.send(frame(FrameType.DATA, Flag.END_STREAM, 1, grpc_message(b"R-last")))
        assert await raw.until(FrameType.HEADERS) is not None
        assert handler.got == [("sink", b"T-alone"), ("recv", b"R-last")]


@given(garbage=st.binary(min_size=1, max_size=400), split=st.integers(1, 50))
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_fuzz_garbage_after_a_valid_handshake(short_tmp: Path, garbage: bytes, split: int) -> None:
    """Whatever follows the handshake ends in a GOAWAY with a protocol error code and a
    close; never a crash, a hang or a buffer past one frame; the next connection works."""

    async def run() -> None:
        srv = engine.FastServer(echo, engine.ServerSettings(max_recv_msg_size=1 << 16))
        await srv.start(str(short_tmp / "f.sock"), None)
        try:
            raw = await Raw.open(socket_path(srv))
            for i in range(0, len(garbage), split):
                raw.send(garbage[i : i + split])
            # Zeros complete any frame the garbage left open (then read as DATA on stream 0,
            # a protocol error), so the server always has something to answer.
            raw.send(bytes(engine.RECV_FRAME + 9) + frame(FrameType.PING, 0, 0, b"fuzzdone"))
            while (got := await raw.frame(timeout=5)) is not None:
                if got[0] == FrameType.GOAWAY:
                    assert int.from_bytes(got[3][4:8], "big") in ERROR_CODES
            for conn in srv.connections:
                assert len(conn.buf) <= engine.RECV_FRAME + 9
            raw.close()
            await served_again(srv)
        finally:
            await srv.stop(0)

    asyncio.run(asyncio.wait_for(run(), 20))


async def test_grpcio_client_round_trips_large_and_many_messages(server: engine.FastServer) -> None:
    """A real gRPC client: a message over many frames, and many small ones, in order."""
    channel = grpc.aio.insecure_channel(f"unix:{socket_path(server)}")
    call = channel.stream_stream(f"/{SERVICE}/{Mode.DELTA.value}")()
    big = bytes(range(256)) * 200  # over the 64 KiB receive limit? no: 51 KiB
    await call.write(big)
    assert await call.read() == big
    for i in range(200):
        await call.write(b"x%d" % i)
    assert [await call.read() for _ in range(200)] == [b"x%d" % i for i in range(200)]
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    unknown = channel.unary_unary("/no.Such/Method")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await unknown(b"")
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED
    await channel.close()
