# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled peeker: reads the few top-level fields the relay routes on from
protobuf wire bytes, without decoding the message.

Mirrors ``_core_py.py`` rule for rule.  Every read is checked against the end
of the buffer explicitly (``_varint`` and the length checks in ``_scan``), which
is why Cython's own bounds checks are off.  Fields, constants, the inline helpers
and every cdef signature are declared in ``_core.pxd``.
"""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp

from xdsfast._errors import WireError

cdef uint8_t REQUEST[16]
cdef uint8_t RESPONSE[16]
cdef uint8_t DELTA_REQUEST[16]
cdef uint8_t DELTA_RESPONSE[16]


cdef void _fill(uint8_t* table, tuple actions):
    cdef int i
    for i in range(16):
        table[i] = actions[i] if i < len(actions) else 0


_fill(REQUEST, (0, A_STR | 0, A_HAS | 0, A_CNT | 0, A_STR | 1, A_STR | 2, A_HAS | 1))
_fill(RESPONSE, (0, A_STR | 0, A_CNT | 0, 0, A_STR | 1, A_STR | 2))
_fill(DELTA_REQUEST, (0, A_HAS | 0, A_STR | 1, A_CNT | 0, A_CNT | 1, 0, A_STR | 2, A_HAS | 1))
_fill(DELTA_RESPONSE, (0, A_STR | 0, A_CNT | 0, 0, A_STR | 1, A_STR | 2, A_CNT | 1))


# Error codes (E_*, _core.pxd) as WireError messages.
_MESSAGES = {
    E_VARINT_TRUNCATED: "truncated varint",
    E_VARINT_LONG: "varint longer than 10 bytes",
    E_TAG_RANGE: "tag out of range",
    E_FIELD_ZERO: "field number 0",
    E_LENGTH: "length past the end of the message",
    E_PAST_END: "field past the end of the message",
    E_DEPTH: "groups nested too deeply",
    E_GROUP: "unbalanced group",
    E_UNTERMINATED: "unterminated group",
}


cdef int _scan(const uint8_t* buf, Py_ssize_t end, const uint8_t* table,
               Scan* s, int* bad_wire_type) noexcept nogil:
    cdef Py_ssize_t pos = 0
    cdef uint64_t tag, value
    cdef uint32_t field
    cdef int wire_type, err, depth = 0
    cdef uint32_t groups[MAX_DEPTH]
    cdef uint8_t action, slot
    cdef int i
    for i in range(3):
        s.start[i] = -1
        s.length[i] = 0
    s.count[0] = s.count[1] = 0
    s.has[0] = s.has[1] = False
    while pos < end:
        # Tags of the fields that matter are one byte; longer ones take the slow path.
        if buf[pos] < 0x80:
            tag = buf[pos]
            pos += 1
        else:
            err = _varint(buf, &pos, end, &tag)
            if err:
                return err
        if tag > 0xFFFFFFFFu:
            return E_TAG_RANGE
        field = <uint32_t>(tag >> 3)
        wire_type = <int>(tag & 7)
        if field == 0:
            return E_FIELD_ZERO
        if wire_type == 0:
            err = _varint(buf, &pos, end, &value)
            if err:
                return err
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            # Lengths below 16 KiB (nearly all resources) fit in one or two bytes.
            if pos + 1 < end and buf[pos] < 0x80:
                value = buf[pos]
                pos += 1
            elif pos + 2 < end and buf[pos + 1] < 0x80:
                value = (buf[pos] & 0x7F) | (<uint64_t>buf[pos + 1] << 7)
                pos += 2
            else:
                err = _varint(buf, &pos, end, &value)
                if err:
                    return err
            if value > <uint64_t>(end - pos):
                return E_LENGTH
            if depth == 0 and field < 16:
                action = table[field]
                if action:
                    slot = action & 0x0F
                    if (action & 0xF0) == A_STR:
                        s.start[slot] = pos
                        s.length[slot] = <Py_ssize_t>value
                    elif (action & 0xF0) == A_CNT:
                        s.count[slot] += 1 + _run(buf, pos + <Py_ssize_t>value, end,
                                                  <uint8_t>tag, &pos)
                        continue
                    else:
                        s.has[slot] = True
            pos += <Py_ssize_t>value
        elif wire_type == 3:
            if depth >= MAX_DEPTH:
                return E_DEPTH
            groups[depth] = field
            depth += 1
        elif wire_type == 4:
            if depth == 0 or groups[depth - 1] != field:
                return E_GROUP
            depth -= 1
        else:
            bad_wire_type[0] = wire_type
            return E_WIRE_TYPE
        if pos > end:
            return E_PAST_END
    if depth:
        return E_UNTERMINATED
    return E_OK


cdef object _raise(int err, int wire_type):
    if err == E_WIRE_TYPE:
        raise WireError(f"invalid wire type {wire_type}")
    raise WireError(_MESSAGES[err])


# type_url values repeat endlessly (a mesh has about ten): reuse the str.
cdef list _type_urls = []


cdef str _type_url(const uint8_t* buf, Scan* s, int slot):
    cdef Py_ssize_t start = s.start[slot], length = s.length[slot]
    cdef bytes raw
    cdef str text
    cdef tuple entry
    if start < 0 or length == 0:
        return ""
    for entry in _type_urls:
        raw = <bytes>entry[0]
        if (PyBytes_GET_SIZE(raw) == length
                and memcmp(PyBytes_AS_STRING(raw), buf + start, length) == 0):
            return <str>entry[1]
    text = _string(buf, s, slot)
    if len(_type_urls) < TYPE_URL_CACHE:
        _type_urls.append((text.encode("utf-8"), text))
    return text


cdef str _string(const uint8_t* buf, Scan* s, int slot):
    cdef Py_ssize_t start = s.start[slot]
    if start < 0 or s.length[slot] == 0:
        return ""
    try:
        return PyUnicode_DecodeUTF8(<const char*>buf + start, s.length[slot], NULL)
    except UnicodeDecodeError:
        raise WireError("string field is not valid UTF-8") from None


cdef class RequestPeek:
    """What the relay needs of an ``envoy.service.discovery.v3.DiscoveryRequest``."""

    def __init__(self, str type_url, str version_info, str response_nonce,
                 bint has_node, bint has_error_detail, Py_ssize_t resource_name_count):
        self.type_url = type_url
        self.version_info = version_info
        self.response_nonce = response_nonce
        self.has_node = has_node
        self.has_error_detail = has_error_detail
        self.resource_name_count = resource_name_count

    def __repr__(self):
        return (
            f"RequestPeek(type_url={self.type_url!r}, version_info={self.version_info!r}, "
            f"response_nonce={self.response_nonce!r}, has_node={self.has_node}, "
            f"has_error_detail={self.has_error_detail}, "
            f"resource_name_count={self.resource_name_count})"
        )


cdef class ResponsePeek:
    """What the relay needs of an ``envoy.service.discovery.v3.DiscoveryResponse``."""

    def __init__(self, str type_url, str version_info, str nonce, Py_ssize_t resource_count):
        self.type_url = type_url
        self.version_info = version_info
        self.nonce = nonce
        self.resource_count = resource_count

    def __repr__(self):
        return (
            f"ResponsePeek(type_url={self.type_url!r}, version_info={self.version_info!r}, "
            f"nonce={self.nonce!r}, resource_count={self.resource_count})"
        )


cdef class DeltaRequestPeek:
    """What the relay needs of an ``envoy.service.discovery.v3.DeltaDiscoveryRequest``."""

    def __init__(self, str type_url, str response_nonce, bint has_node,
                 bint has_error_detail, Py_ssize_t subscribe_count,
                 Py_ssize_t unsubscribe_count):
        self.type_url = type_url
        self.response_nonce = response_nonce
        self.has_node = has_node
        self.has_error_detail = has_error_detail
        self.subscribe_count = subscribe_count
        self.unsubscribe_count = unsubscribe_count

    def __repr__(self):
        return (
            f"DeltaRequestPeek(type_url={self.type_url!r}, "
            f"response_nonce={self.response_nonce!r}, has_node={self.has_node}, "
            f"has_error_detail={self.has_error_detail}, "
            f"subscribe_count={self.subscribe_count}, "
            f"unsubscribe_count={self.unsubscribe_count})"
        )


cdef class DeltaResponsePeek:
    """What the relay needs of an ``envoy.service.discovery.v3.DeltaDiscoveryResponse``.

    ``removed_count`` counts ``removed_resources`` (field 6).
    """

    def __init__(self, str type_url, str system_version_info, str nonce,
                 Py_ssize_t resource_count, Py_ssize_t removed_count):
        self.type_url = type_url
        self.system_version_info = system_version_info
        self.nonce = nonce
        self.resource_count = resource_count
        self.removed_count = removed_count

    def __repr__(self):
        return (
            f"DeltaResponsePeek(type_url={self.type_url!r}, "
            f"system_version_info={self.system_version_info!r}, nonce={self.nonce!r}, "
            f"resource_count={self.resource_count}, removed_count={self.removed_count})"
        )


cdef RequestPeek _requestpeek(const uint8_t* buf, Scan* s):
    cdef RequestPeek r = RequestPeek.__new__(RequestPeek)
    r.type_url = _type_url(buf, s, 1)
    r.version_info = _string(buf, s, 0)
    r.response_nonce = _string(buf, s, 2)
    r.has_node = s.has[0]
    r.has_error_detail = s.has[1]
    r.resource_name_count = s.count[0]
    return r


cdef ResponsePeek _responsepeek(const uint8_t* buf, Scan* s):
    cdef ResponsePeek r = ResponsePeek.__new__(ResponsePeek)
    r.type_url = _type_url(buf, s, 1)
    r.version_info = _string(buf, s, 0)
    r.nonce = _string(buf, s, 2)
    r.resource_count = s.count[0]
    return r


cdef DeltaRequestPeek _deltarequestpeek(const uint8_t* buf, Scan* s):
    cdef DeltaRequestPeek r = DeltaRequestPeek.__new__(DeltaRequestPeek)
    r.type_url = _type_url(buf, s, 1)
    r.response_nonce = _string(buf, s, 2)
    r.has_node = s.has[0]
    r.has_error_detail = s.has[1]
    r.subscribe_count = s.count[0]
    r.unsubscribe_count = s.count[1]
    return r


cdef DeltaResponsePeek _deltaresponsepeek(const uint8_t* buf, Scan* s):
    cdef DeltaResponsePeek r = DeltaResponsePeek.__new__(DeltaResponsePeek)
    r.type_url = _type_url(buf, s, 1)
    r.system_version_info = _string(buf, s, 0)
    r.nonce = _string(buf, s, 2)
    r.resource_count = s.count[0]
    r.removed_count = s.count[1]
    return r


cdef object _build(Kind kind, const uint8_t* buf, Scan* s):
    if kind == K_REQUEST:
        return _requestpeek(buf, s)
    if kind == K_RESPONSE:
        return _responsepeek(buf, s)
    if kind == K_DELTA_REQUEST:
        return _deltarequestpeek(buf, s)
    return _deltaresponsepeek(buf, s)


cdef object _peek(object data, const uint8_t* table, Kind kind):
    """Borrow the bytes, scan them with the message kind's table, build the result."""
    cdef Py_buffer view
    cdef Scan s
    cdef int err, wt = 0
    cdef const uint8_t* buf
    if type(data) is bytes:  # the common case: no buffer-protocol round trip
        buf = <const uint8_t*>PyBytes_AS_STRING(data)
        err = _scan(buf, PyBytes_GET_SIZE(data), table, &s, &wt)
        if err:
            _raise(err, wt)
        return _build(kind, buf, &s)
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        buf = <const uint8_t*>view.buf
        err = _scan(buf, view.len, table, &s, &wt)
        if err:
            _raise(err, wt)
        return _build(kind, buf, &s)
    finally:
        PyBuffer_Release(&view)


def peek_request(data):
    """Peek a SotW ``DiscoveryRequest``; raise :class:`WireError` if malformed."""
    return _peek(data, REQUEST, K_REQUEST)


def peek_response(data):
    """Peek a SotW ``DiscoveryResponse``; raise :class:`WireError` if malformed."""
    return _peek(data, RESPONSE, K_RESPONSE)


def peek_delta_request(data):
    """Peek a ``DeltaDiscoveryRequest``; raise :class:`WireError` if malformed."""
    return _peek(data, DELTA_REQUEST, K_DELTA_REQUEST)


def peek_delta_response(data):
    """Peek a ``DeltaDiscoveryResponse``; raise :class:`WireError` if malformed."""
    return _peek(data, DELTA_RESPONSE, K_DELTA_RESPONSE)
