# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled HTTP/2 + gRPC framing helpers for the fast engine's hot path.

Mirrors ``_h2_py.py`` function for function.  Every read is checked against
the end of the buffer explicitly, which is why Cython's bounds checks are off.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy

DEF_SMALL = 4096  # messages up to this size go out as one chunk (header + payload)


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


def take_messages(buf, Py_ssize_t max_len):
    """The complete gRPC messages at the start of ``buf`` (5-byte prefix each).

    Returns ``(messages, consumed, error, length)``: ``error`` is 0, 1 (compressed
    flag set) or 2 (a message longer than ``max_len``, whose length is ``length``);
    scanning stops at the first error.  ``length`` is otherwise the declared length
    of the incomplete message that follows, or -1 when fewer than 5 bytes are left.
    """
    cdef Py_buffer view
    cdef const uint8_t* p
    cdef Py_ssize_t end, pos = 0, length
    messages = []
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        p = <const uint8_t*>view.buf
        end = view.len
        while end - pos >= 5:
            if p[pos] != 0:
                return messages, pos, 1, -1
            length = (<Py_ssize_t>p[pos + 1] << 24) | (<Py_ssize_t>p[pos + 2] << 16) \
                | (<Py_ssize_t>p[pos + 3] << 8) | p[pos + 4]
            if length > max_len:
                return messages, pos, 2, length
            if end - pos - 5 < length:
                return messages, pos, 0, length
            messages.append(PyBytes_FromStringAndSize(<const char*>p + pos + 5, length))
            pos += 5 + length
    finally:
        PyBuffer_Release(&view)
    return messages, pos, 0, -1


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
