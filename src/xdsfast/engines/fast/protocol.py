"""The fast engine's HTTP/2 layer: streams and connections, either side.

One ``Connection`` (an ``asyncio.BufferedProtocol``) per TCP/Unix/TLS connection; the
server's (``server.py``) serves Envoy, the dialer's (``dialer.py``) carries one stream to
istiod.  The per-read path is the core, ``_h2`` (Cython, or its twin ``_h2_py``), which
calls back into this module only for the frames that are not DATA or WINDOW_UPDATE.
Hostile peers meet the core's budgets; past one, ENHANCE_YOUR_CALM, counted and logged
here (``HOSTILE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import TYPE_CHECKING, Any, cast

import hpack

from xdsfast import _ext, log
from xdsfast._errors import H2ConnectionError
from xdsfast.engines import Code, SourceError, Status, StreamError
from xdsfast.engines.fast.h2numbers import (
    DEFAULT_FRAME,
    DEFAULT_WINDOW,
    MAX_FRAME,
    MAX_WINDOW,
    ErrorCode,
    Flag,
    FrameType,
    SettingCode,
)

if TYPE_CHECKING:  # both have the same API; the twin is the reference
    from xdsfast.engines.fast import _h2_py as _h2
else:
    _h2 = _ext.load("_h2")

IMPLEMENTATION = _ext.implementation("_h2")

_log = log.scope("xdsproxy")

PREFACE = _h2.PREFACE  # the client's connection preface (the core checks it)
frame_header = _h2.frame_header  # the 9-byte frame header
frame_u32 = _h2.frame_u32  # a frame whose payload is one 32-bit number

# What we advertise for receiving.
RECV_FRAME = 1 << 20  # largest frame we accept
STREAM_WINDOW = 4 << 20  # per stream; credited back as the relay consumes
CONN_WINDOW = 16 << 20
MAX_HEADER_LIST = 64 << 10  # decoded header list size we accept
MAX_HEADER_BLOCK = 256 << 10  # encoded header block (HEADERS + CONTINUATION) we buffer
# Cut-through: a response from istiod this big or bigger is offered to the relay's judge
# and, if it says yes, written to Envoy as it arrives; smaller ones are held whole: they
# cost little, and whole they go out in one write (5 MB pushes back to back cost ~15 %
# more relay CPU relayed as they came, at 1 MiB; 40 MB ones ~70 % less).
THROUGH_MIN = 8 << 20
THROUGH_WRITE = 1 << 20  # written at most at a time, so the transport buffers little...
THROUGH_BATCH = 1 << 20  # ...and at least while full reads say more is waiting to be read
# A message this big or bigger is written with the kernel's send buffer widened, where the
# connection has a wider one to ask for (``Connection.widen_for``): six 40 MB pushes 0.80x ->
# 0.95x direct; not from 1 MiB: 5 MB pushes back to back went 0.85x -> 0.73x (more CPU).
WIDE_WRITE = THROUGH_MIN
# How long a closed connection may take to flush what it wrote (a peer that does not read
# would otherwise keep it, and its buffer, forever).
CLOSE_GRACE = 2.0
HOSTILE_LOG_INTERVAL = 60.0  # one warning per kind of hostile peer per interval, with a count

CONTENT_TYPE = b"application/grpc"


def _settings(values: dict[int, int]) -> bytes:
    payload = b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in values.items())
    return frame_header(len(payload), FrameType.SETTINGS, 0, 0) + payload


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


class Stream(_h2.StreamCore):
    """One HTTP/2 stream carrying one gRPC call, either side (its per-read path is in
    ``_h2.StreamCore``)."""

    __slots__ = ("sent_headers", "status", "task")

    conn: Connection
    error: StreamError | None  # recv() raises it once messages run out

    def __init__(self, conn: Connection, stream_id: int, max_recv: int) -> None:
        super().__init__(conn, stream_id, max_recv)  # the core's state (see _h2.pxd)
        self.status: Status | None = None  # the peer's trailers (client side)
        self.sent_headers = False
        self.task: asyncio.Task[None] | None = None

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
        self._wake_receiver()

    def fail(self, error: StreamError) -> None:
        if self.error is None:
            self.error = error
        self._wake_receiver()

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
            self._credit_held()
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
                    self._credit_held()
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
        wide = conn.widen_for(total)
        try:
            while offset < total:
                if self.closed or conn.closed:
                    raise self.failure() if self.error else StreamError(conn.lost_status())
                window = min(self.send_window, conn.send_window)
                if window <= 0:
                    await conn.wait_window()
                    continue
                n = min(window, total - offset)
                self._spend(n)
                conn.writelines(_h2.data_frames(data, offset, n, self.id, conn.peer_max_frame))
                offset += n
            if conn.write_paused:
                await conn.drain()
        finally:
            if wide:
                conn.narrow()

    def _spend(self, count: int) -> None:
        """``count`` DATA bytes are about to be written: they leave both send windows."""
        self.send_window -= count
        self.conn.send_window -= count
        self.conn.sent_data = True

    async def write_through(self, through: _h2.Through, whole: bool) -> None:
        """Write ``through``'s bytes as they arrive, as far as the windows and the socket
        let (``THROUGH_WRITE`` at a time: the transport holds little); its source is
        credited for what is written, so istiod sends no faster than Envoy reads.  Not
        ``whole``: all but the last byte, returning once every byte has arrived (so the
        relay can check the message before Envoy has it whole); ``whole``: the rest.
        While it waits for bytes, the source's read callback writes them (``pump_through``).
        Raises SourceError when the source fails first (or the judge refused the rest)."""
        conn = self.conn
        source = through.stream
        length = through.length
        through.until = until = length if whole else length - 1
        wide = conn.widen_for(until - through.taken)  # (not for the last byte alone)
        try:
            while through.taken < until or through.received < length:
                if through.failed:
                    raise SourceError(Status(Code.INTERNAL, "the rest of the message was refused"))
                if self.closed or conn.closed:
                    raise self.failure() if self.error else StreamError(conn.lost_status())
                if self._pump(through):
                    continue
                if through.ready:  # the windows or the socket hold it back
                    if conn.write_paused:
                        await conn.drain()
                    else:
                        await conn.wait_window()
                    continue
                assert source is not None  # (let go only once all is taken)
                if source.error is not None:
                    raise SourceError(source.error.status)
                if source.ended or source.closed:
                    raise SourceError(Status(Code.UNAVAILABLE, "the stream ended inside a message"))
                through.writer = self
                waiter = source._waiter = conn.loop.create_future()
                await waiter
        finally:
            through.writer = None
            if wide:
                conn.narrow()

    def _pump(self, through: _h2.Through) -> bool:
        """Write what of ``through`` is ready and fits now; True if anything was."""
        conn = self.conn
        wrote = False
        while not (self.closed or conn.closed or conn.write_paused):
            count = min(through.ready, self.send_window, conn.send_window, THROUGH_WRITE)
            if count <= 0:
                break
            self._spend(count)
            conn.writelines(through.frames(count, self.id, conn.peer_max_frame))
            wrote = True
        return wrote

    def pump_through(self, through: _h2.Through, more: bool) -> bool:
        """The source's read callback brought bytes while ``write_through`` waits: write
        what fits now, and say whether the writer may sleep on (all that came is written,
        more is to come) rather than be woken (no task switch a read).  While ``more``
        (the read filled the buffer: more is waiting in the socket), bytes gather up to
        ``THROUGH_BATCH`` first: a write (a syscall) each, not one a read."""
        if more and through.ready < THROUGH_BATCH and through.received < through.length:
            return not through.failed  # (istiod's window, 4 MiB, lets the rest come)
        self._pump(through)
        return not through.failed and through.received < through.length and not through.ready


# -- connection ------------------------------------------------------------------------------


class Connection(_h2.ConnCore, asyncio.BufferedProtocol):
    """HTTP/2 framing, settings, flow control, pings and GOAWAY; sides subclass it.

    The per-read path (``get_buffer``/``buffer_updated``: frames found, DATA to streams,
    WINDOW_UPDATE, credit) is ``_h2.ConnCore``'s; every other frame comes to ``on_frame``."""

    def __init__(self, keepalive_interval: float, keepalive_timeout: float, client: bool) -> None:
        super().__init__(client)  # the core's state, the protocol's initial values
        # What we advertise for receiving (sent in connection_made).
        self.recv_frame = RECV_FRAME
        self.conn_window = CONN_WINDOW
        self.local_window = STREAM_WINDOW
        self.loop = asyncio.get_running_loop()
        self.last_peer_stream = 0  # highest stream id the peer opened (server side)
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
        self._keepalive: asyncio.TimerHandle | None = None
        self._ping_deadline: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        # While a big message is written, the kernel's send buffer is ``send_buffer`` (0:
        # left alone), then back to what it was (``wide_send_buffer``, ``widen_for``).
        self.send_buffer = 0
        self._socket: Any = None
        self._narrow_to = 0  # (setsockopt doubles what it is given: half the default)
        self._wide = 0  # big messages being written

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        hello = [
            _settings(
                {
                    SettingCode.ENABLE_PUSH: 0,
                    SettingCode.INITIAL_WINDOW_SIZE: self.local_window,
                    SettingCode.MAX_FRAME_SIZE: RECV_FRAME,
                    SettingCode.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
                    **self.extra_settings(),
                }
            ),
            frame_u32(FrameType.WINDOW_UPDATE, 0, CONN_WINDOW - DEFAULT_WINDOW),
        ]
        self.recv_window = CONN_WINDOW
        if self.client:
            hello.insert(0, PREFACE)
        self.writelines(hello)
        if self.keepalive_interval > 0:
            self._keepalive = self.loop.call_later(self.keepalive_interval, self._keepalive_tick)

    def wide_send_buffer(self, sock: Any, size: int) -> None:
        """Ask ``size`` of the kernel (SO_SNDBUF) for ``sock`` while big messages are
        written: the default buffer of a Unix socket (often 208 KiB) takes a big push in many
        small writes, each a wake-up for the peer and for us. Kept wide, it took each of a
        burst of small messages on its own, with no writes joined while the peer reads (about
        10 % more CPU a message), and 5 MB pushes cost more (``WIDE_WRITE``)."""
        with contextlib.suppress(OSError):
            self._narrow_to = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2
            self._socket, self.send_buffer = sock, size

    def widen_for(self, size: int) -> bool:
        """A message of ``size`` bytes is about to be written: if it is big, the kernel's
        send buffer is widened until ``narrow`` is called (True: call it)."""
        if size < WIDE_WRITE or not self.send_buffer:
            return False
        self._wide += 1
        if self._wide == 1:
            self._set_send_buffer(self.send_buffer)
        return True

    def narrow(self) -> None:
        self._wide -= 1
        if not self._wide:
            self._set_send_buffer(self._narrow_to)

    def _set_send_buffer(self, size: int) -> None:
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return  # (its descriptor may be another socket's by now)
        with contextlib.suppress(OSError):
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def extra_settings(self) -> dict[int, int]:
        return {}

    def engine_error(self, exc: Exception) -> None:
        """A bug in the receive path: never let it escape into the event loop."""
        _log.error("HTTP/2 engine error", exc_info=exc)
        self.abort(ErrorCode.INTERNAL_ERROR, f"internal error: {exc!r}")

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

    def stream_lost(self, stream: Stream, error: StreamError) -> None:
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
        flags = (Flag.END_STREAM if end else 0) | (0 if rest else Flag.END_HEADERS)
        frames.append(frame_header(len(first), FrameType.HEADERS, flags, stream_id) + first)
        while rest:
            piece, rest = rest[:limit], rest[limit:]
            frames.append(
                frame_header(
                    len(piece), FrameType.CONTINUATION, 0 if rest else Flag.END_HEADERS, stream_id
                )
                + piece
            )
        self.sent_data = True
        self.writelines(frames)

    def reset(self, stream: Stream, code: int) -> None:
        self.write(frame_u32(FrameType.RST_STREAM, stream.id, code))
        self.forget(stream)

    def stream_failed(self, stream: Stream, code: int, why: str) -> None:
        """A stream error: RST_STREAM ``code``; its call ends with INTERNAL ``why``."""
        self.count_reply()
        self.reset(stream, code)
        self.stream_lost(stream, StreamError(Status(Code.INTERNAL, why)))

    def unread_over(self, stream: Stream, per_connection: bool) -> None:
        """The core: messages queued for streams the relay does not read yet went over the
        connection's budget (or the process's): that stream is reset, ENHANCE_YOUR_CALM."""
        where = "on this connection" if per_connection else "in this process"
        limit = self.unread_max if per_connection else _h2.UNREAD_PROCESS_MAX
        why = f"requests held for streams not read yet exceed {limit} bytes {where}"
        HOSTILE.note("unread_requests", self.who(), f"stream {stream.id} reset: {why}")
        self.count_reply()
        self.reset(stream, ErrorCode.ENHANCE_YOUR_CALM)
        self.stream_lost(stream, StreamError(Status(Code.RESOURCE_EXHAUSTED, why)))

    def forget(self, stream: Stream) -> None:
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
        self.write(frame_header(len(payload), FrameType.GOAWAY, 0, 0) + payload)

    def abort(self, code: int, why: str) -> None:
        """A connection error: GOAWAY with ``code`` and close."""
        _log.debug("HTTP/2 connection error %d: %s", code, why)
        if code == ErrorCode.ENHANCE_YOUR_CALM and not self.goaway_sent and not self.closed:
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
            self.write(frame_header(8, FrameType.PING, 0, 0) + b"xdsfast!")
            self._ping_deadline = self.loop.call_later(self.keepalive_timeout, self._ping_timeout)
            wait = self.keepalive_interval
        else:
            wait = max(self.keepalive_interval - idle, 0.01)
        self._keepalive = self.loop.call_later(wait, self._keepalive_tick)

    def _ping_timeout(self) -> None:
        self._ping_deadline = None
        self.goaway(ErrorCode.NO_ERROR, "keepalive ping not answered")
        self.close("keepalive ping not answered (connection dead)")

    # reading

    def on_frame(
        self, view: memoryview, ftype: int, flags: int, sid: int, start: int, end: int
    ) -> None:
        length = end - start
        if self.header_block is not None and (
            ftype != FrameType.CONTINUATION or sid != self.header_stream
        ):
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "expected CONTINUATION")
        if not self.settings_seen and ftype != FrameType.SETTINGS:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "the first frame must be SETTINGS")
        if ftype == FrameType.DATA:
            self.on_data(view, flags, sid, start, end)
        elif ftype == FrameType.HEADERS:
            if sid == 0:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
            pos, stop = start, end
            if flags & Flag.PADDED:
                if length < 1:
                    raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short")
                pad = view[pos]
                pos += 1
                stop -= pad
            if flags & Flag.PRIORITY:
                pos += 5
            if stop < pos:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "padding longer than HEADERS")
            block = bytearray(view[pos:stop])
            self.header_end_stream = bool(flags & Flag.END_STREAM)
            self.header_stream = sid
            if flags & Flag.END_HEADERS:
                self._headers_done(sid, block)
            else:
                self.header_block = block
        elif ftype == FrameType.CONTINUATION:
            if self.header_block is None or sid != self.header_stream:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "unexpected CONTINUATION")
            self.header_block += view[start:end]
            if len(self.header_block) > MAX_HEADER_BLOCK:
                raise H2ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
            if start == end and not flags & Flag.END_HEADERS:
                self.charge("empty CONTINUATION frames")
            if flags & Flag.END_HEADERS:
                block, self.header_block = self.header_block, None
                self._headers_done(sid, block)
        elif ftype == FrameType.SETTINGS:
            self.on_settings(view, flags, sid, start, end)
        elif ftype == FrameType.WINDOW_UPDATE:
            self.on_window_update(view, sid, start, end)
        elif ftype == FrameType.PING:
            if sid != 0:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
            if length != 8:
                raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "PING is not 8 bytes")
            if flags & Flag.ACK:
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
                self.reply(frame_header(8, FrameType.PING, Flag.ACK, 0) + bytes(view[start:end]))
        elif ftype == FrameType.RST_STREAM:
            if sid == 0:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
            if length != 4:
                raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM is not 4 bytes")
            self.check_not_idle(sid, "RST_STREAM")
            stream = self.streams.get(sid)
            if stream is not None:
                self.on_reset(stream, int.from_bytes(view[start:end], "big"))
        elif ftype == FrameType.GOAWAY:
            if sid != 0:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
            if length < 8:
                raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY too short")
            last = int.from_bytes(view[start : start + 4], "big") & 0x7FFFFFFF
            code = int.from_bytes(view[start + 4 : start + 8], "big")
            debug = bytes(view[start + 8 : end]).decode("utf-8", "replace")
            self.on_goaway(last, code, debug)
        elif ftype == FrameType.PRIORITY:
            if sid == 0:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
            if length != 5:
                raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "PRIORITY is not 5 bytes")
            self.charge("PRIORITY frames")
        elif ftype == FrameType.PUSH_PROMISE:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE with push disabled")
        else:  # unknown frame types are ignored (RFC 9113 section 4.1), within the budget
            self.charge("frames of unknown type")

    def check_not_idle(self, sid: int, what: str) -> None:
        own = (sid % 2 == 1) == self.client
        if own:
            if sid > self.last_own_stream():
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, f"{what} on an idle stream")
        elif sid > self.last_peer_stream:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, f"{what} on an idle stream")

    def last_own_stream(self) -> int:
        return 0

    def on_data(self, view: memoryview, flags: int, sid: int, start: int, end: int) -> None:
        """A whole DATA frame (padded ones come this way)."""
        flow = end - start
        pad = 0
        if flags & Flag.PADDED:
            if flow < 1 or view[start] >= flow:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "padding longer than DATA")
            pad = view[start]
            if flow == 1 + pad and not flags & Flag.END_STREAM:  # nothing but padding
                self.charge("empty DATA frames")
        self.start_data(flags, sid, flow)
        self.data_left = 0
        stream = self.data_stream
        if stream is not None and self.data_feed:
            if flags & Flag.PADDED:
                start, end = start + 1, end - pad
            if end > start:
                stream.on_payload(view, start, end)
        self.end_data()

    def on_end_stream(self, stream: Stream) -> None:
        stream.on_end()

    def on_bad_message(self, stream: Stream, status: Status) -> None:
        """A message the stream cannot take (too large, compressed)."""

    def on_settings(self, view: memoryview, flags: int, sid: int, start: int, end: int) -> None:
        if sid != 0:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        self.charge("SETTINGS frames")
        length = end - start
        if flags & Flag.ACK:
            if length:
                raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if length % 6:
            raise H2ConnectionError(
                ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6"
            )
        for pos in range(start, end, 6):
            key = int.from_bytes(view[pos : pos + 2], "big")
            value = int.from_bytes(view[pos + 2 : pos + 6], "big")
            if key == SettingCode.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise H2ConnectionError(
                        ErrorCode.FLOW_CONTROL_ERROR, "initial window too large"
                    )
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise H2ConnectionError(
                            ErrorCode.FLOW_CONTROL_ERROR, "stream window overflow"
                        )
                self._wake_window()
            elif key == SettingCode.MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= MAX_FRAME:
                    raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self.peer_max_frame = value
            elif key == SettingCode.ENABLE_PUSH:
                if value > 1 or (value == 1 and self.client):
                    raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad SETTINGS_ENABLE_PUSH")
            elif key == SettingCode.HEADER_TABLE_SIZE:
                self.encoder.header_table_size = min(value, 4096)
        self.reply(frame_header(0, FrameType.SETTINGS, Flag.ACK, 0))
        if not self.settings_seen:
            self.settings_seen = True
            if not self.ready.done():
                self.ready.set_result(None)

    def on_window_update(self, view: memoryview, sid: int, start: int, end: int) -> None:
        if end - start != 4:
            raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE is not 4 bytes")
        increment = int.from_bytes(view[start:end], "big") & 0x7FFFFFFF
        if sid == 0:
            if increment == 0:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise H2ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "connection window overflow")
        else:
            self.check_not_idle(sid, "WINDOW_UPDATE")
            stream = self.streams.get(sid)
            if stream is None:
                return
            if increment == 0:
                self.stream_failed(stream, ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
                return
            stream.send_window += increment
            if stream.send_window > MAX_WINDOW:
                self.stream_failed(stream, ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
                return
        self._wake_window()

    def _headers_done(self, sid: int, block: bytearray) -> None:
        try:
            headers = self.decoder.decode(bytes(block), raw=True)
        except hpack.OversizedHeaderListError as exc:
            raise H2ConnectionError(
                ErrorCode.ENHANCE_YOUR_CALM, f"header list too large: {exc}"
            ) from None
        except (hpack.HPACKError, IndexError, ValueError) as exc:
            raise H2ConnectionError(
                ErrorCode.COMPRESSION_ERROR, f"bad header block: {exc}"
            ) from None
        self.on_headers(sid, cast(list[tuple[bytes, bytes]], headers), self.header_end_stream)

    def on_headers(self, sid: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        raise NotImplementedError

    def on_reset(self, stream: Stream, code: int) -> None:
        raise NotImplementedError

    def on_goaway(self, last: int, code: int, debug: str) -> None:
        raise NotImplementedError
