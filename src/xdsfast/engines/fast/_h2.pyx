# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The fast engine's hot path, compiled: HTTP/2 + gRPC framing helpers and the per-read
path (``ConnCore``/``StreamCore``: frames, windows, reassembly, the relay's sink).

Mirrors ``_h2_py.py`` function for function and class for class.  Every read is checked against
the end of the buffer explicitly, which is why Cython's bounds checks are off.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport (
    PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_GET_SIZE,
    PyByteArray_Resize,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport uint8_t, uint32_t
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.string cimport memcpy
from cpython.dict cimport PyDict_GetItem
from cpython.ref cimport PyObject

from xdsfast._clock cimport monotonic
from xdsfast.engines.fast.h2numbers cimport (
    DEFAULT_FRAME, DEFAULT_WINDOW, MAX_WINDOW, ErrorCode, Flag, FrameType,
)

from collections import deque

from xdsfast._errors import H2ConnectionError

cdef extern from "Python.h":
    int _PyBytes_Resize(PyObject** string, Py_ssize_t newsize) except -1

# Sizes the per-message path reads are C constants (no module-dict look-up); a cpdef enum's
# names are module attributes too, plain ints, for the engine and the tests.
cdef enum:
    DEF_SMALL = 4096  # messages up to this size go out as one chunk (header + payload)
cpdef enum:
    PREALLOC_MAX = 64 << 20  # a message's buffer is allocated whole at its prefix up to this
    PREALLOC_UNREAD = 64 << 10  # the same for a stream the relay does not read yet


cdef inline void _put_header(uint8_t* out, Py_ssize_t length, int ftype, int flags,
                             uint32_t stream_id) noexcept:
    out[0] = (length >> 16) & 0xFF
    out[1] = (length >> 8) & 0xFF
    out[2] = length & 0xFF
    out[3] = ftype
    out[4] = flags
    out[5] = (stream_id >> 24) & 0x7F
    out[6] = (stream_id >> 16) & 0xFF
    out[7] = (stream_id >> 8) & 0xFF
    out[8] = stream_id & 0xFF


def frame_header(Py_ssize_t length, int ftype, int flags, uint32_t stream_id):
    """The 9-byte frame header."""
    out = PyBytes_FromStringAndSize(NULL, 9)
    _put_header(<uint8_t*>PyBytes_AS_STRING(out), length, ftype, flags, stream_id)
    return out


def data_frames(bytes data not None, Py_ssize_t offset, Py_ssize_t count, uint32_t stream_id,
                Py_ssize_t max_frame):
    """Chunks for ``transport.writelines``: DATA frames carrying ``count`` bytes of the
    gRPC message ``prefix(data) + data`` from ``offset`` on, at most ``max_frame`` each.

    Frame headers (and the 5-byte prefix) are fresh bytes; payload is ``data`` itself
    or memoryview slices of it, so a large message is never copied.  Small ones
    go out as one chunk.
    """
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t total = size + 5
    cdef Py_ssize_t n, head, start, stop
    cdef uint8_t* out
    cdef const char* src = PyBytes_AS_STRING(data)
    chunks = []
    view = None
    if count > total - offset:
        count = total - offset
    while count > 0:
        n = count if count < max_frame else max_frame
        head = 5 - offset if offset < 5 else 0
        if head > n:
            head = n
        start = offset + head - 5  # payload bytes of data in this frame: [start, stop)
        stop = offset + n - 5
        if stop - start <= DEF_SMALL:
            chunk = PyBytes_FromStringAndSize(NULL, 9 + n)
            out = <uint8_t*>PyBytes_AS_STRING(chunk)
            _put_header(out, n, FrameType.DATA, 0, stream_id)
            _prefix(out + 9, offset, head, size)
            if stop > start:
                memcpy(out + 9 + head, src + start, stop - start)
            chunks.append(chunk)
        else:
            chunk = PyBytes_FromStringAndSize(NULL, 9 + head)
            out = <uint8_t*>PyBytes_AS_STRING(chunk)
            _put_header(out, n, FrameType.DATA, 0, stream_id)
            _prefix(out + 9, offset, head, size)
            chunks.append(chunk)
            if start == 0 and stop == size:
                chunks.append(data)
            else:
                if view is None:
                    view = memoryview(data)
                chunks.append(view[start:stop])
        offset += n
        count -= n
    return chunks


cdef inline void _prefix(uint8_t* out, Py_ssize_t offset, Py_ssize_t head,
                         Py_ssize_t size) noexcept:
    cdef uint8_t prefix[5]
    cdef Py_ssize_t i
    prefix[0] = 0
    prefix[1] = (size >> 24) & 0xFF
    prefix[2] = (size >> 16) & 0xFF
    prefix[3] = (size >> 8) & 0xFF
    prefix[4] = size & 0xFF
    for i in range(head):
        out[i] = prefix[offset + i]


cdef class Through:
    """A message relayed as it arrives (cut-through): its bytes, the gRPC prefix first,
    queued as they come from the source stream until the writer takes them as DATA frames
    for the other side.  What is queued is pinned: the source's window credits it only
    once taken (``frames``), so a slow writer holds at most the source's windows.  Every
    byte after the head goes to the judge's ``scan`` (a compiled call, not a Python frame
    per DATA frame); if it raises, the Through is ``failed``, what comes after is dropped,
    and the writer stops."""

    def __init__(self, StreamCore stream, Py_ssize_t length, head, bytes first not None):
        self.stream = stream
        self.length = length
        self.head = head
        self._scan = head.scan
        self.chunks = deque((first,))
        self.offset = 0
        self.received = PyBytes_GET_SIZE(first)
        self.taken = 0
        self.failed = False
        self.arrived = 0.0
        self.writer = None
        self.until = 0
        self.fed = False

    def __len__(self):
        return self.length

    @property
    def ready(self):
        """Bytes received and not taken, up to ``until`` (what the writer may write now)."""
        return (self.received if self.received < self.until else self.until) - self.taken

    cdef int _push(self, const uint8_t* p, Py_ssize_t n) except -1:
        """The next ``n`` bytes from the source."""
        if self.failed:
            return 0  # (credited with the rest of what the stream holds)
        self.received += n
        chunk = PyBytes_FromStringAndSize(<const char*>p, n)
        try:
            self._scan(chunk)
        except Exception:
            self.failed = True
            return 0
        self.chunks.append(chunk)
        if self.stream is not None:
            self.stream.pinned += n
        if self.received == self.length:
            self.arrived = monotonic()
        return 0

    def frames(self, Py_ssize_t count, uint32_t stream_id, Py_ssize_t max_frame):
        """DATA frames for the next ``count`` bytes (received, not taken): a chunk that is
        one frame goes out as it is, behind its header; other frames are built whole.  The
        source is credited for them."""
        cdef list out = []
        cdef object chunks = self.chunks
        cdef Py_ssize_t left = count, size, need, clen, piece
        cdef bytes chunk, frame
        cdef uint8_t* o
        cdef StreamCore source
        while left > 0:
            size = left if left < max_frame else max_frame
            chunk = <bytes>chunks[0]
            if self.offset == 0 and PyBytes_GET_SIZE(chunk) == size:
                frame = PyBytes_FromStringAndSize(NULL, 9)
                _put_header(<uint8_t*>PyBytes_AS_STRING(frame), size, FrameType.DATA, 0,
                            stream_id)
                out.append(frame)
                out.append(chunk)
                chunks.popleft()
            else:
                frame = PyBytes_FromStringAndSize(NULL, 9 + size)
                o = <uint8_t*>PyBytes_AS_STRING(frame)
                _put_header(o, size, FrameType.DATA, 0, stream_id)
                o += 9
                need = size
                while need:
                    chunk = <bytes>chunks[0]
                    clen = PyBytes_GET_SIZE(chunk)
                    piece = clen - self.offset
                    if piece > need:
                        piece = need
                    memcpy(o, PyBytes_AS_STRING(chunk) + self.offset, piece)
                    o += piece
                    need -= piece
                    self.offset += piece
                    if self.offset == clen:
                        chunks.popleft()
                        self.offset = 0
                out.append(frame)
            left -= size
        self.taken += count
        source = self.stream
        if source is not None:
            source.pinned -= count
            if not source.messages:
                StreamCore._credit_held(source)
            if self.taken == self.length:
                self.stream = None
        return out


cdef class Assembler:
    """Cuts one stream's gRPC messages out of its DATA payloads, as they arrive.

    ``feed(buf, start, end)`` takes ``buf[start:end]`` (any part of any frame) and
    returns the messages it completed, or None.  A message whose prefix has been seen
    is copied once, straight into the ``bytes`` object that is handed out: allocated
    whole from the prefix's length up to ``prealloc`` bytes; a longer one starts at
    ``prealloc`` and doubles as bytes arrive, never past the declared length (resized in
    place, so no copy at the end: a 100 MB push costs 1x, not 2x).  So a prefix whose
    bytes never come costs at most ``prealloc``.  A message that lies whole inside
    ``buf`` is cut out with one copy too.  On a bad prefix, ``error`` becomes 1
    (compressed) or 2 (longer than ``max_len``; its length in ``error_length``) and
    feeding stops.
    """

    def __init__(self, Py_ssize_t max_len):
        self.max_len = max_len
        self.prealloc = PREALLOC_MAX
        self.error = 0
        self.error_length = -1
        self.head_len = 0
        self.msg = None
        self.opener = None
        self.through_min = PY_SSIZE_T_MAX
        self._judge = self._judged = self._through = None

    @property
    def pending(self):
        """Inside a message (its prefix started, its last byte not yet seen)."""
        return self.head_len > 0

    def release(self):
        """The stream is gone: no more cut-through (a Through and its stream refer to each
        other, and the judge to the relay)."""
        self.opener = self._judge = self._judged = self._through = None

    cdef int _begin(self, const uint8_t* h) except -1:
        cdef Py_ssize_t length, first
        if h[0] != 0:
            self.error = 1
            return 0
        length = (<Py_ssize_t>h[1] << 24) | (<Py_ssize_t>h[2] << 16) \
            | (<Py_ssize_t>h[3] << 8) | h[4]
        if length > self.max_len:
            self.error = 2
            self.error_length = length
            return 0
        self.msg_len = length
        self.msg_pos = 0
        if self.opener is not None and length >= self.through_min:
            self._judge = self.opener(length)
            if self._judge is not None:
                self._judged = PyByteArray_FromStringAndSize(<const char*>h, 5)
                return 1
        first = length if length <= self.prealloc else self.prealloc
        if first < 1 and length:
            first = 1  # (a size-0 bytes is a shared singleton: never resized)
        self.msg = PyBytes_FromStringAndSize(NULL, first)
        self.msg_cap = first
        return 1

    cdef int _grow(self, Py_ssize_t need) except -1:
        """Room for ``need`` bytes: double, up to the declared length (in place if it can)."""
        cdef Py_ssize_t cap = self.msg_cap * 2
        cdef PyObject* raw
        if cap < need:
            cap = need
        if cap > self.msg_len:
            cap = self.msg_len
        raw = <PyObject*>self.msg
        Py_INCREF(<object>raw)  # ours; the attribute's goes next, so it is the only one
        self.msg = None
        _PyBytes_Resize(&raw, cap)  # on failure: freed, NULL, MemoryError raised
        self.msg = <object>raw  # the attribute's reference...
        Py_DECREF(<object>raw)  # ...and ours dropped
        self.msg_cap = cap
        return 0

    def feed(self, buf, Py_ssize_t start, Py_ssize_t end, StreamCore stream=None):
        """Messages completed (bytes) and cut-through ones begun (``Through``), in order."""
        cdef Py_buffer view
        if self.error:
            return None
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            return self._feed(<const uint8_t*>view.buf, max(start, 0), min(end, view.len),
                              stream)
        finally:
            PyBuffer_Release(&view)

    cdef list _feed(self, const uint8_t* p, Py_ssize_t start, Py_ssize_t end,
                    StreamCore stream):
        """``feed`` on a buffer already pinned by the caller (``start``/``end`` in range)."""
        cdef Py_ssize_t length, take
        cdef list out = None
        cdef object msg
        cdef Through begun
        if self.error:
            return None
        while start < end:
            if self.head_len == 0:
                if end - start >= 5:
                    if p[start] == 0:
                        length = (<Py_ssize_t>p[start + 1] << 24) \
                            | (<Py_ssize_t>p[start + 2] << 16) \
                            | (<Py_ssize_t>p[start + 3] << 8) | p[start + 4]
                        if length <= self.max_len and end - start - 5 >= length and (
                                self.opener is None or length < self.through_min):
                            # the whole message is here: one copy
                            if out is None:
                                out = []
                            out.append(PyBytes_FromStringAndSize(
                                <const char*>p + start + 5, length))
                            start += 5 + length
                            continue
                    memcpy(self.head, p + start, 5)
                    self.head_len = 5
                    start += 5
                else:
                    take = end - start
                    memcpy(self.head, p + start, take)
                    self.head_len = take
                    start = end
                    break
                if not self._begin(self.head):
                    self.head_len = 0
                    break
            elif self.head_len < 5:
                take = 5 - self.head_len
                if take > end - start:
                    take = end - start
                memcpy(self.head + self.head_len, p + start, take)
                self.head_len += take
                start += take
                if self.head_len < 5:
                    break
                if not self._begin(self.head):
                    self.head_len = 0
                    break
            elif self.msg is None:  # cut-through: judged, or relayed as it comes
                take = self.msg_len - self.msg_pos
                if take > end - start:
                    take = end - start
                self.msg_pos += take
                if self._through is not None:
                    self._through._push(p + start, take)
                else:
                    begun = self._judge_more(p + start, take, stream)
                    if begun is not None:
                        if out is None:
                            out = []
                        out.append(begun)
                start += take
            else:
                take = self.msg_len - self.msg_pos
                if take > end - start:
                    take = end - start
                if take:
                    if self.msg_pos + take > self.msg_cap:
                        self._grow(self.msg_pos + take)
                    memcpy(PyBytes_AS_STRING(self.msg) + self.msg_pos, p + start, take)
                    self.msg_pos += take
                    start += take
            if self.head_len == 5 and self.msg_pos == self.msg_len:
                if self._through is not None:
                    self._through = None
                    self.head_len = 0
                    continue
                msg = self.msg
                if out is None:
                    out = []
                out.append(msg)
                self.msg = None
                self.head_len = 0
        return out

    cdef Through _judge_more(self, const uint8_t* p, Py_ssize_t n, StreamCore stream):
        """The judge sees ``n`` more bytes of the head: a ``Through`` begins (returned),
        or the message is held whole (a refusal, or its end reached undecided), or the
        head grows."""
        cdef Py_ssize_t had = PyByteArray_GET_SIZE(self._judged)
        cdef Py_ssize_t body
        cdef Through through
        PyByteArray_Resize(self._judged, had + n)
        memcpy(PyByteArray_AS_STRING(self._judged) + had, p, n)
        verdict = self._judge.feed(PyBytes_FromStringAndSize(<const char*>p, n))
        if verdict is True:
            through = Through(stream, self.msg_len + 5, self._judge, bytes(self._judged))
            self._judge = self._judged = None
            if stream is not None:
                stream.pinned += through.received
            if through.received == through.length:
                through.arrived = monotonic()
            self._through = through  # (until its last byte: the end of the message)
            return through
        if verdict is False or self.msg_pos == self.msg_len:
            body = had + n - 5
            self.msg = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(self._judged) + 5, body)
            self.msg_cap = body
            self._judge = self._judged = None
        return None


# -- the receive path: frames to messages to the relay's sink, in C --------------------------
#
# ``StreamCore`` and ``ConnCore`` hold the state the per-read path touches (windows, the
# reassembler, the DATA frame being received) and run that path without a Python-level
# call per frame.  The engine subclasses them (``protocol.py``) with everything that
# is not per read: headers, settings, pings, GOAWAY, errors.  The callbacks the core makes
# by name on the subclass, and its fields and C signatures, are declared in ``_h2.pxd``.
#
# Hostile peers.  Memory: a stream's data is credited back to the peer, for the stream and
# for the connection, only once the relay has taken it (or it belongs to a message being
# reassembled for a stream the relay reads), so what the relay does not read stays within
# the windows; what streams the relay does not read yet hold (messages, with their
# overhead) is bounded per connection (``UNREAD_MAX``) and per process
# (``UNREAD_PROCESS_MAX``): past either, the stream is reset (ENHANCE_YOUR_CALM).
# CPU and output: PING, SETTINGS, PRIORITY, empty DATA/CONTINUATION and unknown frames
# spend a budget that refills over time (``CONTROL_BURST``, ``CONTROL_RATE``); replies to
# the peer's frames (PING and SETTINGS ACKs, resets) are counted while the peer does not
# read (the transport paused writing), up to ``REPLY_BACKLOG``.  Past either: a connection
# error, ENHANCE_YOUR_CALM.

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
cpdef enum:
    READ_SIZE = 256 << 10  # the connection's read buffer (uvloop's own read size)
    MESSAGE_COST = 64  # what a queued message costs besides its bytes (object, queue slot)
    # Messages held for streams the relay does not read yet, per connection: twice its
    # window (16 MiB, which bounds their bytes), so only the overhead of tiny messages
    # reaches it...
    UNREAD_MAX = 32 << 20
    REPLY_BACKLOG = 1000  # replies to the peer's frames queued while it does not read
# ...and all connections together (a Python int, read only for streams not read yet: a test
# lowers it)
UNREAD_PROCESS_MAX = 128 << 20
CONTROL_BURST = 1000.0  # PING, SETTINGS, empty and unknown frames a peer may send at once...
CONTROL_RATE = 100.0  # ...and per second after that (both per connection, at its start)

cdef Py_ssize_t _unread_total = 0  # UNREAD_PROCESS_MAX's count


def unread_total():
    """What streams the relay does not read yet hold, all connections together (bytes)."""
    return _unread_total


cdef inline uint32_t _u31(const uint8_t* p) noexcept:
    return ((<uint32_t>(p[0] & 0x7F)) << 24) | (<uint32_t>p[1] << 16) \
        | (<uint32_t>p[2] << 8) | p[3]


cdef inline Py_ssize_t _u24(const uint8_t* p) noexcept:
    return (<Py_ssize_t>p[0] << 16) | (<Py_ssize_t>p[1] << 8) | p[2]


cpdef bytes frame_u32(int ftype, uint32_t stream_id, uint32_t value):
    """A frame whose payload is one 32-bit number (WINDOW_UPDATE, RST_STREAM)."""
    out = PyBytes_FromStringAndSize(NULL, 13)
    cdef uint8_t* o = <uint8_t*>PyBytes_AS_STRING(out)
    _put_header(o, 4, ftype, 0, stream_id)
    o[9] = (value >> 24) & 0xFF
    o[10] = (value >> 16) & 0xFF
    o[11] = (value >> 8) & 0xFF
    o[12] = value & 0xFF
    return out


cdef inline StreamCore _stream_of(dict streams, uint32_t sid):
    cdef PyObject* found = PyDict_GetItem(streams, sid)
    if found == NULL:
        return None
    return <StreamCore>found


# Over TLS each transport write is its own SSL_write and record (~9k instructions in
# OpenSSL 3).  A connection with ``coalesce`` set holds the writes made during a read
# callback (the relay forwarding each ACK that read carried) and writes them joined, once,
# when the callback ends.  In plaintext it is not set: there it measured slower.
cdef Py_ssize_t _batch_depth = 0
cdef list _batched = []  # the connections holding writes in this batch


cdef class StreamCore:
    """One stream's receive state and its one-frame send path."""

    def __init__(self, ConnCore conn, uint32_t stream_id, Py_ssize_t max_recv):
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

    def on_payload(self, buf, Py_ssize_t start, Py_ssize_t end):
        """``buf[start:end]``: DATA payload (any part of a frame; flow control is done)."""
        cdef Py_buffer view
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            self._payload(<const uint8_t*>view.buf, max(start, 0), min(end, view.len))
        finally:
            PyBuffer_Release(&view)

    cdef int _payload(self, const uint8_t* p, Py_ssize_t start, Py_ssize_t end) except -1:
        cdef list messages
        cdef Assembler assembler = self.assembler
        cdef Through through = assembler._through
        cdef Py_ssize_t received = 0
        if self.error is not None or self.closed:
            return 0
        if through is not None:
            received = through.received
        messages = assembler._feed(p, start, end, self)
        if messages is not None and self.receiving and self.sink is not None \
                and not self.messages:
            messages = self._offer(messages)  # (queued ones, woken for, would be overtaken)
        if messages:
            self.messages.extend(messages)
            StreamCore._wake_receiver(self)
            if not self.reading and self._count_unread(messages):
                return 0  # over the budget: reset
        elif through is not None and through.received != received and not through.fed:
            through.fed = True  # its writer is pumped (or woken) once, as the read ends
            self.conn._fed.append(through)
        if assembler.error:
            self.bad_message(assembler.error, assembler.error_length)
        elif not messages and not self.messages and self.reading:
            # A message is being reassembled and nothing waits to be taken: let it come
            # (bytes of a cut-through message: once taken).
            StreamCore._credit_held(self)
        return 0

    cdef bint _count_unread(self, list messages) except -1:
        """Messages queued before the relay reads this stream: within the budgets, or the
        stream is reset (True)."""
        global _unread_total
        cdef ConnCore conn = self.conn
        cdef Py_ssize_t cost = 0
        for message in messages:  # (a cut-through message costs what it pins: the windows)
            cost += (PyBytes_GET_SIZE(message) if type(message) is bytes else 0) + MESSAGE_COST
        self.unread += cost
        conn.unread += cost
        _unread_total += cost
        if conn.unread > conn.unread_max or _unread_total > UNREAD_PROCESS_MAX:
            conn.unread_over(self, conn.unread > conn.unread_max)
            return True
        return False

    cpdef int start_reading(self) except -1:
        """The relay takes this stream's messages from now on: what they cost leaves the
        budgets, a message being reassembled may come (``_credit_held``), and the next
        one is allocated whole at its prefix."""
        if self.reading:
            return 0
        self.reading = True
        self.assembler.prealloc = PREALLOC_MAX
        self._forget_unread()
        if not self.messages:
            StreamCore._credit_held(self)
        return 0

    cdef void _forget_unread(self) noexcept:
        global _unread_total
        if self.unread:
            self.conn.unread -= self.unread
            _unread_total -= self.unread
            self.unread = 0

    cdef list _offer(self, list messages):
        """Hand messages to the sink in order; those it leaves (from the first) go to recv()."""
        cdef Py_ssize_t i
        for i in range(len(messages)):
            if not self._take(messages[i]):
                return messages[i:] if i else messages
        return None

    cdef bint _take(self, message) except -1:
        """The sink took ``message``; a bug in the sink: recv() gets it (and all) instead.
        A cut-through message is recv()'s."""
        if type(message) is not bytes:
            return False
        try:
            return self.sink(message)
        except Exception as exc:
            self.sink = None
            self.sink_failed(exc)
            return False

    def offer_queued(self):
        """Hand messages queued for recv() to the sink, in order, until it declines: once
        the relay's slow path has sent the one that had to wait, those queued behind it go
        on from here, not one task step each."""
        cdef object messages = self.messages
        if not self.reading:
            StreamCore.start_reading(self)
        if not messages or self.sink is None:
            return
        while messages:
            if not self._take(messages[0]):
                return
            messages.popleft()
        StreamCore._credit_held(self)

    cpdef int _credit_held(self) except -1:
        """Credit everything held but what cut-through messages still pin (called when the
        queue is empty)."""
        cdef Py_ssize_t amount = self.held - self.pinned
        if amount > 0:
            ConnCore.credit_stream(self.conn, self, amount)
            self.held = self.pinned
        return 0

    cpdef int _wake_receiver(self) except -1:
        """Wake what waits for this stream (recv(), finished()), if anything does."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def try_send(self, bytes data):
        """The relay's fast path: ``try_write`` if the stream is sendable and not failed."""
        return self.sendable and self.error is None and StreamCore.try_write(self, data)

    cpdef bint try_write(self, bytes data) except -1:
        """Write ``data`` as one DATA frame if the windows are open and the socket keeps up."""
        cdef ConnCore conn = self.conn
        cdef Py_ssize_t size = len(data)
        cdef Py_ssize_t total = size + 5
        cdef uint8_t* out
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
            if size <= DEF_SMALL:
                chunk = PyBytes_FromStringAndSize(NULL, 9 + total)
                out = <uint8_t*>PyBytes_AS_STRING(chunk)
                _put_header(out, total, FrameType.DATA, 0, self.id)
                _prefix(out + 9, 0, 5, size)
                memcpy(out + 14, PyBytes_AS_STRING(data), size)
                ConnCore.write(conn, chunk)
            else:
                ConnCore.writelines(conn, data_frames(data, 0, total, self.id, total))
            return True
        return False


cdef class ConnCore:
    """One connection's receive state: frames found, DATA fed to streams, windows kept."""

    def __init__(self, bint client):
        self.transport = None
        self.client = client
        self.buf = bytearray()
        self.data_left = 0
        self.data_stream = None
        self.data_feed = self.data_end_stream = False
        self.preface_seen = client  # a server first reads the client's preface
        self.settings_seen = self.closed = self.write_paused = False
        self.streams = {}
        # The protocol's initial values, each way, until SETTINGS and WINDOW_UPDATE say more.
        self.local_window = self.peer_initial_window = DEFAULT_WINDOW
        self.recv_frame = self.peer_max_frame = DEFAULT_FRAME
        self.send_window = self.recv_window = self.conn_window = DEFAULT_WINDOW
        self.conn_credit = 0
        self.header_block = None
        self.last_read = monotonic()
        self._window_waiters = []
        self._rbuf = None
        self.coalesce = False
        self._pending = None
        self.in_read = self.sent_data = False
        self.unread = 0
        self.unread_max = UNREAD_MAX
        self.budget = self.control_burst = CONTROL_BURST
        self.budget_at = 0.0
        self.control_rate = CONTROL_RATE
        self.replies_paused = 0
        self._fed = []

    def get_buffer(self, Py_ssize_t sizehint):
        """asyncio.BufferedProtocol: reads land in one buffer per connection, parsed where
        they lie, so no bytes object per read (and, over TLS, no join of decrypted chunks)."""
        if self._rbuf is None:
            self._rbuf = PyByteArray_FromStringAndSize(NULL, READ_SIZE)
        return self._rbuf

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef bytearray rbuf = self._rbuf
        if rbuf is not None and 0 < nbytes <= len(rbuf):
            self._on_read(rbuf, <const uint8_t*>PyByteArray_AS_STRING(rbuf), nbytes)

    def data_received(self, data):
        self._on_read(data, NULL, 0)

    cdef int _on_read(self, object data, const uint8_t* p, Py_ssize_t size) except -1:
        """One read: all of ``data`` (``p`` NULL), or ``p[:size]``, the start of ``data``."""
        global _batch_depth, _batched
        cdef list held
        if self.closed:
            return 0
        self.last_read = monotonic()
        _batch_depth += 1
        self.in_read = True
        try:
            self._read(data, p, size)
        finally:
            self.in_read = False
            _batch_depth -= 1
            if not _batch_depth and _batched:
                held, _batched = _batched, []
                for conn in held:
                    ConnCore.flush(<ConnCore>conn)
        return 0

    cdef int _read(self, object data, const uint8_t* p, Py_ssize_t size) except -1:
        try:
            if not self.preface_seen:  # once per connection
                self._receive_preface(data if p == NULL else <object>PyBytes_FromStringAndSize(
                    <const char*>p, size))
            elif p == NULL:
                self._receive(data)
            else:
                self._receive_buf(data, p, size)
            if self._fed:
                self._pump_fed(p != NULL and size >= READ_SIZE)
        except H2ConnectionError as exc:
            self.abort(exc.code, str(exc))
            return 0
        except Exception as exc:  # a bug: never let it escape into the event loop
            self.engine_error(exc)
            return 0
        if not self.closed:
            self._maybe_credit_conn()
        return 0

    cdef int _pump_fed(self, bint more) except -1:
        """Cut-through messages that got bytes in this read: while the writer waits for
        bytes, what fits goes out from here, with no task switch (once a read at most;
        while reads fill the buffer, ``more``, once enough has gathered); the writer is
        woken when it is done or must wait for the windows."""
        cdef list fed = self._fed
        cdef Through through
        cdef StreamCore source
        self._fed = []
        for through in fed:
            through.fed = False
            source = through.stream
            writer = through.writer
            if (writer is None or not writer.pump_through(through, more)) \
                    and source is not None:
                StreamCore._wake_receiver(source)
        return 0

    cdef int _receive_preface(self, data) except -1:
        cdef bytearray buf = self.buf
        cdef Py_ssize_t n = len(PREFACE)
        buf += data
        if len(buf) < n:
            if not PREFACE.startswith(buf):
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad connection preface")
            return 0
        if buf[:n] != PREFACE:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "bad connection preface")
        self.preface_seen = True
        rest = bytes(buf[n:])
        self.buf = bytearray()
        if rest:
            self._receive(rest)
        return 0

    cdef int _receive(self, data) except -1:
        """Frames out of ``data``, read where it lies: only a frame cut by the end of a
        read is kept in ``self.buf``; a DATA frame's payload goes to its stream as it
        arrives, however the frame is cut."""
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._receive_buf(data, <const uint8_t*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return 0

    cdef int _receive_buf(self, object data, const uint8_t* p, Py_ssize_t size) except -1:
        cdef Py_ssize_t pos = 0, left, stop, length
        cdef StreamCore stream
        while pos < size and not self.closed:
            left = self.data_left
            if left:  # inside a DATA frame: its payload goes straight to the stream
                stop = pos + left if left < size - pos else size
                self.data_left = left - (stop - pos)
                stream = self.data_stream
                if stream is not None and self.data_feed:
                    stream._payload(p, pos, stop)
                pos = stop
                if not self.data_left:
                    ConnCore.end_data(self)
                continue
            if len(self.buf):
                pos = self._fill_pending(p, pos, size)
                continue
            while size - pos >= 9:
                length = _u24(p + pos)
                if length > self.recv_frame:
                    raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes")
                if size - pos - 9 < length:
                    break
                self._frame(data, p, p[pos + 3], p[pos + 4], _u31(p + pos + 5), pos + 9,
                            pos + 9 + length)
                pos += 9 + length
                if self.closed:
                    return 0
            if pos < size:  # a frame cut by the end of this read
                if size - pos >= 9 and p[pos + 3] == FrameType.DATA \
                        and not p[pos + 4] & Flag.PADDED:
                    ConnCore.start_data(self, p[pos + 4], _u31(p + pos + 5), _u24(p + pos))
                    pos += 9
                else:
                    _append(self.buf, p + pos, size - pos)
                    pos = size
        return 0

    cdef Py_ssize_t _fill_pending(self, const uint8_t* p, Py_ssize_t pos,
                                  Py_ssize_t size) except -1:
        """Complete the frame in ``self.buf`` from ``p[pos:size]``; dispatch it once whole
        (an unpadded DATA frame starts streaming as soon as its header is whole)."""
        cdef bytearray buf = self.buf
        cdef Py_ssize_t have = len(buf), take, length
        cdef const uint8_t* b
        cdef int flags
        if have < 9:
            take = min(9 - have, size - pos)
            _append(buf, p + pos, take)
            pos += take
            if len(buf) < 9:
                return pos
        b = <const uint8_t*>PyByteArray_AS_STRING(buf)
        length = _u24(b)
        if length > self.recv_frame:
            raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes")
        if len(buf) == 9 and b[3] == FrameType.DATA and not b[4] & Flag.PADDED:
            flags = b[4]
            sid = _u31(b + 5)
            PyByteArray_Resize(buf, 0)
            ConnCore.start_data(self, flags, sid, length)
            if not length:
                ConnCore.end_data(self)
            return pos
        take = min(9 + length - len(buf), size - pos)
        _append(buf, p + pos, take)
        pos += take
        if len(buf) == 9 + length:
            self.buf = bytearray()
            b = <const uint8_t*>PyByteArray_AS_STRING(buf)
            self._frame(buf, b, b[3], b[4], _u31(b + 5), 9, 9 + length)
        return pos

    cdef int _frame(self, object data, const uint8_t* p, int ftype, int flags, uint32_t sid,
                    Py_ssize_t start, Py_ssize_t end) except -1:
        """One whole frame, ``p[start:end]`` its payload: DATA and WINDOW_UPDATE here,
        the rest (and their rare cases) in ``on_frame``."""
        cdef Py_ssize_t length = end - start, increment
        cdef StreamCore stream
        if ftype == FrameType.DATA and not flags & Flag.PADDED:
            stream = _stream_of(self.streams, sid)
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
                    stream._payload(p, start, end)
                elif not flags & Flag.END_STREAM:
                    ConnCore.charge(self, "empty DATA frames")
                if flags & Flag.END_STREAM:
                    self.on_end_stream(stream)
                return 0
            ConnCore.start_data(self, flags, sid, length)
            self.data_left = 0
            stream = self.data_stream
            if stream is not None and self.data_feed and end > start:
                stream._payload(p, start, end)
            ConnCore.end_data(self)
            return 0
        if ftype == FrameType.WINDOW_UPDATE and length == 4 and self.header_block is None \
                and self.settings_seen:
            increment = _u31(p + start)
            if increment:
                if sid == 0:
                    if self.send_window + increment <= MAX_WINDOW:
                        self.send_window += increment
                        if self._window_waiters:
                            self._wake_window()
                        return 0
                else:
                    stream = _stream_of(self.streams, sid)
                    if stream is not None and stream.send_window + increment <= MAX_WINDOW:
                        stream.send_window += increment
                        if self._window_waiters:
                            self._wake_window()
                        return 0
        view = memoryview(data)
        try:
            self.on_frame(view, ftype, flags, sid, start, end)
        finally:
            view.release()
        return 0

    cpdef int start_data(self, int flags, uint32_t sid, Py_ssize_t length) except -1:
        """A DATA frame's header: flow control for all of it; its payload follows."""
        cdef StreamCore stream
        if self.header_block is not None:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "expected CONTINUATION")
        if not self.settings_seen:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "the first frame must be SETTINGS")
        if sid == 0:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        self.recv_window -= length
        if self.recv_window < 0:
            raise H2ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "connection window exceeded")
        if not length and not flags & Flag.END_STREAM:
            ConnCore.charge(self, "empty DATA frames")
        self.data_left = length
        self.data_end_stream = flags & Flag.END_STREAM
        self.data_feed = False
        stream = self.data_stream = _stream_of(self.streams, sid)
        if stream is None:
            self.conn_credit += length  # dropped: the connection's share comes back at once
            self.check_not_idle(sid, "DATA")
            ConnCore.reply(self, frame_u32(FrameType.RST_STREAM, sid, ErrorCode.STREAM_CLOSED))
            return 0
        if stream.ended:
            self.conn_credit += length
            self.data_stream = None
            self.stream_failed(stream, ErrorCode.STREAM_CLOSED, "DATA after END_STREAM")
            return 0
        stream.recv_window -= length
        if stream.recv_window < 0:
            self.conn_credit += length
            self.data_stream = None
            self.stream_failed(stream, ErrorCode.FLOW_CONTROL_ERROR, "flow control error")
            return 0
        if stream.error is not None or stream.closed:  # not wanted any more: credit at once
            ConnCore.credit_stream(self, stream, length)
            return 0
        stream.held += length
        self.data_feed = True
        return 0

    cpdef int end_data(self) except -1:
        """The DATA frame's last byte arrived."""
        stream = self.data_stream
        self.data_stream = None
        if stream is not None and self.data_end_stream:
            self.on_end_stream(stream)
        return 0

    cpdef int credit_stream(self, StreamCore stream, Py_ssize_t amount) except -1:
        """The relay consumed ``amount`` bytes of ``stream``: let the peer send more, on
        the stream and on the connection."""
        stream.credit += amount
        if stream.credit >= self.local_window // 4 and not stream.ended and not stream.closed:
            ConnCore.write(self, frame_u32(FrameType.WINDOW_UPDATE, stream.id,
                                           <uint32_t>stream.credit))
            stream.recv_window += stream.credit
            stream.credit = 0
        self.conn_credit += amount
        if not self.in_read:  # (a read credits the connection once, as it ends)
            self._maybe_credit_conn()
        return 0

    def release_stream(self, StreamCore stream):
        """``stream`` leaves the connection: what it held goes back to the connection's
        window and what it cost leaves the unread budgets."""
        stream._forget_unread()
        stream.assembler.release()
        if stream.held:
            self.conn_credit += stream.held
            stream.held = 0
            if not self.in_read:
                self._maybe_credit_conn()

    cdef int _maybe_credit_conn(self) except -1:
        """Credit the connection in batches of a quarter of its window; at once when the
        peer has less than that left (streams the relay does not read hold the rest)."""
        if self.conn_credit and not self.closed and (
            self.conn_credit >= self.conn_window // 4
            or self.recv_window < self.conn_window // 4
        ):
            self._credit_conn()
        return 0

    cdef int _credit_conn(self) except -1:
        cdef Py_ssize_t credit = self.conn_credit
        self.conn_credit = 0
        self.recv_window += credit
        ConnCore.write(self, frame_u32(FrameType.WINDOW_UPDATE, 0, <uint32_t>credit))
        return 0

    cpdef int charge(self, str what) except -1:
        """The peer sent one of ``what`` (PING, SETTINGS, an empty or unknown frame): spend
        one from the control-frame budget; past it, a connection error."""
        cdef double budget = self.budget + (self.last_read - self.budget_at) * self.control_rate
        if budget > self.control_burst:
            budget = self.control_burst
        self.budget_at = self.last_read
        self.budget = budget - 1
        if self.budget < 0:
            raise H2ConnectionError(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"flood of {what}: over {self.control_burst:.0f} control frames at once "
                f"or {self.control_rate:.0f} a second",
            )
        return 0

    cpdef int count_reply(self) except -1:
        """A reply to the peer's frame is about to be written: replies written while the
        peer does not read (the transport paused writing) are counted; past
        ``REPLY_BACKLOG``, a connection error."""
        if self.write_paused:
            self.replies_paused += 1
            if self.replies_paused > REPLY_BACKLOG:
                raise H2ConnectionError(
                    ErrorCode.ENHANCE_YOUR_CALM,
                    f"the peer does not read: over {REPLY_BACKLOG} replies to its frames queued",
                )
        return 0

    cpdef int reply(self, data) except -1:
        """Write a reply to the peer's frame (counted: ``count_reply``)."""
        ConnCore.count_reply(self)
        return self._out(data, False)

    cpdef int write(self, data) except -1:
        return self._out(data, False)

    cpdef int writelines(self, list chunks) except -1:
        return self._out(chunks, True)

    cdef int _out(self, data, bint many) except -1:
        """Write ``data`` (a list of chunks if ``many``) now, or hold it: ``coalesce`` set
        and inside a read callback."""
        cdef list held
        if self.transport is None or self.closed:
            return 0
        if self.coalesce and _batch_depth:
            if self._pending is None:
                self._pending = []
                _batched.append(self)
            held = self._pending
            if many:
                held.extend(data)
            else:
                held.append(data)
        elif many:
            self.transport.writelines(data)
        else:
            self.transport.write(data)
        return 0

    cpdef int flush(self) except -1:
        """Write what this connection holds now (before closing it, say)."""
        cdef list pending = self._pending
        if pending is None:
            return 0
        self._pending = None
        if self.transport is not None and not self.closed:
            try:
                self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
            except Exception as exc:  # a bug: never let it escape into the event loop
                self.engine_error(exc)
        return 0


cdef inline int _append(bytearray buf, const uint8_t* p, Py_ssize_t n) except -1:
    cdef Py_ssize_t have = len(buf)
    if n > 0:
        PyByteArray_Resize(buf, have + n)
        memcpy(PyByteArray_AS_STRING(buf) + have, p, n)
    return 0
