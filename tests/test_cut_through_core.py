"""Cut-through in the engine's core, both kinds: a big message the judge says yes to comes
out as a ``Through`` whose frames carry exactly its bytes, whatever the cuts; one it refuses
(or cannot decide on) comes out whole, as before; what a Through still holds is not credited
to the peer until its frames are taken."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_h2_core import Transport
from twins import KINDS, Cores

from xdsfast.engines.fast.h2numbers import FrameType


@pytest.fixture
def h2(twins: Cores) -> ModuleType:
    return twins.h2


def framed(body: bytes) -> bytes:
    return b"\0" + len(body).to_bytes(4, "big") + body


class Judge:
    """Says ``verdict`` once it has seen ``after`` bytes (None before); after a yes, its
    ``scan`` refuses the rest (raises) once it has seen ``refuse_at`` bytes; logs every
    chunk."""

    def __init__(self, after: int, verdict: bool, refuse_at: int | None = None) -> None:
        self.after, self.verdict, self.refuse_at = after, verdict, refuse_at
        self.seen = bytearray()
        self.said: bool | None = None

    def feed(self, chunk: bytes) -> bool | None:
        assert type(chunk) is bytes and self.said is None
        self.seen += chunk
        if len(self.seen) >= self.after:
            self.said = self.verdict
        return self.said

    def scan(self, chunk: bytes) -> None:
        assert type(chunk) is bytes and self.said is True
        self.seen += chunk
        if self.refuse_at is not None and len(self.seen) >= self.refuse_at:
            raise ValueError("refused")


def payload_of(frames: list[bytes], stream_id: int, max_frame: int) -> bytes:
    """The DATA payload the frames carry, each header checked."""
    wire = b"".join(bytes(f) for f in frames)
    out = bytearray()
    pos = 0
    while pos < len(wire):
        length = int.from_bytes(wire[pos : pos + 3], "big")
        assert wire[pos + 3] == FrameType.DATA and wire[pos + 4] == 0
        assert int.from_bytes(wire[pos + 5 : pos + 9], "big") == stream_id
        assert 0 < length <= max_frame
        out += wire[pos + 9 : pos + 9 + length]
        pos += 9 + length
    return bytes(out)


def feed_all(assembler: Any, wire: bytes, cuts: list[int]) -> list[Any]:
    out: list[Any] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(wire)]:
        got = assembler.feed(wire, start, cut)
        out += got or []
        start = cut
    return out


@settings(max_examples=150, deadline=None)
@given(
    body=st.binary(min_size=41, max_size=3000),
    before=st.binary(max_size=40),
    after=st.binary(max_size=40),
    seen=st.integers(1, 4000),
    cuts=st.lists(st.integers(0, 3200), max_size=12),
    take=st.integers(1, 700),
    max_frame=st.integers(1, 500),
)
@pytest.mark.parametrize("kind", KINDS)
def test_a_through_carries_its_bytes_whatever_the_cuts(
    kind: str,
    body: bytes,
    before: bytes,
    after: bytes,
    seen: int,
    cuts: list[int],
    take: int,
    max_frame: int,
) -> None:
    h2 = Cores(kind).h2
    assembler = h2.Assembler(1 << 20)
    judges: list[Judge] = []

    def opener(length: int) -> Judge | None:
        assert length == len(body)
        judges.append(Judge(min(seen, length), True))
        return judges[-1]

    assembler.opener = opener
    assembler.through_min = 41  # (before and after are smaller: whole)
    wire = framed(before) + framed(body) + framed(after)
    out = feed_all(assembler, wire, cuts)
    assert len(out) == 3 and [out[0], out[2]] == [before, after]
    through = out[1]
    assert through.length == len(body) + 5 == len(through) == through.received
    assert bytes(judges[0].seen) == body and through.head is judges[0]
    assert not through.failed and through.arrived > 0 and not assembler.pending
    frames: list[bytes] = []
    while through.taken < through.length:
        frames += through.frames(min(take, through.length - through.taken), 7, max_frame)
    assert payload_of(frames, 7, max_frame) == framed(body)


@pytest.mark.parametrize("verdict", [False, None])
def test_a_refused_or_undecided_message_comes_whole(h2: ModuleType, verdict: bool | None) -> None:
    body = bytes(range(256)) * 40
    assembler = h2.Assembler(1 << 20)
    judge = Judge(100, False) if verdict is False else Judge(1 << 30, True)
    assembler.opener = lambda length: judge
    assembler.through_min = 1000
    wire = framed(b"small") + framed(body) + framed(b"next")
    out = feed_all(assembler, wire, list(range(7, len(wire), 333)))
    assert out == [b"small", body, b"next"]
    # A no ends the judging; undecided, it sees all.
    assert bytes(judge.seen) == (body[: 340 - 15] if verdict is False else body)


def test_no_judge_means_whole(h2: ModuleType) -> None:
    body = b"x" * 5000
    assembler = h2.Assembler(1 << 20)
    assembler.opener = lambda length: None
    assembler.through_min = 10
    assert feed_all(assembler, framed(body), [3, 900]) == [body]


def test_a_refusal_on_the_way_fails_it_and_drops_the_rest(h2: ModuleType) -> None:
    body = bytes(5000)
    assembler = h2.Assembler(1 << 20)
    judge = Judge(10, True, refuse_at=3000)
    assembler.opener = lambda length: judge
    assembler.through_min = 10
    wire = framed(body) + framed(b"after")
    out = feed_all(assembler, wire, list(range(100, len(wire), 1000)))
    through = out[0]
    assert out[1:] == [b"after"]
    assert through.failed and through.received < through.length
    assert through.received <= 3100 + 5


# -- credit: a Through's bytes are pinned until taken --------------------------------------


def _credits(transport: Transport, stream_id: int) -> int:
    total = 0
    for frame in transport.out:
        if frame[3] == FrameType.WINDOW_UPDATE and int.from_bytes(frame[5:9], "big") == stream_id:
            total += int.from_bytes(frame[9:13], "big")
    return total


def rig(h2: ModuleType, reading: bool) -> tuple[Any, Any, Transport]:
    """A client connection with stream 1 open, cut-through from 100 bytes."""

    class Stream(h2.StreamCore):  # type: ignore[name-defined,misc]
        def bad_message(self, error: int, length: int) -> None:
            raise AssertionError(error)

    class Conn(h2.ConnCore):  # type: ignore[name-defined,misc]
        def unread_over(self, stream: Any, per_connection: bool) -> None:
            raise AssertionError("over the unread budget")

    conn = Conn(True)
    conn.transport = transport = Transport()
    conn.settings_seen = True
    conn.local_window = 1 << 16
    stream = Stream(conn, 1, 1 << 20)
    conn.streams[1] = stream
    if reading:
        stream.start_reading()
    stream.assembler.opener = lambda length: Judge(1, True)
    stream.assembler.through_min = 100
    return conn, stream, transport


def deliver(conn: Any, stream: Any, wire: bytes) -> None:
    """Whole DATA frames for stream 1 as they would come off the socket."""
    for start in range(0, len(wire), 8000):
        piece = wire[start : start + 8000]
        conn.recv_window += len(piece)  # (the test is not about the connection window)
        stream.recv_window += len(piece)
        frame = len(piece).to_bytes(3, "big") + bytes((0, 0)) + (1).to_bytes(4, "big") + piece
        conn.data_received(frame)


def test_a_through_is_credited_only_as_it_is_taken(h2: ModuleType) -> None:
    conn, stream, transport = rig(h2, reading=True)
    body = bytes(range(256)) * 200  # 51200 bytes
    wire = framed(body)
    deliver(conn, stream, wire)
    (through,) = stream.messages
    assert through.received == len(wire) and stream.pinned == len(wire)
    assert _credits(transport, 1) == 0  # nothing taken: nothing credited
    stream.messages.popleft()  # as recv() does
    frames = through.frames(30000, 1, 16384)
    assert stream.pinned == len(wire) - 30000
    assert _credits(transport, 1) == 30000  # (a quarter of the window reached: sent)
    frames += through.frames(len(wire) - 30000, 1, 16384)
    assert payload_of(frames, 1, 16384) == wire
    assert stream.pinned == 0 and stream.held == 0 and through.stream is None
    assert _credits(transport, 1) == len(wire)


def test_a_through_on_a_stream_not_read_yet_costs_what_it_pins(h2: ModuleType) -> None:
    """The windows bound what a Through holds: its length is not charged to the budget
    of streams not read yet (40 KB here, over a 10 KB budget)."""
    conn, stream, _ = rig(h2, reading=False)
    conn.unread_max = 10_000
    deliver(conn, stream, framed(bytes(40_000)))
    (through,) = stream.messages
    assert through.received == 40_005 and stream.unread == h2.MESSAGE_COST
