"""The engine's per-read path (``ConnCore``/``StreamCore``), compiled and twin, fed the same
bytes cut the same way: every callback, every byte written, every message and every window
must come out the same.  The engine's socket-level tests (test_h2, the relay suites) run on
whichever one is active; this pins the two to each other on the frames that matter."""

from __future__ import annotations

import inspect
import re
import struct
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twins import KINDS, Cores

from xdsfast._errors import H2ConnectionError
from xdsfast.engines.fast import _h2_py, protocol
from xdsfast.engines.fast.h2numbers import Flag, FrameType


@pytest.fixture
def h2(twins: Cores) -> ModuleType:
    """The HTTP/2 core of each kind (the ``twins`` fixture: tests/twins.py)."""
    return twins.h2


LOCAL_WINDOW = 4096  # small, so credit goes out as WINDOW_UPDATE within an example
RECV_FRAME = 2048
MAX_MESSAGE = 600


class Transport:
    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(bytes(data))

    def writelines(self, chunks: list[Any]) -> None:
        self.out.append(b"".join(bytes(c) for c in chunks))


def build(h2: ModuleType) -> tuple[Any, list[tuple[Any, ...]]]:
    """A connection with streams 1 (a sink that takes messages starting with T), 3 (no sink)
    and 5 (its peer already ended it); every callback the core makes is logged."""
    log: list[tuple[Any, ...]] = []

    class Stream(h2.StreamCore):  # type: ignore[name-defined,misc]
        error: Any

        def bad_message(self, error: int, length: int) -> None:
            log.append(("bad_message", self.id, error, length))
            self.error = "bad"

        def sink_failed(self, exc: Exception) -> None:
            log.append(("sink_failed", self.id, str(exc)))

    class Conn(h2.ConnCore):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__(False)  # the server's side: the preface comes first
            self.transport = Transport()
            self.settings_seen = True
            self.local_window = LOCAL_WINDOW
            self.peer_initial_window = self.peer_max_frame = 1000
            self.send_window = self.recv_window = 8192
            self.recv_frame = RECV_FRAME
            self.conn_window = 8192

        def on_frame(
            self, view: memoryview, ftype: int, flags: int, sid: int, s: int, e: int
        ) -> None:
            log.append(("frame", ftype, flags, sid, bytes(view[s:e])))
            if ftype == FrameType.PING and e - s != 8:
                raise H2ConnectionError(6, "PING is not 8 bytes")

        def on_end_stream(self, stream: Any) -> None:
            log.append(("end", stream.id))
            stream.ended = True

        def abort(self, code: int, why: str) -> None:
            log.append(("abort", code, why))
            self.closed = True

        def engine_error(self, exc: Exception) -> None:
            log.append(("bug", repr(exc)))
            self.closed = True

        def check_not_idle(self, sid: int, what: str) -> None:
            log.append(("idle?", sid, what))

        def stream_failed(self, stream: Any, code: int, why: str) -> None:
            log.append(("stream_failed", stream.id, code, why))
            stream.closed = True

        def _wake_window(self) -> None:
            log.append(("wake_window",))

        def unread_over(self, stream: Any, per_connection: bool) -> None:
            log.append(("unread_over", stream.id, per_connection))
            stream.closed = True

    conn = Conn()
    for sid in (1, 3, 5):
        stream = Stream(conn, sid, MAX_MESSAGE)
        assert (stream.recv_window, stream.send_window) == (LOCAL_WINDOW, 1000)  # conn's
        stream.sendable = True  # its headers are out
        stream.ended = sid == 5
        if sid == 1:  # the relay reads 1, and waits for it; 3 is not read yet
            stream.start_reading()
            stream.receiving = True
        conn.streams[sid] = stream

    def sink(message: bytes) -> bool:
        log.append(("sink", message))
        if message.startswith(b"X"):
            raise RuntimeError("a bug in the sink")
        return message.startswith(b"T") and conn.streams[3].try_send(message)

    conn.streams[1].sink = sink
    conn._window_waiters.append(None)  # someone waits for window: WINDOW_UPDATE wakes them
    return conn, log


CONN_FIELDS = ("recv_window", "send_window", "conn_credit", "data_left", "closed", "unread")
STREAM_FIELDS = (
    "held", "credit", "recv_window", "send_window", "ended", "closed", "error", "unread"
)  # fmt: skip


def state(conn: Any, log: list[tuple[Any, ...]]) -> dict[str, Any]:
    return {
        "log": log,
        "written": b"".join(conn.transport.out),
        "conn": [getattr(conn, name) for name in CONN_FIELDS] + [bytes(conn.buf)],
        "streams": {
            sid: [getattr(s, name) for name in STREAM_FIELDS]
            + [list(s.messages), s.assembler.pending, s.assembler.error]
            for sid, s in conn.streams.items()
        },
    }


def header(length: int, ftype: int, flags: int, sid: int) -> bytes:
    return struct.pack(">I", length)[1:] + bytes((ftype, flags)) + struct.pack(">I", sid)


def grpc(body: bytes, compressed: int = 0) -> bytes:
    return bytes((compressed,)) + struct.pack(">I", len(body)) + body


bodies = st.builds(
    lambda kind, n: kind + b"m" * n, st.sampled_from([b"T", b"R", b"X"]), st.integers(0, 700)
)
messages = st.lists(st.builds(grpc, bodies, st.sampled_from([0, 0, 0, 1])), max_size=4)
data_frames = st.builds(
    lambda sid, flags, msgs, pad: (sid, flags, b"".join(msgs), pad),
    st.sampled_from([1, 1, 1, 3, 5, 7, 0]),
    st.sampled_from([0, 0, Flag.END_STREAM, Flag.PADDED]),
    messages,
    st.integers(0, 9),
)


@st.composite
def wire(draw: st.DrawFn) -> bytes:
    out = [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]
    for kind in draw(st.lists(st.sampled_from("DDDDWPG"), max_size=12)):
        if kind == "D":
            sid, flags, payload, pad = draw(data_frames)
            if flags & Flag.PADDED:
                payload = bytes((pad,)) + payload + b"\0" * pad
            while True:  # as DATA frames no larger than the limit (one may be over: an error)
                limit = RECV_FRAME + draw(st.sampled_from([0, 0, 0, 0, 1]))
                piece, payload = payload[:limit], payload[limit:]
                last = not payload
                out.append(header(len(piece), FrameType.DATA, flags if last else 0, sid) + piece)
                if last:
                    break
        elif kind == "W":
            sid = draw(st.sampled_from([0, 1, 3, 9]))
            increment = draw(st.sampled_from([0, 1, 500, 2**31 - 1]))
            size = draw(st.sampled_from([4, 4, 4, 3]))
            out.append(
                header(size, FrameType.WINDOW_UPDATE, 0, sid) + struct.pack(">I", increment)[:size]
            )
        elif kind == "P":
            out.append(header(8, FrameType.PING, 0, 0) + b"pingpong")
        else:
            out.append(draw(st.binary(max_size=30)))
    return b"".join(out)


def read_into(conn: Any, chunk: bytes) -> None:
    """A read as asyncio.BufferedProtocol makes it: into the connection's own buffer, which
    is then scribbled over, as the next read would, so nothing may still point into it."""
    buf = conn.get_buffer(-1)
    buf[: len(chunk)] = chunk
    conn.buffer_updated(len(chunk))
    buf[: len(chunk)] = b"\xee" * len(chunk)


@settings(max_examples=300, deadline=None)
@given(data=wire(), cuts=st.lists(st.integers(1, 700), min_size=1, max_size=6))
def test_twins_agree_on_any_read_sequence(data: bytes, cuts: list[int]) -> None:
    """Each core, fed by data_received and by get_buffer/buffer_updated, ends the same."""
    results = []
    for kind in KINDS:  # the twin, and where built the compiled core
        h2 = Cores(kind).h2
        for read in (lambda conn, chunk: conn.data_received(chunk), read_into):
            conn, log = build(h2)
            pos, i = 0, 0
            while pos < len(data) and not conn.closed:
                step = cuts[i % len(cuts)]
                read(conn, data[pos : pos + step])
                pos, i = pos + step, i + 1
            results.append(state(conn, log))
    assert all(result == results[0] for result in results[1:])


def test_messages_go_to_the_sink_and_the_rest_are_queued_in_order(h2: ModuleType) -> None:
    conn, log = build(h2)
    wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    payload = grpc(b"T1") + grpc(b"R2") + grpc(b"T3")
    wire += header(len(payload), FrameType.DATA, 0, 1) + payload
    for i in range(len(wire)):  # one byte a read: every cut there is
        conn.data_received(wire[i : i + 1])
    stream = conn.streams[1]
    assert [entry for entry in log if entry[0] == "sink"] == [("sink", b"T1"), ("sink", b"R2")]
    assert list(stream.messages) == [b"R2", b"T3"]  # T3 is not offered: R2 is queued first
    assert conn.transport.out == [
        header(7, FrameType.DATA, 0, 3) + grpc(b"T1")
    ]  # the sink's try_send
    # The frame was credited when T1 was taken with nothing queued: in a batch, not yet sent.
    assert (stream.held, stream.credit, conn.conn_credit) == (0, len(payload), len(payload))


def test_offer_queued_hands_the_sink_what_queued_until_it_declines(h2: ModuleType) -> None:
    conn, log = build(h2)
    stream = conn.streams[1]
    stream.messages.extend([b"T1", b"T2", b"R3", b"T4"])
    stream.held = 40
    stream.offer_queued()
    assert [entry[1] for entry in log if entry[0] == "sink"] == [b"T1", b"T2", b"R3"]
    assert list(stream.messages) == [b"R3", b"T4"]  # R3 declined: it and all behind it wait
    assert (stream.held, stream.credit) == (40, 0)  # credit waits for the queue to empty
    assert stream.messages.popleft() == b"R3"  # what recv() does with it
    stream.offer_queued()
    assert not stream.messages
    assert (stream.held, stream.credit) == (0, 40)  # emptied: all of it credited
    assert conn.transport.out == [
        header(len(m) + 5, FrameType.DATA, 0, 3) + grpc(m) for m in (b"T1", b"T2", b"T4")
    ]  # the sink's try_send, in order
    stream.messages.append(b"X5")  # a bug in the sink: recv() gets it, the sink is dropped
    stream.offer_queued()
    assert list(stream.messages) == [b"X5"] and stream.sink is None
    assert log[-1] == ("sink_failed", 1, "a bug in the sink")


@pytest.mark.parametrize("coalesce", [False, True])
def test_a_coalescing_connection_writes_what_one_read_made_at_once(
    h2: ModuleType, coalesce: bool
) -> None:
    """Over TLS each write is its own record: what the sink forwards during one read goes
    out joined when the read's callback ends.  Without ``coalesce``, each at once."""
    conn, log = build(h2)
    conn.coalesce = coalesce
    wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    payload = grpc(b"T1") + grpc(b"T2") + grpc(b"T3")
    conn.data_received(wire)
    conn.data_received(header(len(payload), FrameType.DATA, 0, 1) + payload)
    assert [entry[1] for entry in log if entry[0] == "sink"] == [b"T1", b"T2", b"T3"]
    frames = [header(7, FrameType.DATA, 0, 3) + grpc(m) for m in (b"T1", b"T2", b"T3")]
    assert conn.transport.out == ([b"".join(frames)] if coalesce else frames)
    conn.write(b"after")  # outside a read callback: at once
    assert conn.transport.out[-1] == b"after"


def test_try_send_writes_only_to_a_sendable_stream_that_has_not_failed(h2: ModuleType) -> None:
    conn, _ = build(h2)
    stream = conn.streams[3]
    stream.sendable = False  # headers not sent yet (server), or half-closed (client)
    assert stream.try_send(b"a") is False
    stream.sendable, stream.error = True, "reset by the peer"
    assert stream.try_send(b"b") is False
    assert conn.transport.out == []
    stream.error = None
    assert stream.try_send(b"c") is True
    assert conn.transport.out == [header(6, FrameType.DATA, 0, 3) + grpc(b"c")]
    assert stream.send_window == 1000 - 6  # what try_write takes from the windows


def test_an_oversized_frame_aborts_with_frame_size_error(h2: ModuleType) -> None:
    conn, log = build(h2)
    conn.data_received(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + header(RECV_FRAME + 1, FrameType.DATA, 0, 1)
    )
    assert log == [("abort", 6, f"frame of {RECV_FRAME + 1} bytes")]
    conn, log = build(h2)
    conn.data_received(b"PRI * HTTP/2.0\r\n\r\nXX")
    assert log == [("abort", 1, "bad connection preface")]


def test_the_callbacks_the_pxd_lists_are_the_twins_and_the_engine_defines_them() -> None:
    """_h2.pxd's header names every method the core calls on its Python subclass: they
    are the twin's stubs (each raises NotImplementedError), and the engine defines each."""
    text = Path(_h2_py.__file__).with_name("_h2.pxd").read_text()
    section = text.split("# Callbacks:", 1)[1].split("\n#\n", 1)[0]
    listed = set(re.findall(r"^#\s+(?:\w+\s+->\s+)?(\w+)\(", section, re.MULTILINE))
    stubs = {
        (core.__name__, name)
        for core in (_h2_py.StreamCore, _h2_py.ConnCore)
        for name, method in vars(core).items()
        if inspect.isfunction(method)
        and inspect.getsource(method).rstrip().endswith("raise NotImplementedError")
    }
    assert listed == {name for _, name in stubs}
    engine = {"StreamCore": protocol.Stream, "ConnCore": protocol.Connection}
    for core, name in stubs:
        assert getattr(engine[core], name) is not getattr(getattr(_h2_py, core), name, None)
