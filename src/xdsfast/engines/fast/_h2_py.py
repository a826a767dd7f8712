"""Pure-Python twin of ``_h2.pyx``: the same functions and classes, the same results."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Union

from xdsfast._errors import H2ConnectionError
from xdsfast.engines.fast.h2numbers import (
    DEFAULT_FRAME,
    DEFAULT_WINDOW,
    MAX_WINDOW,
    ErrorCode,
    Flag,
    FrameType,
)

if TYPE_CHECKING:
    import asyncio

# The numbers tested per frame, as plain ints: a module global reads about ten
# times faster than an IntEnum member (Python 3.11).
_DATA, _WINDOW_UPDATE = int(FrameType.DATA), int(FrameType.WINDOW_UPDATE)
_END_STREAM, _PADDED = int(Flag.END_STREAM), int(Flag.PADDED)

_SMALL = 4096
PREALLOC_MAX = 64 << 20
PREALLOC_UNREAD = 64 << 10

Buffer = Union[bytes, bytearray, memoryview]


def frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    """The 9-byte frame header."""
    return bytes(
        (
            (length >> 16) & 0xFF,
            (length >> 8) & 0xFF,
            length & 0xFF,
            ftype & 0xFF,
            flags & 0xFF,
            (stream_id >> 24) & 0x7F,
            (stream_id >> 16) & 0xFF,
            (stream_id >> 8) & 0xFF,
            stream_id & 0xFF,
        )
    )


def frame_u32(ftype: int, stream_id: int, value: int) -> bytes:
    """A frame whose payload is one 32-bit number (WINDOW_UPDATE, RST_STREAM)."""
    return frame_header(4, ftype, 0, stream_id) + value.to_bytes(4, "big")


def data_frames(
    data: bytes, offset: int, count: int, stream_id: int, max_frame: int
) -> list[bytes | memoryview]:
    """DATA frames for ``count`` bytes of ``prefix(data) + data`` from ``offset`` on."""
    size = len(data)
    prefix = b"\x00" + size.to_bytes(4, "big")
    count = min(count, size + 5 - offset)
    chunks: list[bytes | memoryview] = []
    view: memoryview | None = None
    while count > 0:
        n = min(count, max_frame)
        head = min(5 - offset if offset < 5 else 0, n)
        start = offset + head - 5
        stop = offset + n - 5
        header = frame_header(n, _DATA, 0, stream_id) + prefix[offset : offset + head]
        if stop - start <= _SMALL:
            chunks.append(header + data[start:stop] if stop > start else header)
        else:
            chunks.append(header)
            if start == 0 and stop == size:
                chunks.append(data)
            else:
                if view is None:
                    view = memoryview(data)
                chunks.append(view[start:stop])
        offset += n
        count -= n
    return chunks


class Through:
    """A message relayed as it arrives (cut-through; see ``_h2.pyx``): its bytes, the gRPC
    prefix first, queued as they come from the source stream until the writer takes them
    as DATA frames for the other side."""

    __slots__ = ("_scan", "arrived", "chunks", "failed", "fed", "head", "length", "offset",
                 "received", "stream", "taken", "until", "writer")  # fmt: skip

    def __init__(self, stream: StreamCore | None, length: int, head: Any, first: bytes) -> None:
        self.stream = stream  # the source, to credit what is taken (None once all is taken)
        self.length = length  # the whole message with its 5-byte prefix
        self.head = head  # the relay's judge (``Head``): it said yes on the head
        self._scan = head.scan  # reads every later byte; raising: the rest is refused
        self.chunks: deque[bytes] = deque((first,))
        self.offset = 0  # bytes of chunks[0] already taken
        self.received = len(first)
        self.taken = 0
        self.failed = False  # the judge refused it on the way: it must not be completed
        self.arrived = 0.0  # perf_counter() when its last byte came
        self.writer: Any = None  # the other side's stream while it waits for bytes
        self.until = 0  # ...and how far it writes
        self.fed = False  # it got bytes in this read (listed in its connection's _fed)

    def __len__(self) -> int:
        return self.length

    @property
    def ready(self) -> int:
        """Bytes received and not taken, up to ``until`` (what the writer may write now)."""
        return min(self.received, self.until) - self.taken

    def _push(self, chunk: bytes) -> None:
        """The next bytes from the source; the judge reads them (raising: ``failed``)."""
        if self.failed:
            return  # (credited with the rest of what the stream holds)
        self.received += len(chunk)
        try:
            self._scan(chunk)
        except Exception:
            self.failed = True
            return
        self.chunks.append(chunk)
        if self.stream is not None:
            self.stream.pinned += len(chunk)
        if self.received == self.length:
            self.arrived = time.perf_counter()

    def frames(self, count: int, stream_id: int, max_frame: int) -> list[bytes]:
        """DATA frames for the next ``count`` bytes (received, not taken); the source is
        credited for them."""
        out: list[bytes] = []
        chunks = self.chunks
        left = count
        while left > 0:
            size = min(left, max_frame)
            header = frame_header(size, _DATA, 0, stream_id)
            chunk = chunks[0]
            if not self.offset and len(chunk) == size:
                out += (header, chunk)
                chunks.popleft()
            else:
                parts = [header]
                need = size
                while need:
                    chunk = chunks[0]
                    piece = chunk[self.offset : self.offset + need]
                    parts.append(piece)
                    need -= len(piece)
                    self.offset += len(piece)
                    if self.offset == len(chunk):
                        chunks.popleft()
                        self.offset = 0
                out.append(b"".join(parts))
            left -= size
        self.taken += count
        source = self.stream
        if source is not None:
            source.pinned -= count
            if not source.messages:
                source._credit_held()
            if self.taken == self.length:
                self.stream = None
        return out


class Assembler:
    """Cuts one stream's gRPC messages out of its DATA payloads (see ``_h2.pyx``)."""

    __slots__ = ("_head", "_judge", "_judged", "_msg", "_need", "_through", "error",
                 "error_length", "max_len", "opener", "prealloc", "through_min")  # fmt: skip

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.prealloc = PREALLOC_MAX  # (the compiled one's allocation policy; unused here)
        self.error = 0
        self.error_length = -1
        self._head = bytearray()  # prefix bytes seen of the current message
        self._msg: bytearray | None = None
        self._need = 0  # body bytes still to come
        # Cut-through: ``opener(length)`` for each message of ``through_min`` bytes or more
        # gives a judge (or None: held whole), fed the head until it says yes or no.
        self.opener: Callable[[int], Any] | None = None
        self.through_min = 1 << 62
        self._judge: Any = None
        self._judged: bytearray | None = None  # the prefix and head the judge has seen
        self._through: Through | None = None

    @property
    def pending(self) -> bool:
        return bool(self._head)

    def release(self) -> None:
        """The stream is gone: no more cut-through (a Through and its stream refer to each
        other, and the judge to the relay)."""
        self.opener = self._judge = self._judged = self._through = None

    def _begin(self) -> bool:
        head = self._head
        if head[0] != 0:
            self.error = 1
            return False
        length = int.from_bytes(head[1:5], "big")
        if length > self.max_len:
            self.error, self.error_length = 2, length
            return False
        self._msg, self._need = bytearray(), length
        if self.opener is not None and length >= self.through_min:
            self._judge = self.opener(length)
            if self._judge is not None:
                self._msg, self._judged = None, bytearray(head)
        return True

    def feed(
        self, buf: Buffer, start: int, end: int, stream: StreamCore | None = None
    ) -> list[Any] | None:
        """Messages completed (bytes) and cut-through ones begun (``Through``), in order."""
        if self.error:
            return None
        out: list[Any] | None = None
        start, end = max(start, 0), min(end, len(buf))
        head = self._head
        while start < end:
            if len(head) < 5:
                if not head and end - start >= 5 and buf[start] == 0:
                    length = int.from_bytes(buf[start + 1 : start + 5], "big")
                    if (
                        length <= self.max_len
                        and end - start - 5 >= length
                        and (self.opener is None or length < self.through_min)
                    ):
                        if out is None:
                            out = []
                        out.append(bytes(buf[start + 5 : start + 5 + length]))
                        start += 5 + length
                        continue
                take = min(5 - len(head), end - start)
                head += buf[start : start + take]
                start += take
                if len(head) < 5:
                    break
                if not self._begin():
                    head.clear()
                    break
            else:
                take = min(self._need, end - start)
                chunk = buf[start : start + take]
                self._need -= take
                start += take
                if self._through is not None:
                    self._through._push(bytes(chunk))
                elif self._judged is not None:
                    begun = self._judge_more(bytes(chunk), stream)
                    if begun is not None:
                        if out is None:
                            out = []
                        out.append(begun)
                else:
                    assert self._msg is not None
                    self._msg += chunk
            if len(head) == 5 and not self._need:
                head.clear()
                if self._through is not None:
                    self._through = None
                    continue
                if out is None:
                    out = []
                out.append(bytes(self._msg or b""))
                self._msg = None
        return out

    def _judge_more(self, chunk: bytes, stream: StreamCore | None) -> Through | None:
        """The judge sees more of the head: a ``Through`` begins, or the message is held
        whole (a refusal, or its end reached undecided), or the head grows."""
        judged = self._judged
        assert judged is not None
        judged += chunk
        verdict = self._judge.feed(chunk)
        if verdict is True:
            through = Through(stream, len(judged) + self._need, self._judge, bytes(judged))
            self._judge = self._judged = None
            if stream is not None:
                stream.pinned += len(judged)
            if not self._need:
                through.arrived = time.perf_counter()
            self._through = through  # (until its last byte: the end of the message)
            return through
        if verdict is False or not self._need:
            self._msg = judged[5:]
            self._judge = self._judged = None
        return None


# -- the receive path (see ``_h2.pyx``: the same state, the same steps) ------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
READ_SIZE = 256 << 10
MESSAGE_COST = 64
UNREAD_MAX = 32 << 20
UNREAD_PROCESS_MAX = 128 << 20
CONTROL_BURST = 1000.0
CONTROL_RATE = 100.0
REPLY_BACKLOG = 1000


class _Unread:
    """UNREAD_PROCESS_MAX's count (see ``_h2.pyx``)."""

    total = 0


def unread_total() -> int:
    """What streams the relay does not read yet hold, all connections together (bytes)."""
    return _Unread.total


class StreamCore:
    """One stream's receive state and its one-frame send path."""

    __slots__ = (
        "_waiter",
        "assembler",
        "closed",
        "conn",
        "credit",
        "ended",
        "error",
        "held",
        "id",
        "messages",
        "pinned",
        "reading",
        "receiving",
        "recv_window",
        "send_window",
        "sendable",
        "sink",
        "unread",
    )

    conn: ConnCore
    id: int
    assembler: Assembler
    messages: deque[bytes]
    held: int
    credit: int
    recv_window: int
    send_window: int
    ended: bool
    closed: bool
    receiving: bool
    error: Any
    sink: Callable[[bytes], bool] | None
    sendable: bool  # the relay may send now (headers out, not half-closed)
    reading: bool  # the relay has started taking its messages
    unread: int  # what its messages cost while it was not read (bytes)
    pinned: int  # held bytes of cut-through messages not yet taken (credited as taken)
    _waiter: asyncio.Future[None] | None

    def __init__(self, conn: ConnCore, stream_id: int, max_recv: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.assembler = Assembler(max_recv)  # cuts gRPC messages out of DATA payloads
        self.assembler.prealloc = PREALLOC_UNREAD  # a hostile prefix costs little
        self.messages = deque()
        self.held = self.credit = 0
        self.recv_window = conn.local_window
        self.send_window = conn.peer_initial_window
        self.ended = self.closed = self.receiving = False
        self.error = self.sink = self._waiter = None
        self.sendable = False  # server: once headers are out; client: until half-closed
        self.reading = False
        self.unread = 0
        self.pinned = 0

    # Called by name; the engine's subclass defines them.
    def bad_message(self, error: int, length: int) -> None:
        raise NotImplementedError

    def sink_failed(self, exc: Exception) -> None:
        raise NotImplementedError

    # (called on a Through's writer: the other side's stream)
    def pump_through(self, through: Through, more: bool) -> bool:
        raise NotImplementedError

    def on_payload(self, buf: Buffer, start: int, end: int) -> None:
        """``buf[start:end]``: DATA payload (any part of a frame; flow control is done)."""
        if self.error is not None or self.closed:
            return
        assembler = self.assembler
        through = assembler._through
        received = 0 if through is None else through.received
        messages = assembler.feed(buf, start, end, self)
        if messages and self.receiving and self.sink is not None and not self.messages:
            messages = self._offer(messages)  # (queued ones, woken for, would be overtaken)
        if messages:
            self.messages.extend(messages)
            self._wake_receiver()
            if not self.reading and self._count_unread(messages):
                return  # over the budget: reset
        elif through is not None and through.received != received and not through.fed:
            through.fed = True  # its writer is pumped (or woken) once, as the read ends
            self.conn._fed.append(through)
        if assembler.error:
            self.bad_message(assembler.error, assembler.error_length)
        elif not messages and not self.messages and self.reading:
            # A message is being reassembled and nothing waits to be taken: let it come
            # (bytes of a cut-through message: once taken).
            self._credit_held()

    def _count_unread(self, messages: list[bytes]) -> bool:
        """Messages queued before the relay reads this stream: within the budgets, or the
        stream is reset (True)."""
        conn = self.conn
        # (a cut-through message costs what it pins, which the windows bound)
        cost = sum(
            (len(message) if type(message) is bytes else 0) + MESSAGE_COST for message in messages
        )
        self.unread += cost
        conn.unread += cost
        _Unread.total += cost
        if conn.unread > conn.unread_max or _Unread.total > UNREAD_PROCESS_MAX:
            conn.unread_over(self, conn.unread > conn.unread_max)
            return True
        return False

    def start_reading(self) -> None:
        """The relay takes this stream's messages from now on (see ``_h2.pyx``)."""
        if self.reading:
            return
        self.reading = True
        self.assembler.prealloc = PREALLOC_MAX
        self._forget_unread()
        if not self.messages:
            self._credit_held()

    def _forget_unread(self) -> None:
        if self.unread:
            self.conn.unread -= self.unread
            _Unread.total -= self.unread
            self.unread = 0

    def _offer(self, messages: list[bytes]) -> list[bytes] | None:
        """Hand messages to the sink in order; those it leaves (from the first) go to recv()."""
        for i, message in enumerate(messages):
            if not self._take(message):
                return messages[i:]
        return None

    def _take(self, message: bytes) -> bool:
        """The sink took ``message``; a bug in the sink: recv() gets it (and all) instead.
        A cut-through message is recv()'s."""
        if type(message) is not bytes:
            return False
        try:
            return bool(self.sink(message))  # type: ignore[misc]
        except Exception as exc:
            self.sink = None
            self.sink_failed(exc)
            return False

    def offer_queued(self) -> None:
        """Hand messages queued for recv() to the sink, in order, until it declines (see
        ``_h2.pyx``)."""
        messages = self.messages
        if not self.reading:
            self.start_reading()
        if not messages or self.sink is None:
            return
        while messages:
            if not self._take(messages[0]):
                return
            messages.popleft()
        self._credit_held()

    def _credit_held(self) -> None:
        """Credit everything held but what cut-through messages still pin (called when the
        queue is empty)."""
        amount = self.held - self.pinned
        if amount > 0:
            self.conn.credit_stream(self, amount)
            self.held = self.pinned

    def _wake_receiver(self) -> None:
        """Wake what waits for this stream (recv(), finished()), if anything does."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def try_send(self, data: bytes) -> bool:
        """The relay's fast path: ``try_write`` if the stream is sendable and not failed."""
        return self.sendable and self.error is None and self.try_write(data)

    def try_write(self, data: bytes) -> bool:
        """Write ``data`` as one DATA frame if the windows are open and the socket keeps up."""
        conn = self.conn
        total = len(data) + 5
        if (
            total <= self.send_window
            and total <= conn.send_window
            and total <= conn.peer_max_frame
            and not conn.write_paused
            and not self.closed
            and not conn.closed
        ):
            self.send_window -= total
            conn.send_window -= total
            conn.sent_data = True
            conn.writelines(data_frames(data, 0, total, self.id, total))
            return True
        return False


class _Batch:
    """Writes held by connections with ``coalesce`` set during a read callback (see
    ``_h2.pyx``): written joined, once, when it ends."""

    depth = 0
    conns: ClassVar[list[ConnCore]] = []


class ConnCore:
    """One connection's receive state: frames found, DATA fed to streams, windows kept."""

    transport: Any
    client: bool
    data_stream: Any  # the engine's StreamCore subclass, or None
    header_block: bytearray | None
    local_window: int
    peer_initial_window: int
    peer_max_frame: int
    send_window: int
    recv_window: int
    recv_frame: int
    conn_window: int

    def __init__(self, client: bool) -> None:
        self.transport = None
        self.client = client
        self.buf = bytearray()  # the start of a frame cut by the end of a read
        self.data_left = 0  # payload bytes of the DATA frame being received still to come
        self.data_stream = None  # its stream (None: unknown or reset)
        self.data_feed = False  # its payload goes to the stream (else: dropped)
        self.data_end_stream = False  # it carries END_STREAM
        self.preface_seen = client  # a server first reads the client's preface
        self.settings_seen = self.closed = self.write_paused = False
        self.streams: dict[int, Any] = {}  # the engine's StreamCore subclass
        # The protocol's initial values, each way, until SETTINGS and WINDOW_UPDATE say more.
        self.local_window = self.peer_initial_window = DEFAULT_WINDOW
        self.recv_frame = self.peer_max_frame = DEFAULT_FRAME
        self.send_window = self.recv_window = self.conn_window = DEFAULT_WINDOW
        self.conn_credit = 0  # connection-level bytes consumed, to credit
        self.header_block = None
        self.last_read = time.monotonic()
        self._window_waiters: list[asyncio.Future[None]] = []
        self._rbuf: bytearray | None = None
        self.coalesce = False  # hold writes made in a read callback, write them joined after
        self._pending: list[Any] | None = None
        self.in_read = False  # inside this connection's read callback
        self.sent_data = False  # DATA or HEADERS written since the peer's last PING
        self.unread = 0  # what streams the relay does not read hold (bytes)
        self.unread_max = UNREAD_MAX
        self.budget = self.control_burst = CONTROL_BURST  # control frames the peer may send
        self.budget_at = 0.0  # ... as of when
        self.control_rate = CONTROL_RATE  # ... added per second
        self.replies_paused = 0  # replies written since the transport paused
        self._fed: list[Through] = []  # Throughs that got bytes in this read

    # Called by name; the engine's subclass defines them.
    def on_frame(
        self, view: memoryview, ftype: int, flags: int, sid: int, start: int, end: int
    ) -> None:
        raise NotImplementedError

    def on_end_stream(self, stream: Any) -> None:
        raise NotImplementedError

    def abort(self, code: int, why: str) -> None:
        raise NotImplementedError

    def engine_error(self, exc: Exception) -> None:
        raise NotImplementedError

    def check_not_idle(self, sid: int, what: str) -> None:
        raise NotImplementedError

    def stream_failed(self, stream: Any, code: int, why: str) -> None:
        raise NotImplementedError

    def _wake_window(self) -> None:
        raise NotImplementedError

    def unread_over(self, stream: Any, per_connection: bool) -> None:
        raise NotImplementedError

    def get_buffer(self, sizehint: int) -> bytearray:
        """asyncio.BufferedProtocol: one read buffer per connection (see ``_h2.pyx``)."""
        if self._rbuf is None:
            self._rbuf = bytearray(READ_SIZE)
        return self._rbuf

    def buffer_updated(self, nbytes: int) -> None:
        rbuf = self._rbuf
        if rbuf is not None and 0 < nbytes <= len(rbuf):
            with memoryview(rbuf) as view, view[:nbytes] as data:
                self.data_received(data)

    def data_received(self, data: Buffer) -> None:
        if self.closed:
            return
        self.last_read = time.monotonic()
        _Batch.depth += 1
        self.in_read = True
        try:
            self._read(data)
        finally:
            self.in_read = False
            _Batch.depth -= 1
            if not _Batch.depth and _Batch.conns:
                held, _Batch.conns = _Batch.conns, []
                for conn in held:
                    conn.flush()

    def _read(self, data: Buffer) -> None:
        try:
            if self.preface_seen:
                self._receive(data)
            else:
                self._receive_preface(data)
            if self._fed:
                self._pump_fed(len(data) >= READ_SIZE)
        except H2ConnectionError as exc:
            self.abort(exc.code, str(exc))
            return
        except Exception as exc:  # a bug: never let it escape into the event loop
            self.engine_error(exc)
            return
        if not self.closed:
            self._maybe_credit_conn()

    def _pump_fed(self, more: bool) -> None:
        """Cut-through messages that got bytes in this read (``more``: it filled the
        buffer): their writers pumped once (see ``_h2.pyx``)."""
        fed, self._fed = self._fed, []
        for through in fed:
            through.fed = False
            source = through.stream
            writer = through.writer
            pumped = writer is not None and writer.pump_through(through, more)
            if not pumped and source is not None:
                source._wake_receiver()

    def _receive_preface(self, data: Buffer) -> None:
        buf = self.buf
        buf += data
        if len(buf) < len(PREFACE):
            if not PREFACE.startswith(buf):
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad connection preface")
            return
        if buf[: len(PREFACE)] != PREFACE:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad connection preface")
        self.preface_seen = True
        rest = bytes(buf[len(PREFACE) :])
        self.buf = bytearray()
        if rest:
            self._receive(rest)

    def _receive(self, data: Buffer) -> None:
        """Frames out of ``data``, read where it lies (see ``_h2.pyx``)."""
        pos, size = 0, len(data)
        while pos < size and not self.closed:
            left = self.data_left
            if left:  # inside a DATA frame: its payload goes straight to the stream
                stop = pos + left if left < size - pos else size
                self.data_left = left - (stop - pos)
                stream = self.data_stream
                if stream is not None and self.data_feed:
                    stream.on_payload(data, pos, stop)
                pos = stop
                if not self.data_left:
                    self.end_data()
                continue
            if self.buf:
                pos = self._fill_pending(data, pos, size)
                continue
            while size - pos >= 9:
                length = (data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2]
                if length > self.recv_frame:
                    raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes")
                if size - pos - 9 < length:
                    break
                sid = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                self._frame(data, data[pos + 3], data[pos + 4], sid, pos + 9, pos + 9 + length)
                pos += 9 + length
                if self.closed:
                    return
            if pos < size:  # a frame cut by the end of this read
                if size - pos >= 9 and data[pos + 3] == _DATA and not data[pos + 4] & _PADDED:
                    length = (data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2]
                    sid = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                    self.start_data(data[pos + 4], sid, length)
                    pos += 9
                else:
                    self.buf += memoryview(data)[pos:]
                    pos = size

    def _fill_pending(self, data: Buffer, pos: int, size: int) -> int:
        """Complete the frame in ``self.buf`` from ``data[pos:]``; dispatch it once whole
        (an unpadded DATA frame starts streaming as soon as its header is whole)."""
        buf = self.buf
        have = len(buf)
        if have < 9:
            take = min(9 - have, size - pos)
            buf += memoryview(data)[pos : pos + take]
            pos += take
            if len(buf) < 9:
                return pos
        length = (buf[0] << 16) | (buf[1] << 8) | buf[2]
        if length > self.recv_frame:
            raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes")
        if len(buf) == 9 and buf[3] == _DATA and not buf[4] & _PADDED:
            sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            flags = buf[4]
            buf.clear()
            self.start_data(flags, sid, length)
            if not length:
                self.end_data()
            return pos
        take = min(9 + length - len(buf), size - pos)
        buf += memoryview(data)[pos : pos + take]
        pos += take
        if len(buf) == 9 + length:
            self.buf = bytearray()
            sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            self._frame(buf, buf[3], buf[4], sid, 9, 9 + length)
        return pos

    def _frame(self, data: Buffer, ftype: int, flags: int, sid: int, start: int, end: int) -> None:
        """One whole frame, ``data[start:end]`` its payload: DATA and WINDOW_UPDATE here,
        the rest (and their rare cases) in ``on_frame``."""
        length = end - start
        if ftype == _DATA and not flags & _PADDED:
            stream = self.streams.get(sid)
            if (
                stream is not None
                and length <= self.recv_window
                and length <= stream.recv_window
                and stream.error is None
                and not stream.ended
                and not stream.closed
                and self.header_block is None
            ):  # the common case: a whole frame for a live stream
                self.recv_window -= length
                stream.recv_window -= length
                stream.held += length  # credited (stream and connection) once taken
                if length:
                    stream.on_payload(data, start, end)
                elif not flags & _END_STREAM:
                    self.charge("empty DATA frames")
                if flags & _END_STREAM:
                    self.on_end_stream(stream)
                return
            self.start_data(flags, sid, length)
            self.data_left = 0
            stream = self.data_stream
            if stream is not None and self.data_feed and end > start:
                stream.on_payload(data, start, end)
            self.end_data()
            return
        if ftype == _WINDOW_UPDATE and length == 4 and self.header_block is None:
            increment = int.from_bytes(data[start:end], "big") & 0x7FFFFFFF
            if increment and self.settings_seen:
                target: ConnCore | StreamCore | None = self if sid == 0 else self.streams.get(sid)
                if target is not None and target.send_window + increment <= MAX_WINDOW:
                    target.send_window += increment
                    if self._window_waiters:
                        self._wake_window()
                    return
        view = memoryview(data)
        try:
            self.on_frame(view, ftype, flags, sid, start, end)
        finally:
            view.release()

    def start_data(self, flags: int, sid: int, length: int) -> None:
        """A DATA frame's header: flow control for all of it; its payload follows."""
        if self.header_block is not None:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "expected CONTINUATION")
        if not self.settings_seen:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "the first frame must be SETTINGS")
        if sid == 0:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        self.recv_window -= length
        if self.recv_window < 0:
            raise H2ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "connection window exceeded")
        if not length and not flags & _END_STREAM:
            self.charge("empty DATA frames")
        self.data_left = length
        self.data_end_stream = bool(flags & _END_STREAM)
        self.data_feed = False
        stream = self.data_stream = self.streams.get(sid)
        if stream is None:
            self.conn_credit += length  # dropped: the connection's share comes back at once
            self.check_not_idle(sid, "DATA")
            self.reply(frame_u32(FrameType.RST_STREAM, sid, ErrorCode.STREAM_CLOSED))
            return
        if stream.ended:
            self.conn_credit += length
            self.data_stream = None
            self.stream_failed(stream, ErrorCode.STREAM_CLOSED, "DATA after END_STREAM")
            return
        stream.recv_window -= length
        if stream.recv_window < 0:
            self.conn_credit += length
            self.data_stream = None
            self.stream_failed(stream, ErrorCode.FLOW_CONTROL_ERROR, "flow control error")
            return
        if stream.error is not None or stream.closed:  # not wanted any more: credit at once
            self.credit_stream(stream, length)
            return
        stream.held += length
        self.data_feed = True

    def end_data(self) -> None:
        """The DATA frame's last byte arrived."""
        stream = self.data_stream
        self.data_stream = None
        if stream is not None and self.data_end_stream:
            self.on_end_stream(stream)

    def credit_stream(self, stream: StreamCore, amount: int) -> None:
        """The relay consumed ``amount`` bytes of ``stream``: let the peer send more, on
        the stream and on the connection."""
        stream.credit += amount
        if stream.credit >= self.local_window // 4 and not stream.ended and not stream.closed:
            self.write(frame_u32(_WINDOW_UPDATE, stream.id, stream.credit))
            stream.recv_window += stream.credit
            stream.credit = 0
        self.conn_credit += amount
        if not self.in_read:  # (a read credits the connection once, as it ends)
            self._maybe_credit_conn()

    def release_stream(self, stream: StreamCore) -> None:
        """``stream`` leaves the connection: what it held goes back to the connection's
        window and what it cost leaves the unread budgets."""
        stream._forget_unread()
        stream.assembler.release()
        if stream.held:
            self.conn_credit += stream.held
            stream.held = 0
            if not self.in_read:
                self._maybe_credit_conn()

    def _maybe_credit_conn(self) -> None:
        """Credit the connection in batches of a quarter of its window; at once when the
        peer has less than that left (streams the relay does not read hold the rest)."""
        if (
            self.conn_credit
            and not self.closed
            and (
                self.conn_credit >= self.conn_window // 4
                or self.recv_window < self.conn_window // 4
            )
        ):
            self._credit_conn()

    def _credit_conn(self) -> None:
        credit, self.conn_credit = self.conn_credit, 0
        self.recv_window += credit
        self.write(frame_u32(_WINDOW_UPDATE, 0, credit))

    def charge(self, what: str) -> None:
        """The peer sent one of ``what``: spend one from the control-frame budget; past it,
        a connection error (see ``_h2.pyx``)."""
        budget = self.budget + (self.last_read - self.budget_at) * self.control_rate
        self.budget_at = self.last_read
        self.budget = min(budget, self.control_burst) - 1
        if self.budget < 0:
            raise H2ConnectionError(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"flood of {what}: over {self.control_burst:.0f} control frames at once "
                f"or {self.control_rate:.0f} a second",
            )

    def count_reply(self) -> None:
        """Replies written while the peer does not read (the transport paused writing) are
        counted; past ``REPLY_BACKLOG``, a connection error."""
        if self.write_paused:
            self.replies_paused += 1
            if self.replies_paused > REPLY_BACKLOG:
                raise H2ConnectionError(
                    ErrorCode.ENHANCE_YOUR_CALM,
                    f"the peer does not read: over {REPLY_BACKLOG} replies to its frames queued",
                )

    def reply(self, data: bytes) -> None:
        """Write a reply to the peer's frame (counted: ``count_reply``)."""
        self.count_reply()
        self.write(data)

    def write(self, data: bytes) -> None:
        self.writelines([data])

    def writelines(self, chunks: list[Any]) -> None:
        if self.transport is None or self.closed:
            return
        if not (self.coalesce and _Batch.depth):
            self.transport.writelines(chunks)
            return
        if self._pending is None:
            self._pending = []
            _Batch.conns.append(self)
        self._pending.extend(chunks)

    def flush(self) -> None:
        """Write what this connection holds now (before closing it, say)."""
        pending, self._pending = self._pending, None
        if pending is not None and self.transport is not None and not self.closed:
            try:
                self.transport.write(b"".join(pending))
            except Exception as exc:  # a bug: never let it escape into the event loop
                self.engine_error(exc)
