# The wire peeker's compiled core (_core.pyx): its results' fields, its C helpers (the
# varint reader and the run hopper are inline here, for any module that cimports them)
# and its cdef signatures.
#
# Callbacks the core makes by name on Python objects: none.  It reads bytes directly and
# any other buffer through the buffer protocol; its only Python-level result besides the
# peeks is xdsfast._errors.WireError.

from libc.stdint cimport uint8_t, uint32_t, uint64_t

cdef enum:
    MAX_DEPTH = 100  # protobuf's own recursion limit, applied to nested groups
    TYPE_URL_CACHE = 32  # type_url strings kept for reuse (a mesh has about ten)
    STRING_CAP = 4096  # longest string the streaming peeker keeps (_core_py.STRING_LIMIT)

# Field actions, as in _core_py: kind in the high nibble, slot in the low one.
cdef enum:
    A_STR = 0x10  # keep the position of the last occurrence of a string
    A_CNT = 0x20  # count occurrences (a repeated field)
    A_HAS = 0x30  # note presence (a sub-message)

# Error codes of the scanner; turned into WireError messages by _raise.
cdef enum:
    E_OK = 0
    E_VARINT_TRUNCATED
    E_VARINT_LONG
    E_TAG_RANGE
    E_FIELD_ZERO
    E_LENGTH
    E_PAST_END
    E_DEPTH
    E_GROUP
    E_UNTERMINATED
    E_WIRE_TYPE
    # the streaming peeker's own: a string it cannot keep or decode, a short message
    E_STRING_LONG
    E_UTF8
    E_SHORT
    R_STRING = -1  # not an error: a kept string is complete, for Python to decode

cdef enum Kind:
    K_REQUEST
    K_RESPONSE
    K_DELTA_REQUEST
    K_DELTA_RESPONSE

cdef struct Scan:  # what one walk of the top level found
    Py_ssize_t start[3]  # string spans: start (-1: absent) and length, per slot
    Py_ssize_t length[3]
    Py_ssize_t count[2]  # repeated fields, per slot
    bint has[2]  # sub-messages present, per slot


# What the next byte fed to the streaming peeker is part of (_core_py's _TAG.._STRING).
cdef enum Phase:
    P_TAG  # a field's tag
    P_VALUE  # a varint field's value
    P_LENGTH  # a length-delimited field's length
    P_SKIP  # a body nobody reads: only counted down
    P_STRING  # the body of a string field that is kept

# The first resource's type URL: not yet known, known to be unreadable (""), or read.
cdef enum First:
    F_UNDECIDED
    F_EMPTY
    F_TEXT

cdef enum:
    SLOT_FIRST = 3  # string slot of the first resource's type URL (0..2: as in Scan)

cdef struct Stream:  # the streaming peeker's whole state: no message bytes but a string
    bint delta  # a DeltaDiscoveryResponse (else a DiscoveryResponse)
    Py_ssize_t total  # the message's length; -1: not told, only finish() ends it
    Py_ssize_t pos  # bytes fed so far
    Phase phase
    uint64_t value  # the varint being read, and how far
    int shift
    uint32_t field  # the current field's number
    uint64_t left  # body bytes still to skip or keep
    int skip_error  # what the message ending inside that body means
    int slot  # where the string being kept goes
    int level  # 0: top level; 1: inside the first resource; 2: inside its Any (delta)
    Py_ssize_t ends[3]  # where each level ends
    int depth  # groups open (of the level being walked)
    uint32_t groups[MAX_DEPTH]
    Py_ssize_t count[2]  # repeated fields, per slot (as in Scan)
    int string_error[3]  # per string slot: E_OK, E_STRING_LONG or E_UTF8
    First first
    int error  # the error raised, raised again by every later call
    int wire_type  # of an E_WIRE_TYPE
    Py_ssize_t carried  # bytes of the string being kept, in carry
    uint8_t carry[STRING_CAP]


cdef class RequestPeek:
    cdef readonly str type_url
    cdef readonly str version_info
    cdef readonly str response_nonce
    cdef readonly bint has_node
    cdef readonly bint has_error_detail
    cdef readonly Py_ssize_t resource_name_count


cdef class ResponsePeek:
    cdef readonly str type_url
    cdef readonly str version_info
    cdef readonly str nonce
    cdef readonly Py_ssize_t resource_count


cdef class DeltaRequestPeek:
    cdef readonly str type_url
    cdef readonly str response_nonce
    cdef readonly bint has_node
    cdef readonly bint has_error_detail
    cdef readonly Py_ssize_t subscribe_count
    cdef readonly Py_ssize_t unsubscribe_count


cdef class DeltaResponsePeek:
    cdef readonly str type_url
    cdef readonly str system_version_info
    cdef readonly str nonce
    cdef readonly Py_ssize_t resource_count
    cdef readonly Py_ssize_t removed_count


cdef class ResponseScanner:
    cdef Stream s
    cdef str _strings0  # the string slots (Scan's): version, type_url, nonce
    cdef str _strings1
    cdef str _strings2
    cdef str _first  # the first resource's type URL, when s.first is F_TEXT

    cdef int _feed(self, const uint8_t* buf, Py_ssize_t n) except -1
    cdef int _string_done(self) except -1
    cdef int _fail(self, int err) except -1


cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define _xdsfast_prefetch(p) __builtin_prefetch((const void*)(p))
    #else
    #define _xdsfast_prefetch(p) ((void)0)
    #endif
    """
    void _prefetch "_xdsfast_prefetch"(const void* p) noexcept nogil


cdef inline int _varint(const uint8_t* buf, Py_ssize_t* pos, Py_ssize_t end,
                        uint64_t* out) noexcept nogil:
    """Decode a varint of at most 10 bytes at pos[0] into out[0] (64 bits kept), advance
    pos[0] past it; E_OK, E_VARINT_TRUNCATED or E_VARINT_LONG."""
    cdef uint64_t value = 0
    cdef int shift = 0
    cdef uint8_t byte
    cdef Py_ssize_t p = pos[0]
    while True:
        if p >= end:
            return E_VARINT_TRUNCATED
        if shift >= 70:
            return E_VARINT_LONG
        byte = buf[p]
        p += 1
        if shift < 64:
            value |= (<uint64_t>(byte & 0x7F)) << shift
        if byte < 0x80:
            pos[0] = p
            out[0] = value
            return E_OK
        shift += 7


cdef inline Py_ssize_t _run(const uint8_t* buf, Py_ssize_t pos, Py_ssize_t end,
                            uint8_t tag, Py_ssize_t* out) noexcept nogil:
    """Hop over a run of records with the same one-byte LEN tag (a response's
    resources: thousands in a row); return how many, leave pos after the last.

    Stops at anything unusual (another tag, a long length, a short buffer) and
    lets the general loop deal with it, errors included.
    """
    cdef Py_ssize_t count = 0, length
    cdef uint8_t b1, b2
    while pos + 2 < end and buf[pos] == tag:
        b1 = buf[pos + 1]
        if b1 < 0x80:
            length = b1 + 2
        else:
            b2 = buf[pos + 2]
            if b2 >= 0x80:
                break
            length = ((b1 & 0x7F) | (<Py_ssize_t>b2 << 7)) + 3
        if length > end - pos:
            break
        # Resources of one push are alike in size: fetch where the one after
        # next probably starts, so the hops do not wait on memory.
        _prefetch(buf + pos + 3 * length)
        pos += length
        count += 1
    out[0] = pos
    return count


cdef void _fill(uint8_t* table, tuple actions)
cdef int _scan(const uint8_t* buf, Py_ssize_t end, const uint8_t* table,
               Scan* s, int* bad_wire_type) noexcept nogil
cdef object _raise(int err, int wire_type)
cdef str _type_url(const uint8_t* buf, Scan* s, int slot)
cdef str _string(const uint8_t* buf, Scan* s, int slot)
cdef str _utf8(const uint8_t* raw, Py_ssize_t length)
cdef str _interned_type_url(const uint8_t* raw, Py_ssize_t length)
cdef RequestPeek _requestpeek(const uint8_t* buf, Scan* s)
cdef ResponsePeek _responsepeek(const uint8_t* buf, Scan* s)
cdef DeltaRequestPeek _deltarequestpeek(const uint8_t* buf, Scan* s)
cdef DeltaResponsePeek _deltaresponsepeek(const uint8_t* buf, Scan* s)
cdef object _build(Kind kind, const uint8_t* buf, Scan* s)
cdef object _peek(object data, const uint8_t* table, Kind kind)

# The streaming peeker's steps (ResponseScanner), mirroring _core_py's methods of the same
# names; each returns E_OK, an error code, or R_STRING.
cdef int _stream_advance(Stream* s, const uint8_t* buf, Py_ssize_t n,
                         Py_ssize_t* at) noexcept nogil
cdef int _stream_tag(Stream* s, uint64_t tag) noexcept nogil
cdef int _stream_nested_tag(Stream* s, uint64_t tag) noexcept nogil
cdef int _stream_check_varint_room(Stream* s) noexcept nogil
cdef int _stream_length(Stream* s, uint64_t length) noexcept nogil
cdef int _stream_nested_length(Stream* s, uint64_t length) noexcept nogil
cdef int _stream_enter(Stream* s, int level, uint64_t length) noexcept nogil
cdef int _stream_give_up(Stream* s) noexcept nogil
cdef int _stream_leave(Stream* s) noexcept nogil
cdef int _stream_collect(Stream* s, int slot, uint64_t length) noexcept nogil
cdef int _stream_skip(Stream* s, uint64_t size, int error) noexcept nogil
cdef int _stream_field_done(Stream* s) noexcept nogil
cdef int _stream_end(Stream* s) noexcept nogil
