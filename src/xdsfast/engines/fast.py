"""The fast engine: gRPC over HTTP/2 written for this one job, on asyncio Protocols.

One ``_Connection`` (an ``asyncio.BufferedProtocol``) per TCP/Unix/TLS connection; the
server side serves Envoy (h2c, many streams), the client side carries one stream to istiod
per connection.  The per-read path is ``xdsfast._h2`` (Cython, or its twin ``_h2_py``):
reads land in the connection's own buffer (``ConnCore.get_buffer``; over TLS, uvloop
decrypts into it), where ``ConnCore.buffer_updated`` finds frames, keeps the windows,
feeds DATA to the stream's reassembler and hands complete messages to the relay's sink,
calling back into this module only for the other frames.  Outgoing messages go to the
transport as frame headers plus slices of the message, never joined; only over TLS are the
small writes one read callback made joined, into one record (``ConnCore.coalesce``).

Flow control bounds memory both ways: a stream's receive window, and the connection's,
are credited back only for bytes the relay has taken with ``recv()`` (or that belong to a
message still being reassembled for a stream the relay reads, which must complete), and
``send()`` waits for the peer's window and for the transport's write buffer to drain.
Hostile peers (either side) meet the core's budgets: messages held for streams the relay
does not read yet, control frames per second, replies queued for a peer that does not
read (``xdsfast._h2``); past one, ENHANCE_YOUR_CALM, counted and logged (``HOSTILE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections import deque
from typing import cast
from urllib.parse import quote, unquote

import hpack

from xdsfast import log
from xdsfast._errors import H2ConnectionError
from xdsfast.engines import (
    SERVICE,
    Code,
    DialError,
    DialSettings,
    Mode,
    ServerSettings,
    Sink,
    Status,
    StreamError,
    StreamHandler,
    Upstream,
)
from xdsfast.engines._sockets import prepare_socket_path
from xdsfast.upstream import bearer_token, load_tls

if os.environ.get("XDSFAST_NO_EXTENSIONS"):
    from xdsfast import _h2_py as _h2
else:
    try:
        from xdsfast import _h2  # type: ignore[no-redef]
    except ImportError:  # pragma: no cover - no compiled core on this platform
        from xdsfast import _h2_py as _h2

IMPLEMENTATION = "python" if _h2.__name__.endswith("_py") else "cython"

_log = log.scope("xdsproxy")

PREFACE = _h2.PREFACE  # the client's connection preface (the core checks it)

# Frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
# Flags
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# Settings
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 4, 5, 6
# Error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
SETTINGS_TIMEOUT, STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM = 4, 5, 6, 7
CANCEL, COMPRESSION_ERROR, CONNECT_ERROR, ENHANCE_YOUR_CALM = 8, 9, 10, 11

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_FRAME = 16_384
# What we advertise for receiving.
RECV_FRAME = 1 << 20  # largest frame we accept
STREAM_WINDOW = 4 << 20  # per stream; credited back as the relay consumes
CONN_WINDOW = 16 << 20
MAX_HEADER_LIST = 64 << 10  # decoded header list size we accept
MAX_HEADER_BLOCK = 256 << 10  # encoded header block (HEADERS + CONTINUATION) we buffer
UNLIMITED = 2**62
CLOSE_WAIT = 1.0  # how long closing an upstream stream waits for istiod to end it
# How long a closed connection may take to flush what it wrote (a peer that does not read
# would otherwise keep it, and its buffer, forever).
CLOSE_GRACE = 2.0
HOSTILE_LOG_INTERVAL = 60.0  # one warning per kind of hostile peer per interval, with a count

_CONTENT_TYPE = b"application/grpc"

# gRPC's mapping of HTTP status codes (for a response that is not gRPC).
_HTTP_TO_GRPC = {400: Code.INTERNAL, 401: Code.UNAUTHENTICATED, 403: Code.PERMISSION_DENIED,
                 404: Code.UNIMPLEMENTED, 429: Code.UNAVAILABLE, 502: Code.UNAVAILABLE,
                 503: Code.UNAVAILABLE, 504: Code.UNAVAILABLE}  # fmt: skip
# RST_STREAM codes as gRPC statuses (gRPC's HTTP/2 transport spec).
_RST_TO_GRPC = {NO_ERROR: Code.INTERNAL, REFUSED_STREAM: Code.UNAVAILABLE, CANCEL: Code.CANCELLED,
                ENHANCE_YOUR_CALM: Code.RESOURCE_EXHAUSTED}  # fmt: skip

_PATHS = {f"/{SERVICE}/{mode.value}".encode(): mode for mode in Mode}


def _header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return _h2.frame_header(length, ftype, flags, stream_id)


def _settings(values: dict[int, int]) -> bytes:
    payload = b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in values.items())
    return _header(len(payload), SETTINGS, 0, 0) + payload


def _percent(message: str) -> bytes:
    return quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")


class _Hostile:
    """Hostile peers met, counted by kind; one warning per kind per interval, with the
    number met since the last one (a peer that reconnects cannot flood the log)."""

    KINDS = ("control_flood", "unread_replies", "unread_requests", "header_limits")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self.KINDS, 0)
        self._logged: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def note(self, kind: str, who: str, why: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = time.monotonic()
        last = self._logged.get(kind)
        if last is not None and now - last < HOSTILE_LOG_INTERVAL:
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            return
        self._logged[kind] = now
        more = self._quiet.pop(kind, 0)
        _log.warning(
            "hostile HTTP/2 peer (%s): %s%s",
            who,
            why,
            f" ({more} more since the last report)" if more else "",
        )


HOSTILE = _Hostile()  # per process: what an operator may want counted (see ``counts``)


def _hostile_kind(why: str) -> str:
    """Which budget an ENHANCE_YOUR_CALM connection error came from (the core's words)."""
    if why.startswith("flood of"):
        return "control_flood"
    if "does not read" in why:
        return "unread_replies"
    return "header_limits"


# -- streams ---------------------------------------------------------------------------------


class _Stream(_h2.StreamCore):
    """One HTTP/2 stream carrying one gRPC call, either side (its per-read path is in
    ``_h2.StreamCore``)."""

    __slots__ = ("sent_headers", "status", "task")

    conn: _Connection

    def __init__(self, conn: _Connection, stream_id: int, max_recv: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.assembler = _h2.Assembler(max_recv)  # cuts gRPC messages out of DATA payloads
        self.messages = deque()  # complete, not yet taken by recv()
        self.held = 0  # received bytes not yet credited back to the peer
        self.credit = 0  # bytes the relay has consumed, to credit in a batch
        self.recv_window = conn.local_window
        self.send_window = conn.peer_initial_window
        self._waiter = None
        self.ended = False  # the peer ended its side (END_STREAM)
        self.closed = False  # we are done with it (trailers sent / reset / failed)
        self.error: StreamError | None = None  # recv() raises it once messages run out
        self.status: Status | None = None  # the peer's trailers (client side)
        self.sent_headers = False
        self.sendable = False  # try_send writes (server: headers sent; client: not half-closed)
        self.task: asyncio.Task[None] | None = None
        self.sink = None  # takes messages while next_message() waits
        self.receiving = False  # next_message() waits, with nothing queued
        self.reading = False  # the relay has started taking messages (then: credit, prealloc)
        self.unread = 0  # what messages queued before that cost (the core's budgets)
        self.assembler.prealloc = _h2.PREALLOC_UNREAD  # a hostile prefix costs little

    def sink_failed(self, exc: Exception) -> None:
        _log.error("stream sink failed", exc_info=exc)

    def bad_message(self, error: int, length: int) -> None:
        """A message this stream cannot take (1: compressed, 2: too large)."""
        if error == 1:
            status = Status(Code.INTERNAL, "compressed gRPC messages are not supported")
        else:
            status = Status(
                Code.RESOURCE_EXHAUSTED,
                f"Received message larger than max ({length} vs. {self.assembler.max_len})",
            )
        self.fail(StreamError(status))
        self.conn.on_bad_message(self, status)

    def on_end(self) -> None:
        self.ended = True
        if self.assembler.pending and self.error is None:
            self.error = StreamError(Status(Code.INTERNAL, "stream ended inside a message"))
        self._wake()

    def fail(self, error: StreamError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def failure(self) -> StreamError:
        """``self.error`` to raise: a copy, since the one kept would keep the traceback of
        each raise, whose frames refer to this stream (a cycle only a full GC frees)."""
        assert self.error is not None
        return StreamError(self.error.status)

    def handled(self, task: asyncio.Task[None]) -> None:
        """The handler's task ended: not kept, as its exception's traceback refers to this
        stream (a cycle only a full GC frees, holding all the handler held)."""
        self.task = None

    async def finished(self) -> None:
        """Until the peer ended the stream or it failed (messages left unread are dropped)."""
        self.start_reading()
        while not self.ended and self.error is None and not self.closed:
            self.messages.clear()
            self._release()
            waiter = self._waiter = self.conn.loop.create_future()
            await waiter

    async def next_message(self) -> bytes | None:
        """The next message; None at the peer's END_STREAM; raises ``self.error``."""
        if not self.reading:
            self.start_reading()
        while True:
            messages = self.messages
            if messages:
                data = messages.popleft()
                if not messages:
                    self._release()
                return data
            if self.error is not None:
                raise self.failure()
            if self.ended:
                return None
            waiter = self._waiter = self.conn.loop.create_future()
            self.receiving = True
            try:
                await waiter
            finally:
                self.receiving = False

    # sending (one frame, windows open: ``try_write`` in the core)

    async def write_message(self, data: bytes) -> None:
        if self.try_write(data):  # the common case: one frame, the windows open
            return
        conn = self.conn
        total = len(data) + 5
        offset = 0
        while offset < total:
            if self.closed or conn.closed:
                raise self.failure() if self.error else StreamError(conn.lost_status())
            window = min(self.send_window, conn.send_window)
            if window <= 0:
                await conn.wait_window()
                continue
            n = min(window, total - offset)
            self.send_window -= n
            conn.send_window -= n
            conn.sent_data = True
            conn.writelines(_h2.data_frames(data, offset, n, self.id, conn.peer_max_frame))
            offset += n
        if conn.write_paused:
            await conn.drain()


# -- connection ------------------------------------------------------------------------------


class _Connection(_h2.ConnCore, asyncio.BufferedProtocol):
    """HTTP/2 framing, settings, flow control, pings and GOAWAY; sides subclass it.

    The per-read path (``get_buffer``/``buffer_updated``: frames found, DATA to streams,
    WINDOW_UPDATE, credit) is ``_h2.ConnCore``'s; every other frame comes to ``on_frame``."""

    def __init__(self, keepalive_interval: float, keepalive_timeout: float, client: bool) -> None:
        super().__init__()
        self.loop = asyncio.get_running_loop()
        self.client = client
        self.preface_seen = client  # a server first reads the client's preface
        self.recv_frame = RECV_FRAME
        self.conn_window = CONN_WINDOW
        self.last_peer_stream = 0  # highest stream id the peer opened (server side)
        self.local_window = STREAM_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_FRAME
        self.send_window = DEFAULT_WINDOW  # connection-level, towards the peer
        self.recv_window = DEFAULT_WINDOW  # connection-level, from the peer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        self.decoder.max_allowed_table_size = 4096
        self.header_stream = 0
        self.header_end_stream = False
        self.goaway_received: int | None = None
        self.goaway_sent = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.ready: asyncio.Future[None] = self.loop.create_future()  # peer's SETTINGS seen
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.close_reason = ""
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.last_read = time.monotonic()  # the core's clock is CLOCK_MONOTONIC too
        self._keepalive: asyncio.TimerHandle | None = None
        self._ping_deadline: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        hello = [
            _settings(
                {
                    S_ENABLE_PUSH: 0,
                    S_INITIAL_WINDOW_SIZE: self.local_window,
                    S_MAX_FRAME_SIZE: RECV_FRAME,
                    S_MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
                    **self.extra_settings(),
                }
            ),
            _h2.frame_u32(WINDOW_UPDATE, 0, CONN_WINDOW - DEFAULT_WINDOW),
        ]
        self.recv_window = CONN_WINDOW
        if self.client:
            hello.insert(0, PREFACE)
        self.writelines(hello)
        if self.keepalive_interval > 0:
            self._keepalive = self.loop.call_later(self.keepalive_interval, self._keepalive_tick)

    def extra_settings(self) -> dict[int, int]:
        return {}

    def engine_error(self, exc: Exception) -> None:
        """A bug in the receive path: never let it escape into the event loop."""
        _log.error("HTTP/2 engine error", exc_info=exc)
        self.abort(INTERNAL_ERROR, f"internal error: {exc!r}")

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.replies_paused = 0  # the peer reads again
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def eof_received(self) -> bool | None:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.close_reason:
            self.close_reason = "Socket closed" if exc is None else f"Socket closed: {exc}"
        self.closed = True
        for timer in (self._keepalive, self._ping_deadline, self._close_timer):
            if timer is not None:
                timer.cancel()
        self.resume_writing()
        self._wake_window()
        error = StreamError(self.lost_status())
        for stream in list(self.streams.values()):
            self.release_stream(stream)
            self.stream_lost(stream, error)
        self.streams.clear()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(self.close_reason))
            self.ready.exception()  # retrieved: nobody may be waiting
        if not self.lost.done():
            self.lost.set_result(None)

    def lost_status(self) -> Status:
        return Status(Code.UNAVAILABLE, self.close_reason or "transport is closing")

    def stream_lost(self, stream: _Stream, error: StreamError) -> None:
        stream.closed = True
        stream.fail(error)

    # writing

    async def drain(self) -> None:
        if not self.write_paused or self.closed:
            return
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    async def wait_window(self) -> None:
        waiter = self.loop.create_future()
        self._window_waiters.append(waiter)
        await waiter

    def _wake_window(self) -> None:
        waiters, self._window_waiters = self._window_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        block = self.encoder.encode(headers)
        frames = []
        limit = self.peer_max_frame
        first, rest = block[:limit], block[limit:]
        flags = (END_STREAM if end else 0) | (0 if rest else END_HEADERS)
        frames.append(_header(len(first), HEADERS, flags, stream_id) + first)
        while rest:
            piece, rest = rest[:limit], rest[limit:]
            frames.append(
                _header(len(piece), CONTINUATION, 0 if rest else END_HEADERS, stream_id) + piece
            )
        self.sent_data = True
        self.writelines(frames)

    def reset(self, stream: _Stream, code: int) -> None:
        self.write(_h2.frame_u32(RST_STREAM, stream.id, code))
        self.forget(stream)

    def stream_failed(self, stream: _Stream, code: int, why: str) -> None:
        """A stream error: RST_STREAM ``code``; its call ends with INTERNAL ``why``."""
        self.count_reply()
        self.reset(stream, code)
        self.stream_lost(stream, StreamError(Status(Code.INTERNAL, why)))

    def unread_over(self, stream: _Stream, per_connection: bool) -> None:
        """The core: messages queued for streams the relay does not read yet went over the
        connection's budget (or the process's): that stream is reset, ENHANCE_YOUR_CALM."""
        where = "on this connection" if per_connection else "in this process"
        limit = self.unread_max if per_connection else _h2.UNREAD_PROCESS_MAX
        why = f"requests held for streams not read yet exceed {limit} bytes {where}"
        HOSTILE.note("unread_requests", self.who(), f"stream {stream.id} reset: {why}")
        self.count_reply()
        self.reset(stream, ENHANCE_YOUR_CALM)
        self.stream_lost(stream, StreamError(Status(Code.RESOURCE_EXHAUSTED, why)))

    def forget(self, stream: _Stream) -> None:
        stream.closed = True
        self.streams.pop(stream.id, None)
        self.release_stream(stream)

    def who(self) -> str:
        """The peer, for a log line."""
        return "istiod"

    def goaway(self, code: int, why: str = "") -> None:
        if self.goaway_sent or self.closed:
            return
        self.goaway_sent = True
        debug = why.encode("utf-8", "replace")[:256]
        payload = self.last_peer_stream.to_bytes(4, "big") + code.to_bytes(4, "big") + debug
        self.write(_header(len(payload), GOAWAY, 0, 0) + payload)

    def abort(self, code: int, why: str) -> None:
        """A connection error: GOAWAY with ``code`` and close."""
        _log.debug("HTTP/2 connection error %d: %s", code, why)
        if code == ENHANCE_YOUR_CALM and not self.goaway_sent and not self.closed:
            HOSTILE.note(_hostile_kind(why), self.who(), why)
        self.goaway(code, why)
        self.close(f"protocol error: {why}")

    def close(self, why: str) -> None:
        if not self.close_reason:
            self.close_reason = why
        self.flush()  # what this connection holds goes out before it closes
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # reads stop; what was written is flushed, then closed
            if self._close_timer is None and not self.closed:
                self._close_timer = self.loop.call_later(CLOSE_GRACE, self._close_overdue)
        elif self.transport is None:
            self.connection_lost(None)

    def _close_overdue(self) -> None:
        """A closed connection whose peer does not read what was left: drop it."""
        self._close_timer = None
        if not self.closed and self.transport is not None:
            self.transport.abort()

    # keepalive, as Istio's (30 s idle -> PING, 10 s for its ACK)

    def _keepalive_tick(self) -> None:
        if self.closed:
            return
        idle = time.monotonic() - self.last_read
        if idle >= self.keepalive_interval and self._ping_deadline is None:
            self.write(_header(8, PING, 0, 0) + b"xdsfast!")
            self._ping_deadline = self.loop.call_later(self.keepalive_timeout, self._ping_timeout)
            wait = self.keepalive_interval
        else:
            wait = max(self.keepalive_interval - idle, 0.01)
        self._keepalive = self.loop.call_later(wait, self._keepalive_tick)

    def _ping_timeout(self) -> None:
        self._ping_deadline = None
        self.goaway(NO_ERROR, "keepalive ping not answered")
        self.close("keepalive ping not answered (connection dead)")

    # reading

    def on_frame(
        self, view: memoryview, ftype: int, flags: int, sid: int, start: int, end: int
    ) -> None:
        length = end - start
        if self.header_block is not None and (ftype != CONTINUATION or sid != self.header_stream):
            raise H2ConnectionError(PROTOCOL_ERROR, "expected CONTINUATION")
        if not self.settings_seen and ftype != SETTINGS:
            raise H2ConnectionError(PROTOCOL_ERROR, "the first frame must be SETTINGS")
        if ftype == DATA:
            self.on_data(view, flags, sid, start, end)
        elif ftype == HEADERS:
            if sid == 0:
                raise H2ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
            pos, stop = start, end
            if flags & PADDED:
                if length < 1:
                    raise H2ConnectionError(FRAME_SIZE_ERROR, "HEADERS too short")
                pad = view[pos]
                pos += 1
                stop -= pad
            if flags & PRIORITY_FLAG:
                pos += 5
            if stop < pos:
                raise H2ConnectionError(PROTOCOL_ERROR, "padding longer than HEADERS")
            block = bytearray(view[pos:stop])
            self.header_end_stream = bool(flags & END_STREAM)
            self.header_stream = sid
            if flags & END_HEADERS:
                self._headers_done(sid, block)
            else:
                self.header_block = block
        elif ftype == CONTINUATION:
            if self.header_block is None or sid != self.header_stream:
                raise H2ConnectionError(PROTOCOL_ERROR, "unexpected CONTINUATION")
            self.header_block += view[start:end]
            if len(self.header_block) > MAX_HEADER_BLOCK:
                raise H2ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
            if start == end and not flags & END_HEADERS:
                self.charge("empty CONTINUATION frames")
            if flags & END_HEADERS:
                block, self.header_block = self.header_block, None
                self._headers_done(sid, block)
        elif ftype == SETTINGS:
            self.on_settings(view, flags, sid, start, end)
        elif ftype == WINDOW_UPDATE:
            self.on_window_update(view, sid, start, end)
        elif ftype == PING:
            if sid != 0:
                raise H2ConnectionError(PROTOCOL_ERROR, "PING on a stream")
            if length != 8:
                raise H2ConnectionError(FRAME_SIZE_ERROR, "PING is not 8 bytes")
            if flags & ACK:
                if self._ping_deadline is not None:
                    self._ping_deadline.cancel()
                    self._ping_deadline = None
                else:
                    self.charge("PING frames")  # an ACK for no PING of ours
            else:
                if self.sent_data:  # one PING per write of ours is free (gRPC's BDP probes)
                    self.sent_data = False
                else:
                    self.charge("PING frames")
                self.reply(_header(8, PING, ACK, 0) + bytes(view[start:end]))
        elif ftype == RST_STREAM:
            if sid == 0:
                raise H2ConnectionError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
            if length != 4:
                raise H2ConnectionError(FRAME_SIZE_ERROR, "RST_STREAM is not 4 bytes")
            self.check_not_idle(sid, "RST_STREAM")
            stream = self.streams.get(sid)
            if stream is not None:
                self.on_reset(stream, int.from_bytes(view[start:end], "big"))
        elif ftype == GOAWAY:
            if sid != 0:
                raise H2ConnectionError(PROTOCOL_ERROR, "GOAWAY on a stream")
            if length < 8:
                raise H2ConnectionError(FRAME_SIZE_ERROR, "GOAWAY too short")
            last = int.from_bytes(view[start : start + 4], "big") & 0x7FFFFFFF
            code = int.from_bytes(view[start + 4 : start + 8], "big")
            debug = bytes(view[start + 8 : end]).decode("utf-8", "replace")
            self.on_goaway(last, code, debug)
        elif ftype == PRIORITY:
            if sid == 0:
                raise H2ConnectionError(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if length != 5:
                raise H2ConnectionError(FRAME_SIZE_ERROR, "PRIORITY is not 5 bytes")
            self.charge("PRIORITY frames")
        elif ftype == PUSH_PROMISE:
            raise H2ConnectionError(PROTOCOL_ERROR, "PUSH_PROMISE with push disabled")
        else:  # unknown frame types are ignored (RFC 9113 section 4.1), within the budget
            self.charge("frames of unknown type")

    def check_not_idle(self, sid: int, what: str) -> None:
        own = (sid % 2 == 1) == self.client
        if own:
            if sid > self.last_own_stream():
                raise H2ConnectionError(PROTOCOL_ERROR, f"{what} on an idle stream")
        elif sid > self.last_peer_stream:
            raise H2ConnectionError(PROTOCOL_ERROR, f"{what} on an idle stream")

    def last_own_stream(self) -> int:
        return 0

    def on_data(self, view: memoryview, flags: int, sid: int, start: int, end: int) -> None:
        """A whole DATA frame (padded ones come this way)."""
        flow = end - start
        pad = 0
        if flags & PADDED:
            if flow < 1 or view[start] >= flow:
                raise H2ConnectionError(PROTOCOL_ERROR, "padding longer than DATA")
            pad = view[start]
            if flow == 1 + pad and not flags & END_STREAM:  # nothing but padding
                self.charge("empty DATA frames")
        self.data_start(flags, sid, flow)
        self.data_left = 0
        stream = self.data_stream
        if stream is not None and self.data_feed:
            if flags & PADDED:
                start, end = start + 1, end - pad
            if end > start:
                stream.on_payload(view, start, end)
        self._data_done()

    def on_end_stream(self, stream: _Stream) -> None:
        stream.on_end()

    def on_bad_message(self, stream: _Stream, status: Status) -> None:
        """A message the stream cannot take (too large, compressed)."""

    def on_settings(self, view: memoryview, flags: int, sid: int, start: int, end: int) -> None:
        if sid != 0:
            raise H2ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        self.charge("SETTINGS frames")
        length = end - start
        if flags & ACK:
            if length:
                raise H2ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if length % 6:
            raise H2ConnectionError(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        for pos in range(start, end, 6):
            key = int.from_bytes(view[pos : pos + 2], "big")
            value = int.from_bytes(view[pos + 2 : pos + 6], "big")
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise H2ConnectionError(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise H2ConnectionError(FLOW_CONTROL_ERROR, "stream window overflow")
                self._wake_window()
            elif key == S_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= 16_777_215:
                    raise H2ConnectionError(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self.peer_max_frame = value
            elif key == S_ENABLE_PUSH:
                if value > 1 or (value == 1 and self.client):
                    raise H2ConnectionError(PROTOCOL_ERROR, "bad SETTINGS_ENABLE_PUSH")
            elif key == S_HEADER_TABLE_SIZE:
                self.encoder.header_table_size = min(value, 4096)
        self.reply(_header(0, SETTINGS, ACK, 0))
        if not self.settings_seen:
            self.settings_seen = True
            if not self.ready.done():
                self.ready.set_result(None)

    def on_window_update(self, view: memoryview, sid: int, start: int, end: int) -> None:
        if end - start != 4:
            raise H2ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE is not 4 bytes")
        increment = int.from_bytes(view[start:end], "big") & 0x7FFFFFFF
        if sid == 0:
            if increment == 0:
                raise H2ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise H2ConnectionError(FLOW_CONTROL_ERROR, "connection window overflow")
        else:
            self.check_not_idle(sid, "WINDOW_UPDATE")
            stream = self.streams.get(sid)
            if stream is None:
                return
            if increment == 0:
                self.stream_failed(stream, PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
                return
            stream.send_window += increment
            if stream.send_window > MAX_WINDOW:
                self.stream_failed(stream, FLOW_CONTROL_ERROR, "window overflow")
                return
        self._wake_window()

    def _headers_done(self, sid: int, block: bytearray) -> None:
        try:
            headers = self.decoder.decode(bytes(block), raw=True)
        except hpack.OversizedHeaderListError as exc:
            raise H2ConnectionError(ENHANCE_YOUR_CALM, f"header list too large: {exc}") from None
        except (hpack.HPACKError, IndexError, ValueError) as exc:
            raise H2ConnectionError(COMPRESSION_ERROR, f"bad header block: {exc}") from None
        self.on_headers(sid, cast(list[tuple[bytes, bytes]], headers), self.header_end_stream)

    def on_headers(self, sid: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        raise NotImplementedError

    def on_reset(self, stream: _Stream, code: int) -> None:
        raise NotImplementedError

    def on_goaway(self, last: int, code: int, debug: str) -> None:
        raise NotImplementedError


# -- server (Envoy's side) --------------------------------------------------------------------


class _Downstream:
    """Envoy's side of one stream."""

    __slots__ = ("_stream", "offer_queued", "peer", "try_send")

    def __init__(self, stream: _Stream, peer: str) -> None:
        self._stream = stream
        self.peer = peer
        self.try_send = stream.try_send  # the core's, called straight from the relay's sink
        self.offer_queued = stream.offer_queued  # the core's too

    async def recv(self) -> bytes | None:
        return await self._stream.next_message()

    async def send(self, data: bytes) -> None:
        stream = self._stream
        if not stream.sent_headers:
            stream.sent_headers = stream.sendable = True
            stream.conn.send_headers(
                stream.id, [(b":status", b"200"), (b"content-type", _CONTENT_TYPE)], False
            )
        if stream.error is not None and stream.closed:
            raise StreamError(Status(Code.UNAVAILABLE, f"send to Envoy failed: {stream.error}"))
        await stream.write_message(data)

    def set_sink(self, sink: Sink | None) -> bool:
        self._stream.sink = sink
        return True


class _ServerConnection(_Connection):
    def __init__(self, server: FastServer) -> None:
        s = server.settings
        super().__init__(s.keepalive_interval, s.keepalive_timeout, client=False)
        self.server = server
        self.peer = "unknown"

    def extra_settings(self) -> dict[int, int]:
        return {S_MAX_CONCURRENT_STREAMS: min(self.server.settings.max_concurrent_streams, 2**31)}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server.connections.add(self)
        name = transport.get_extra_info("peername")
        if isinstance(name, tuple) and len(name) >= 2:
            self.peer = (
                f"ipv4:{name[0]}:{name[1]}" if ":" not in name[0] else f"ipv6:[{name[0]}]:{name[1]}"
            )
        else:
            self.peer = f"unix:{name or ''}"

    def who(self) -> str:
        return f"Envoy side, {self.peer}"

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server.connections.discard(self)

    def stream_lost(self, stream: _Stream, error: StreamError) -> None:
        super().stream_lost(stream, error)
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()  # Envoy went away: the handler is cancelled, as with grpc.aio

    def on_headers(self, sid: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        stream = self.streams.get(sid)
        if stream is not None:  # trailers from Envoy: must end the stream
            if not end:
                self.count_reply()
                self.reset(stream, PROTOCOL_ERROR)
                self.stream_lost(stream, StreamError(Status(Code.INTERNAL, "bad trailers")))
                return
            self.on_end_stream(stream)
            return
        if sid % 2 == 0 or sid <= self.last_peer_stream:
            if sid % 2 == 0 or sid > self.last_peer_stream:
                raise H2ConnectionError(PROTOCOL_ERROR, f"bad stream id {sid}")
            raise H2ConnectionError(STREAM_CLOSED, f"HEADERS on closed stream {sid}")
        self.last_peer_stream = sid
        if self.goaway_sent:
            self.reply(_h2.frame_u32(RST_STREAM, sid, REFUSED_STREAM))
            return
        if len(self.streams) >= self.server.settings.max_concurrent_streams:
            self.reply(_h2.frame_u32(RST_STREAM, sid, REFUSED_STREAM))
            return
        fields = dict(headers)
        method, path = fields.get(b":method"), fields.get(b":path", b"")
        mode = _PATHS.get(path)
        if method != b"POST" or mode is None:
            code = Code.UNIMPLEMENTED if method == b"POST" else Code.INTERNAL
            why = f"unknown method {path.decode('latin-1')}" if method == b"POST" else "not POST"
            self._trailers_only(sid, Status(code, why), end)
            return
        if fields.get(b"grpc-encoding", b"identity") not in (b"identity", b""):
            self._trailers_only(sid, Status(Code.UNIMPLEMENTED, "compression unsupported"), end)
            return
        stream = _Stream(self, sid, self.server.settings.max_recv_msg_size)
        self.streams[sid] = stream
        if end:
            stream.on_end()
        stream.task = self.loop.create_task(self._serve(stream, mode))
        stream.task.add_done_callback(stream.handled)

    def _trailers_only(self, sid: int, status: Status, ended: bool) -> None:
        self.count_reply()
        self.send_headers(sid, _trailers(status, with_status=True), True)
        if not ended:
            self.write(_h2.frame_u32(RST_STREAM, sid, NO_ERROR))

    async def _serve(self, stream: _Stream, mode: Mode) -> None:
        try:
            status = await self.server.handler(_Downstream(stream, self.peer), mode)
        except asyncio.CancelledError:
            if not stream.closed:  # cancelled by us (server stop), not by Envoy
                self.send_headers(
                    stream.id,
                    _trailers(Status(Code.CANCELLED, "server stopping"), not stream.sent_headers),
                    True,
                )
                self._finish(stream)
            raise
        except Exception as exc:  # a bug in the handler: INTERNAL, as grpc.aio does
            _log.error("stream handler failed", exc_info=exc)
            status = Status(Code.UNKNOWN, f"Unexpected {exc!r}")
        if stream.closed or self.closed:
            return
        self.send_headers(stream.id, _trailers(status, not stream.sent_headers), True)
        self._finish(stream)

    def _finish(self, stream: _Stream) -> None:
        """Trailers sent: the stream is done on our side."""
        if not stream.ended:
            self.write(_h2.frame_u32(RST_STREAM, stream.id, NO_ERROR))
        self.forget(stream)

    def on_bad_message(self, stream: _Stream, status: Status) -> None:
        pass  # recv() raises; the relay ends the stream with that status

    def on_reset(self, stream: _Stream, code: int) -> None:
        self.forget(stream)
        self.stream_lost(
            stream, StreamError(Status(Code.CANCELLED, f"RST_STREAM with error code {code}"))
        )

    def on_goaway(self, last: int, code: int, debug: str) -> None:
        self.goaway_received = last
        if code != NO_ERROR:
            self.close(f"GOAWAY from Envoy ({code}): {debug}")


def _trailers(status: Status, with_status: bool) -> list[tuple[bytes, bytes]]:
    headers = [(b":status", b"200"), (b"content-type", _CONTENT_TYPE)] if with_status else []
    headers.append((b"grpc-status", str(int(status.code)).encode()))
    if status.details:
        headers.append((b"grpc-message", _percent(status.details)))
    return headers


class FastServer:
    """Serves both ADS methods on a Unix socket and/or a TCP address (h2c)."""

    def __init__(self, handler: StreamHandler, settings: ServerSettings | None = None) -> None:
        self.handler = handler
        self.settings = settings or ServerSettings()
        self.connections: set[_ServerConnection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_path: str | None = None
        self.tcp_port: int | None = None

    async def start(self, unix_path: str | None, tcp_address: str | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            if unix_path:
                prepare_socket_path(unix_path)
                server = await loop.create_unix_server(lambda: _ServerConnection(self), unix_path)
                self._servers.append(server)
                self._unix_path = unix_path
                os.chmod(unix_path, 0o666)  # Envoy may run as another user (as Istio does)
            if tcp_address:
                host, _, port = tcp_address.rpartition(":")
                host = host.strip("[]") or None  # type: ignore[assignment]
                try:
                    server = await loop.create_server(
                        lambda: _ServerConnection(self), host, int(port), reuse_address=True
                    )
                except OSError as exc:
                    raise OSError(f"cannot listen on {tcp_address} ({exc.strerror})") from None
                self._servers.append(server)
                self.tcp_port = int(server.sockets[0].getsockname()[1])
        except BaseException:
            await self.stop(0)
            raise

    async def stop(self, grace: float | None = None) -> None:
        for server in self._servers:
            server.close()
        self._servers = []
        for conn in list(self.connections):
            conn.goaway(NO_ERROR, "server shutting down")
        tasks = [
            s.task for c in self.connections for s in c.streams.values()
            if s.task is not None and not s.task.done()
        ]  # fmt: skip
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace or 0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for conn in list(self.connections):
            conn.close("server stopped")
        if self._unix_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)
            self._unix_path = None


# -- dialer (istiod's side) -------------------------------------------------------------------


class _ClientConnection(_Connection):
    def __init__(self, settings: DialSettings) -> None:
        super().__init__(settings.keepalive_interval, settings.keepalive_timeout, client=True)
        self.coalesce = settings.tls is not None  # one TLS record for the ACKs a read carried
        self.stream: _Stream | None = None
        self.headers_seen = False

    def last_own_stream(self) -> int:
        return 1 if self.stream is not None else 0

    def on_headers(self, sid: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        stream = self.streams.get(sid)
        if sid % 2 == 0:
            raise H2ConnectionError(PROTOCOL_ERROR, "server opened a stream")
        if stream is None:
            self.check_not_idle(sid, "HEADERS")
            return
        fields = dict(headers)
        if not self.headers_seen:
            self.headers_seen = True
            http = fields.get(b":status", b"")
            if http != b"200":
                code = int(http) if http.isdigit() else 0
                status = Status(_HTTP_TO_GRPC.get(code, Code.UNKNOWN), f"HTTP status {code}")
                if b"grpc-status" not in fields:
                    self._end(stream, status)
                    return
        if end:
            self._end(stream, _status_of(fields))

    def _end(self, stream: _Stream, status: Status) -> None:
        stream.status = status
        if status.code != Code.OK:
            stream.fail(StreamError(status))
        stream.on_end()
        stream.closed = True
        self.streams.pop(stream.id, None)
        self.release_stream(stream)  # (what it holds is still read: credit is moot now)

    def on_end_stream(self, stream: _Stream) -> None:  # END_STREAM on DATA: no trailers
        self._end(stream, Status(Code.INTERNAL, "server closed the stream without trailers"))

    def on_bad_message(self, stream: _Stream, status: Status) -> None:
        self.reset(stream, CANCEL)

    def on_reset(self, stream: _Stream, code: int) -> None:
        self.forget(stream)
        status = Status(_RST_TO_GRPC.get(code, Code.INTERNAL), f"RST_STREAM with error code {code}")
        self.stream_lost(stream, StreamError(status))

    def on_goaway(self, last: int, code: int, debug: str) -> None:
        self.goaway_received = last
        why = f"GOAWAY received (code {code}{': ' + debug if debug else ''})"
        self.close_reason = why
        for stream in list(self.streams.values()):
            if stream.id > last:
                self.forget(stream)
                self.stream_lost(stream, StreamError(Status(Code.UNAVAILABLE, why)))
        if code != NO_ERROR:
            self.close(why)


def _status_of(fields: dict[bytes, bytes]) -> Status:
    raw = fields.get(b"grpc-status")
    if raw is None or not raw.isdigit():
        return Status(Code.UNKNOWN, "missing grpc-status")
    number = int(raw)
    code = Code(number) if number in Code._value2member_map_ else Code.UNKNOWN
    message = unquote(fields.get(b"grpc-message", b"").decode("utf-8", "replace"))
    return Status(code, message)


class _Upstream:
    """istiod's side of one stream, over its own connection."""

    __slots__ = ("_conn", "_half_closed", "_stream", "offer_queued", "try_send")

    def __init__(self, conn: _ClientConnection, stream: _Stream) -> None:
        self._conn = conn
        self._stream = stream
        self._half_closed = False
        stream.sendable = True  # its headers are out
        self.try_send = stream.try_send  # the core's, called straight from the relay's sink
        self.offer_queued = stream.offer_queued  # the core's too

    async def half_close(self) -> None:
        conn, stream = self._conn, self._stream
        if not self._half_closed and not conn.closed and not stream.closed:
            self._half_closed = True
            stream.sendable = False
            conn.write(_header(0, DATA, END_STREAM, stream.id))

    async def recv(self) -> bytes | None:
        stream = self._stream
        data = await stream.next_message()
        if data is None and stream.status is None:  # ended without trailers
            raise StreamError(Status(Code.INTERNAL, "stream ended without trailers"))
        return data

    async def send(self, data: bytes) -> None:
        stream = self._stream
        if stream.closed:
            if stream.error is not None:
                raise stream.failure()
            raise StreamError(stream.status or self._conn.lost_status())
        await stream.write_message(data)

    def set_sink(self, sink: Sink | None) -> bool:
        self._stream.sink = sink
        return True

    async def close(self) -> None:
        """Half-close first, so what was sent is read before the stream goes; then cancel.

        A RST_STREAM right behind the last DATA frames would let the server drop
        requests it has received but not yet read (Envoy's half-close flushes them)."""
        conn, stream = self._conn, self._stream
        if not conn.closed and not stream.closed:
            await self.half_close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stream.finished(), CLOSE_WAIT)
        if not conn.closed and not stream.closed:
            conn.reset(stream, CANCEL)
        conn.close("closed by the relay")
        conn.stream = None  # (it and the stream refer to each other)
        if conn.transport is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.lost), 1.0)


class FastDialer:
    """A fresh connection per Envoy stream, as Istio's agent does."""

    def __init__(self, settings: DialSettings) -> None:
        self._settings = settings

    async def open(self, mode: Mode, metadata: tuple[tuple[str, str], ...]) -> Upstream:
        s = self._settings
        token = bearer_token(s.token_path)
        if token is not None:
            metadata = (*metadata, ("authorization", f"Bearer {token}"))
        loop = asyncio.get_running_loop()
        material = None if s.tls is None else load_tls(s.tls)  # read now: rotations apply
        context = None if material is None else material.context  # checked, or DialError
        server_name = None if material is None else material.server_name
        conn: _ClientConnection | None = None

        def factory() -> _ClientConnection:
            nonlocal conn
            conn = _ClientConnection(s)
            return conn

        async def connect() -> None:
            if s.target.startswith("unix:"):
                path = s.target[len("unix:") :].removeprefix("//")
                await loop.create_unix_connection(
                    factory, path, ssl=context, server_hostname=server_name if context else None
                )
            else:
                from xdsfast.config import split_host_port

                host, port = split_host_port(s.target)
                await loop.create_connection(
                    factory, host, port, ssl=context, server_hostname=server_name
                )
            assert conn is not None
            if context is not None:
                protocol = conn.transport.get_extra_info("ssl_object") if conn.transport else None
                if protocol is not None and protocol.selected_alpn_protocol() not in (None, "h2"):
                    raise DialError("istiod did not agree to HTTP/2 (ALPN)")
            await conn.ready

        try:
            await asyncio.wait_for(connect(), s.connect_timeout)
        except asyncio.TimeoutError:
            if conn is not None:
                conn.close("connect timeout")
            raise DialError(f"timed out connecting to {s.target}") from None
        except DialError:
            if conn is not None:
                conn.close("dial failed")
            raise
        except (OSError, ConnectionError, ValueError) as exc:
            if conn is not None:
                conn.close("dial failed")
            raise DialError(f"cannot connect to {s.target}: {_why(exc, conn)}") from None
        except asyncio.CancelledError:  # a newer Envoy stream replaced this one: no socket left
            if conn is not None:
                conn.close("dial cancelled")
            raise
        assert conn is not None
        stream = _Stream(conn, 1, UNLIMITED)
        conn.stream = stream
        conn.streams[1] = stream
        authority = (server_name or s.target).encode()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"https" if context else b"http"),
            (b":path", f"/{SERVICE}/{mode.value}".encode()),
            (b":authority", authority),
            (b"content-type", _CONTENT_TYPE),
            (b"te", b"trailers"),
            (b"user-agent", b"xdsfast"),
            *((k.lower().encode(), v.encode()) for k, v in metadata),
        ]
        conn.send_headers(1, headers, False)
        return _Upstream(conn, stream)


def _why(exc: BaseException, conn: _Connection | None) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        text = exc.verify_message or str(exc)
        if "hostname" in text.lower() or "ip address mismatch" in text.lower():
            return f"TLS: hostname verification failed: {text} (CERTIFICATE_VERIFY_FAILED)"
        return f"TLS: CERTIFICATE_VERIFY_FAILED: {text}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, FileNotFoundError):
        return f"no such socket ({exc.filename or exc})"
    if isinstance(exc, ConnectionError) and conn is not None:
        return f"socket closed during the handshake ({conn.close_reason})"
    return str(exc) or type(exc).__name__


__all__ = [
    "IMPLEMENTATION",
    "DialSettings",
    "FastDialer",
    "FastServer",
    "ServerSettings",
]
