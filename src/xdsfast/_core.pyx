# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled peeker: reads the few top-level fields the relay routes on from
protobuf wire bytes, without decoding the message; ``ResponseScanner`` does the
same for a response fed chunk by chunk, never holding it.

Mirrors ``_core_py.py`` rule for rule.  Every read is checked against the end
of the buffer explicitly (``_varint`` and the length checks in ``_scan``), which
is why Cython's own bounds checks are off.  Fields, constants, the inline helpers
and every cdef signature are declared in ``_core.pxd``.
"""

cimport cython
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

from xdsfast._errors import WireError

cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX

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
    E_STRING_LONG: f"string field longer than {STRING_CAP} bytes",
    E_UTF8: "string field is not valid UTF-8",
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
    if s.start[slot] < 0:
        return ""
    return _interned_type_url(buf + s.start[slot], s.length[slot])


cdef str _interned_type_url(const uint8_t* raw, Py_ssize_t length):
    cdef bytes cached
    cdef str text
    cdef tuple entry
    if length == 0:
        return ""
    for entry in _type_urls:
        cached = <bytes>entry[0]
        if (PyBytes_GET_SIZE(cached) == length
                and memcmp(PyBytes_AS_STRING(cached), raw, length) == 0):
            return <str>entry[1]
    text = _utf8(raw, length)
    if len(_type_urls) < TYPE_URL_CACHE:
        _type_urls.append((text.encode("utf-8"), text))
    return text


cdef str _string(const uint8_t* buf, Scan* s, int slot):
    if s.start[slot] < 0:
        return ""
    return _utf8(buf + s.start[slot], s.length[slot])


cdef str _utf8(const uint8_t* raw, Py_ssize_t length):
    if length == 0:
        return ""
    try:
        return PyUnicode_DecodeUTF8(<const char*>raw, length, NULL)
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


# -- the streaming peeker -------------------------------------------------------------------
#
# One state machine (Stream, _core.pxd) fed any split of the message: the whole peeker's
# rules, applied as the bytes arrive.  Bodies are skipped by counting down their length;
# only a varint in progress, the group stack and the strings returned are kept.  The
# first resource is walked as a message of its own, only for its type URL.

STRING_LIMIT = STRING_CAP


cdef int _stream_advance(Stream* s, const uint8_t* buf, Py_ssize_t n,
                         Py_ssize_t* at) noexcept nogil:
    """Read buf[at[0]:n]; stop at its end (E_OK), at an error, or when a kept string is
    complete (R_STRING), with at[0] after the last byte read."""
    cdef Py_ssize_t p = at[0], q, take, run
    cdef uint8_t byte
    cdef uint64_t value
    cdef int err
    while p < n:
        if s.phase == P_SKIP or s.phase == P_STRING:
            take = n - p
            if s.left < <uint64_t>take:
                take = <Py_ssize_t>s.left
            if s.phase == P_STRING:
                memcpy(s.carry + s.carried, buf + p, take)
                s.carried += take
            p += take
            s.pos += take
            s.left -= <uint64_t>take
            if s.left:
                break
            if s.phase == P_STRING:
                err = R_STRING
            else:
                err = _stream_field_done(s)
            if err:
                at[0] = p
                return err
            continue
        if (s.phase == P_TAG and s.shift == 0 and s.level == 0 and s.depth == 0
                and s.first != F_UNDECIDED and buf[p] == 0x12):
            # A run of resources, the bulk of a push: hopped as the whole peeker does.
            run = _run(buf, p, n, 0x12, &q)
            if run:
                s.count[0] += run
                s.pos += q - p
                p = q
                continue
        if s.shift >= 70:
            err = _stream_give_up(s) if s.level else E_VARINT_LONG
        else:
            byte = buf[p]
            p += 1
            s.pos += 1
            if s.shift < 64:
                s.value |= (<uint64_t>(byte & 0x7F)) << s.shift
            if byte & 0x80:
                s.shift += 7
                err = _stream_check_varint_room(s)
            else:
                value = s.value
                s.value = 0
                s.shift = 0
                if s.phase == P_TAG:
                    err = _stream_tag(s, value)
                elif s.phase == P_VALUE:
                    err = _stream_field_done(s)
                else:
                    err = _stream_length(s, value)
        if err:
            at[0] = p
            return err
    at[0] = p
    return E_OK


cdef int _stream_tag(Stream* s, uint64_t tag) noexcept nogil:
    cdef uint32_t field
    cdef int wire_type, size
    if s.level:
        return _stream_nested_tag(s, tag)
    if tag > 0xFFFFFFFFu:
        return E_TAG_RANGE
    field = <uint32_t>(tag >> 3)
    wire_type = <int>(tag & 7)
    if field == 0:
        return E_FIELD_ZERO
    s.field = field
    if wire_type == 0:
        s.phase = P_VALUE
        return _stream_check_varint_room(s)
    if wire_type == 2:
        s.phase = P_LENGTH
        return _stream_check_varint_room(s)
    if wire_type == 1 or wire_type == 5:
        size = 8 if wire_type == 1 else 4
        if s.total >= 0 and s.total - s.pos < size:
            return E_PAST_END
        return _stream_skip(s, size, E_PAST_END)
    if wire_type == 3:
        if s.depth >= MAX_DEPTH:
            return E_DEPTH
        s.groups[s.depth] = field
        s.depth += 1
        return _stream_field_done(s)
    if wire_type == 4:
        if s.depth == 0 or s.groups[s.depth - 1] != field:
            return E_GROUP
        s.depth -= 1
        return _stream_field_done(s)
    s.wire_type = wire_type
    return E_WIRE_TYPE


cdef int _stream_nested_tag(Stream* s, uint64_t tag) noexcept nogil:
    """A tag inside the first resource: what is wrong there only ends the walk."""
    cdef uint32_t field
    cdef int wire_type, size
    if tag > 0xFFFFFFFFu or (tag >> 3) == 0:
        return _stream_give_up(s)
    field = <uint32_t>(tag >> 3)
    wire_type = <int>(tag & 7)
    s.field = field
    if wire_type == 0:
        s.phase = P_VALUE
        return _stream_check_varint_room(s)
    if wire_type == 2:
        s.phase = P_LENGTH
        return _stream_check_varint_room(s)
    if wire_type == 1 or wire_type == 5:
        size = 8 if wire_type == 1 else 4
        if size > s.ends[s.level] - s.pos:
            return _stream_give_up(s)
        return _stream_skip(s, size, E_LENGTH)
    if wire_type == 3 and s.depth < MAX_DEPTH:
        s.groups[s.depth] = field
        s.depth += 1
        return _stream_field_done(s)
    if wire_type == 4 and s.depth and s.groups[s.depth - 1] == field:
        s.depth -= 1
        return _stream_field_done(s)
    return _stream_give_up(s)


cdef int _stream_check_varint_room(Stream* s) noexcept nogil:
    """A varint is (still) to come: it cannot if its message or sub-message ends here."""
    if s.level:
        if s.pos == s.ends[s.level]:
            return _stream_give_up(s)
        return E_OK
    if s.pos == s.total:
        return E_VARINT_TRUNCATED
    return E_OK


cdef int _stream_length(Stream* s, uint64_t length) noexcept nogil:
    cdef const uint8_t* table
    cdef uint8_t action, slot
    if s.level:
        return _stream_nested_length(s, length)
    if s.total >= 0 and length > <uint64_t>(s.total - s.pos):
        return E_LENGTH
    if s.depth == 0 and s.field < 16:
        if s.delta:
            table = DELTA_RESPONSE
        else:
            table = RESPONSE
        action = table[s.field]
        slot = action & 0x0F
        if (action & 0xF0) == A_STR:
            return _stream_collect(s, slot, length)
        if (action & 0xF0) == A_CNT:
            s.count[slot] += 1
            if s.field == 2 and s.first == F_UNDECIDED:  # the first resource: look inside
                return _stream_enter(s, 1, length)
    return _stream_skip(s, length, E_LENGTH)


cdef int _stream_nested_length(Stream* s, uint64_t length) noexcept nogil:
    if length > <uint64_t>(s.ends[s.level] - s.pos):
        return _stream_give_up(s)
    if s.depth:
        return _stream_skip(s, length, E_LENGTH)
    if s.delta and s.level == 1:
        if s.field == 2:  # Resource.resource, an Any
            return _stream_enter(s, 2, length)
        return _stream_skip(s, length, E_LENGTH)
    if s.field == 1:  # Any.type_url
        return _stream_collect(s, SLOT_FIRST, length)
    return _stream_skip(s, length, E_LENGTH)


cdef int _stream_enter(Stream* s, int level, uint64_t length) noexcept nogil:
    s.level = level
    if length > <uint64_t>(PY_SSIZE_T_MAX - s.pos):  # told no length: it may be absurd
        s.ends[level] = PY_SSIZE_T_MAX
    else:
        s.ends[level] = s.pos + <Py_ssize_t>length
    return _stream_field_done(s)  # an empty body ends at once


cdef int _stream_give_up(Stream* s) noexcept nogil:
    s.first = F_EMPTY
    return _stream_leave(s)


cdef int _stream_leave(Stream* s) noexcept nogil:
    """Back to the top level: skip what is left of the first resource."""
    s.depth = 0  # the resource's own groups: the top level has none open here
    s.value = 0  # and so is any varint cut short
    s.shift = 0
    s.level = 0
    return _stream_skip(s, <uint64_t>(s.ends[1] - s.pos), E_LENGTH)


cdef int _stream_collect(Stream* s, int slot, uint64_t length) noexcept nogil:
    if length > STRING_CAP:
        if slot == SLOT_FIRST:
            return _stream_give_up(s)
        s.string_error[slot] = E_STRING_LONG
        return _stream_skip(s, length, E_LENGTH)
    s.slot = slot
    s.carried = 0
    s.left = length
    s.skip_error = E_LENGTH
    s.phase = P_STRING
    if length == 0:
        return R_STRING
    return E_OK


cdef int _stream_skip(Stream* s, uint64_t size, int error) noexcept nogil:
    s.left = size
    s.skip_error = error
    s.phase = P_SKIP
    if size == 0:
        return _stream_field_done(s)
    return E_OK


cdef int _stream_field_done(Stream* s) noexcept nogil:
    s.phase = P_TAG
    while s.level and s.pos == s.ends[s.level]:
        if s.depth:
            return _stream_give_up(s)
        s.level -= 1
        if s.level == 0:
            s.first = F_EMPTY  # the first resource ended without a type URL
    if s.level == 0 and s.pos == s.total and s.depth:
        return E_UNTERMINATED
    return E_OK


cdef int _stream_end(Stream* s) noexcept nogil:
    """The message ends here: E_OK, or the error the whole peeker would raise."""
    if s.level:  # inside the first resource, which runs past the end
        return E_LENGTH
    if s.phase == P_SKIP or s.phase == P_STRING:
        return s.skip_error
    if s.phase != P_TAG or s.shift:
        return E_VARINT_TRUNCATED
    if s.depth:
        return E_UNTERMINATED
    if s.total >= 0 and s.pos != s.total:
        return E_SHORT
    # the whole peeker's order: type_url, version, nonce
    if s.string_error[1]:
        return s.string_error[1]
    if s.string_error[0]:
        return s.string_error[0]
    return s.string_error[2]


@cython.auto_pickle(False)
cdef class ResponseScanner:
    """Peek a ``DiscoveryResponse`` (or, ``delta``, a ``DeltaDiscoveryResponse``) fed in
    chunks as they arrive, never holding the message.

    :meth:`finish` ends it with what ``peek_response`` / ``peek_delta_response`` return or
    raise for the whole, so a relay can forward a push while it arrives and still know its
    type, version, nonce and counts.  Kept across chunks: counters, a varint in progress,
    the group stack and the strings returned (each at most :data:`STRING_LIMIT` bytes).
    With ``length`` (the gRPC length prefix) an error the bytes already prove is raised by
    :meth:`feed`; otherwise by :meth:`finish` at the latest.  Once raised, an error is
    raised again by every later call.

    On the way it reads the first resource's type URL (``Any.type_url``, or in delta
    ``Resource.resource.type_url``): :attr:`first_resource_type`, which says early whether
    the push may be forwarded as it comes.
    """

    def __init__(self, bint delta=False, length=None):
        if length is not None and length < 0:
            raise ValueError(f"negative message length {length}")
        self.s.delta = delta
        self.s.total = -1 if length is None else length
        self.s.pos = 0
        self.s.phase = P_TAG
        self.s.value = 0
        self.s.shift = 0
        self.s.field = 0
        self.s.left = 0
        self.s.skip_error = E_LENGTH
        self.s.slot = 0
        self.s.level = 0
        self.s.ends[0] = self.s.ends[1] = self.s.ends[2] = 0
        self.s.depth = 0
        self.s.count[0] = self.s.count[1] = 0
        self.s.string_error[0] = self.s.string_error[1] = self.s.string_error[2] = E_OK
        self.s.first = F_UNDECIDED
        self.s.error = E_OK
        self.s.wire_type = 0
        self.s.carried = 0
        self._strings0 = self._strings1 = self._strings2 = ""
        self._first = None

    @property
    def first_resource_type(self):
        """The first resource's type URL once its bytes are fed; None before (or if the
        message has no resource); "" when the first resource has none or an unreadable one
        (empty, not UTF-8, over :data:`STRING_LIMIT`, or not a well-formed message).

        It is the first ``type_url`` field met (serialisers write one, first): deciding
        there, not at the end of the resource, keeps the decision early for big ones."""
        if self.s.first == F_UNDECIDED:
            return None
        if self.s.first == F_EMPTY:
            return ""
        return self._first

    @property
    def fed(self):
        """Bytes fed so far."""
        return self.s.pos

    def feed(self, chunk):
        """Read the next bytes of the message; raise :class:`WireError` if they prove it
        malformed (ValueError past ``length``)."""
        cdef Py_buffer view
        if self.s.error:
            self._fail(self.s.error)
        if type(chunk) is bytes:  # no buffer-protocol round trip
            self._feed(<const uint8_t*>PyBytes_AS_STRING(chunk), PyBytes_GET_SIZE(chunk))
            return
        PyObject_GetBuffer(chunk, &view, PyBUF_SIMPLE)
        try:
            self._feed(<const uint8_t*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    def finish(self):
        """The message ends here: its peek, as the whole-message peeker's, or WireError."""
        cdef ResponsePeek r
        cdef DeltaResponsePeek d
        cdef int err = self.s.error
        if not err:
            err = _stream_end(&self.s)
        if err:
            self._fail(err)
        if self.s.delta:
            d = DeltaResponsePeek.__new__(DeltaResponsePeek)
            d.type_url = self._strings1
            d.system_version_info = self._strings0
            d.nonce = self._strings2
            d.resource_count = self.s.count[0]
            d.removed_count = self.s.count[1]
            return d
        r = ResponsePeek.__new__(ResponsePeek)
        r.type_url = self._strings1
        r.version_info = self._strings0
        r.nonce = self._strings2
        r.resource_count = self.s.count[0]
        return r

    cdef int _feed(self, const uint8_t* buf, Py_ssize_t n) except -1:
        cdef Py_ssize_t p = 0
        cdef int err
        if self.s.total >= 0 and n > self.s.total - self.s.pos:
            raise ValueError(f"fed past the message's {self.s.total} bytes")
        while True:
            err = _stream_advance(&self.s, buf, n, &p)
            if err == R_STRING:
                err = self._string_done()
                if err == E_OK:
                    continue
            if err == E_OK:
                return 0
            return self._fail(err)

    cdef int _string_done(self) except -1:
        """A kept string is complete: decode it into its slot, and go on."""
        cdef Stream* s = &self.s
        cdef str text
        cdef int error = E_OK
        try:
            if s.slot == SLOT_FIRST or s.slot == 1:  # type URLs repeat: reuse the str
                text = _interned_type_url(s.carry, s.carried)
            else:
                text = _utf8(s.carry, s.carried)
        except WireError:
            text = ""
            error = E_UTF8
        if s.slot == SLOT_FIRST:
            if text:
                self._first = text
                s.first = F_TEXT
            else:
                s.first = F_EMPTY
            return _stream_leave(s)
        s.string_error[s.slot] = error
        if s.slot == 0:
            self._strings0 = text
        elif s.slot == 1:
            self._strings1 = text
        else:
            self._strings2 = text
        return _stream_field_done(s)

    cdef int _fail(self, int err) except -1:
        """Raise error ``err`` (kept: every later call raises it again)."""
        self.s.error = err
        if err == E_WIRE_TYPE:
            raise WireError(f"invalid wire type {self.s.wire_type}")
        if err == E_SHORT:
            raise WireError(f"message ended after {self.s.pos} of its {self.s.total} bytes")
        raise WireError(_MESSAGES[err])
