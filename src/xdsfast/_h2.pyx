# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled HTTP/2 + gRPC framing helpers for the fast engine's hot path.

Mirrors ``_h2_py.py`` function for function.  Every read is checked against
the end of the buffer explicitly, which is why Cython's bounds checks are off.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy

DEF_SMALL = 4096  # messages up to this size go out as one chunk (header + payload)
PREALLOC_MAX = 64 << 20  # a message's buffer is allocated whole at its prefix up to this size


cdef inline void _put_header(uint8_t* out, Py_ssize_t length, int ftype, int flags,
                             uint32_t stream_id):
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


def scan_frames(buf, Py_ssize_t pos, Py_ssize_t max_size):
    """The complete frames in ``buf[pos:]``.

    Returns ``(frames, pos, oversized)``: each frame is ``(type, flags, stream_id,
    payload_start, payload_end)``; ``pos`` is where the first incomplete frame starts;
    ``oversized`` is the length of a frame over ``max_size`` (scanning stops there), or -1.
    """
    cdef Py_buffer view
    cdef const uint8_t* p
    cdef Py_ssize_t end, length
    cdef uint32_t sid
    frames = []
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        p = <const uint8_t*>view.buf
        end = view.len
        if pos < 0:
            pos = 0
        while end - pos >= 9:
            length = (<Py_ssize_t>p[pos] << 16) | (<Py_ssize_t>p[pos + 1] << 8) | p[pos + 2]
            if length > max_size:
                return frames, pos, length
            if end - pos - 9 < length:
                break
            sid = ((<uint32_t>(p[pos + 5] & 0x7F)) << 24) | (<uint32_t>p[pos + 6] << 16) \
                | (<uint32_t>p[pos + 7] << 8) | p[pos + 8]
            frames.append((p[pos + 3], p[pos + 4], sid, pos + 9, pos + 9 + length))
            pos += 9 + length
    finally:
        PyBuffer_Release(&view)
    return frames, pos, -1


def data_frames(bytes data, Py_ssize_t offset, Py_ssize_t count, uint32_t stream_id,
                Py_ssize_t max_frame):
    """Chunks for ``transport.writelines``: DATA frames carrying ``count`` bytes of the
    gRPC message ``prefix(data) + data`` from ``offset`` on, at most ``max_frame`` each.

    Frame headers (and the 5-byte prefix) are fresh bytes; payload is ``data`` itself
    or memoryview slices of it, so a large message is never copied.  Small ones
    go out as one chunk.
    """
    cdef Py_ssize_t size = PyBytes_GET_SIZE_(data)
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
            _put_header(out, n, 0, 0, stream_id)
            _prefix(out + 9, offset, head, size)
            if stop > start:
                memcpy(out + 9 + head, src + start, stop - start)
            chunks.append(chunk)
        else:
            chunk = PyBytes_FromStringAndSize(NULL, 9 + head)
            out = <uint8_t*>PyBytes_AS_STRING(chunk)
            _put_header(out, n, 0, 0, stream_id)
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


cdef inline Py_ssize_t PyBytes_GET_SIZE_(bytes data):
    return len(data)


cdef inline void _prefix(uint8_t* out, Py_ssize_t offset, Py_ssize_t head, Py_ssize_t size):
    cdef uint8_t prefix[5]
    cdef Py_ssize_t i
    prefix[0] = 0
    prefix[1] = (size >> 24) & 0xFF
    prefix[2] = (size >> 16) & 0xFF
    prefix[3] = (size >> 8) & 0xFF
    prefix[4] = size & 0xFF
    for i in range(head):
        out[i] = prefix[offset + i]


cdef class Assembler:
    """Cuts one stream's gRPC messages out of its DATA payloads, as they arrive.

    ``feed(buf, start, end)`` takes ``buf[start:end]`` (any part of any frame) and
    returns the messages it completed, or None.  A message whose prefix has been seen
    is copied once, straight into the ``bytes`` object that is handed out (allocated
    whole from the prefix's length; above ``PREALLOC_MAX`` it grows as bytes arrive
    and is copied once more at the end).  A message that lies whole inside ``buf`` is
    cut out with one copy too.  On a bad prefix, ``error`` becomes 1 (compressed) or 2
    (longer than ``max_len``; its length in ``error_length``) and feeding stops.
    """

    cdef readonly Py_ssize_t max_len
    cdef public int error
    cdef public Py_ssize_t error_length
    cdef uint8_t head[5]
    cdef Py_ssize_t head_len  # prefix bytes seen of the current message
    cdef object msg  # bytes being filled, or bytearray (huge), or None
    cdef Py_ssize_t msg_len, msg_pos

    def __init__(self, Py_ssize_t max_len):
        self.max_len = max_len
        self.error = 0
        self.error_length = -1
        self.head_len = 0
        self.msg = None

    @property
    def pending(self):
        """Inside a message (its prefix started, its last byte not yet seen)."""
        return self.head_len > 0

    cdef int _begin(self, const uint8_t* h) except -1:
        cdef Py_ssize_t length
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
        if length <= PREALLOC_MAX:
            self.msg = PyBytes_FromStringAndSize(NULL, length)
        else:
            self.msg = bytearray()
        return 1

    def feed(self, buf, Py_ssize_t start, Py_ssize_t end):
        cdef Py_buffer view
        cdef const uint8_t* p
        cdef Py_ssize_t length, take
        cdef list out = None
        cdef object msg
        if self.error:
            return None
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            p = <const uint8_t*>view.buf
            if end > view.len:
                end = view.len
            if start < 0:
                start = 0
            while start < end:
                if self.head_len == 0:
                    if end - start >= 5:
                        if p[start] == 0:
                            length = (<Py_ssize_t>p[start + 1] << 24) \
                                | (<Py_ssize_t>p[start + 2] << 16) \
                                | (<Py_ssize_t>p[start + 3] << 8) | p[start + 4]
                            if length <= self.max_len and end - start - 5 >= length:
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
                else:
                    take = self.msg_len - self.msg_pos
                    if take > end - start:
                        take = end - start
                    if take:
                        if type(self.msg) is bytes:
                            memcpy(PyBytes_AS_STRING(self.msg) + self.msg_pos, p + start, take)
                        else:
                            PyByteArray_Resize(self.msg, self.msg_pos + take)
                            memcpy(PyByteArray_AS_STRING(self.msg) + self.msg_pos, p + start,
                                   take)
                        self.msg_pos += take
                        start += take
                if self.head_len == 5 and self.msg_pos == self.msg_len:
                    msg = self.msg
                    if type(msg) is not bytes:
                        msg = bytes(msg)
                    if out is None:
                        out = []
                    out.append(msg)
                    self.msg = None
                    self.head_len = 0
        finally:
            PyBuffer_Release(&view)
        return out
