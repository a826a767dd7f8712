"""Pure-Python twin of :mod:`xdsfast._core`: the reference and the fallback.

The peeker reads the handful of top-level fields the relay routes on
straight from protobuf wire bytes, without decoding the message.  Every
rule here (last one wins, unknown fields skipped, groups balanced, the
same errors) is mirrored line for line by ``_core.pyx``; the tests run
both against protobuf's own parser so the two cannot drift.
:class:`ResponseScanner` applies the same rules to a response fed chunk by
chunk, in bounded memory, and ends as the whole-message peeker would.
"""

from __future__ import annotations

from typing import Union

from xdsfast._errors import WireError

Buffer = Union[bytes, bytearray, memoryview]

# Field actions: what the scanner does with a length-delimited field.
# kind in the high nibble, slot in the low nibble.
_STR = 0x10  # keep the position of the last occurrence of a string
_CNT = 0x20  # count occurrences (a repeated field)
_HAS = 0x30  # note presence (a sub-message)

_MAX_DEPTH = 100  # protobuf's own recursion limit, applied to nested groups

# Per message kind: action for field numbers 0..15 (all fields peeked are < 16).
# Slots: strings 0..2, counts 0..1, presence 0..1.
_REQUEST = (0, _STR | 0, _HAS | 0, _CNT | 0, _STR | 1, _STR | 2, _HAS | 1) + (0,) * 9
_RESPONSE = (0, _STR | 0, _CNT | 0, 0, _STR | 1, _STR | 2) + (0,) * 10
_DELTA_REQUEST = (0, _HAS | 0, _STR | 1, _CNT | 0, _CNT | 1, 0, _STR | 2, _HAS | 1) + (0,) * 8
_DELTA_RESPONSE = (0, _STR | 0, _CNT | 0, 0, _STR | 1, _STR | 2, _CNT | 1) + (0,) * 9


class RequestPeek:
    """What the relay needs of an ``envoy.service.discovery.v3.DiscoveryRequest``."""

    __slots__ = (
        "has_error_detail",
        "has_node",
        "resource_name_count",
        "response_nonce",
        "type_url",
        "version_info",
    )

    def __init__(
        self,
        type_url: str,
        version_info: str,
        response_nonce: str,
        has_node: bool,
        has_error_detail: bool,
        resource_name_count: int,
    ) -> None:
        self.type_url = type_url
        self.version_info = version_info
        self.response_nonce = response_nonce
        self.has_node = has_node
        self.has_error_detail = has_error_detail
        self.resource_name_count = resource_name_count

    def __repr__(self) -> str:
        return (
            f"RequestPeek(type_url={self.type_url!r}, version_info={self.version_info!r}, "
            f"response_nonce={self.response_nonce!r}, has_node={self.has_node}, "
            f"has_error_detail={self.has_error_detail}, "
            f"resource_name_count={self.resource_name_count})"
        )


class ResponsePeek:
    """What the relay needs of an ``envoy.service.discovery.v3.DiscoveryResponse``."""

    __slots__ = ("nonce", "resource_count", "type_url", "version_info")

    def __init__(self, type_url: str, version_info: str, nonce: str, resource_count: int) -> None:
        self.type_url = type_url
        self.version_info = version_info
        self.nonce = nonce
        self.resource_count = resource_count

    def __repr__(self) -> str:
        return (
            f"ResponsePeek(type_url={self.type_url!r}, version_info={self.version_info!r}, "
            f"nonce={self.nonce!r}, resource_count={self.resource_count})"
        )


class DeltaRequestPeek:
    """What the relay needs of an ``envoy.service.discovery.v3.DeltaDiscoveryRequest``."""

    __slots__ = (
        "has_error_detail",
        "has_node",
        "response_nonce",
        "subscribe_count",
        "type_url",
        "unsubscribe_count",
    )

    def __init__(
        self,
        type_url: str,
        response_nonce: str,
        has_node: bool,
        has_error_detail: bool,
        subscribe_count: int,
        unsubscribe_count: int,
    ) -> None:
        self.type_url = type_url
        self.response_nonce = response_nonce
        self.has_node = has_node
        self.has_error_detail = has_error_detail
        self.subscribe_count = subscribe_count
        self.unsubscribe_count = unsubscribe_count

    def __repr__(self) -> str:
        return (
            f"DeltaRequestPeek(type_url={self.type_url!r}, "
            f"response_nonce={self.response_nonce!r}, has_node={self.has_node}, "
            f"has_error_detail={self.has_error_detail}, "
            f"subscribe_count={self.subscribe_count}, "
            f"unsubscribe_count={self.unsubscribe_count})"
        )


class DeltaResponsePeek:
    """What the relay needs of an ``envoy.service.discovery.v3.DeltaDiscoveryResponse``.

    ``removed_count`` counts ``removed_resources`` (field 6).
    """

    __slots__ = ("nonce", "removed_count", "resource_count", "system_version_info", "type_url")

    def __init__(
        self,
        type_url: str,
        system_version_info: str,
        nonce: str,
        resource_count: int,
        removed_count: int,
    ) -> None:
        self.type_url = type_url
        self.system_version_info = system_version_info
        self.nonce = nonce
        self.resource_count = resource_count
        self.removed_count = removed_count

    def __repr__(self) -> str:
        return (
            f"DeltaResponsePeek(type_url={self.type_url!r}, "
            f"system_version_info={self.system_version_info!r}, nonce={self.nonce!r}, "
            f"resource_count={self.resource_count}, removed_count={self.removed_count})"
        )


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    """Decode a varint of at most 10 bytes at ``pos``; return (value, next pos)."""
    value = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, pos  # protobuf keeps 64 bits
        shift += 7


def _scan(data: Buffer, table: tuple[int, ...]) -> tuple[list[int], list[int], list[bool]]:
    """Walk the top level once; return (string spans, counts, presence).

    String spans are stored flat as [start0, len0, start1, len1, ...]; -1 means absent.
    """
    buf = memoryview(data).cast("B")
    end = len(buf)
    spans = [-1, 0, -1, 0, -1, 0]
    counts = [0, 0]
    has = [False, False]
    groups: list[int] = []  # field numbers of the groups we are inside
    pos = 0
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        if tag > 0xFFFFFFFF:
            raise WireError("tag out of range")
        field = tag >> 3
        wire_type = tag & 7
        if field == 0:
            raise WireError("field number 0")
        if wire_type == 0:
            _, pos = _varint(buf, pos, end)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _varint(buf, pos, end)
            if length > end - pos:
                raise WireError("length past the end of the message")
            if not groups and field < 16:
                action = table[field]
                if action:
                    slot = action & 0x0F
                    kind = action & 0xF0
                    if kind == _STR:
                        spans[2 * slot] = pos
                        spans[2 * slot + 1] = length
                    elif kind == _CNT:
                        counts[slot] += 1
                    else:
                        has[slot] = True
            pos += length
        elif wire_type == 3:
            if len(groups) >= _MAX_DEPTH:
                raise WireError("groups nested too deeply")
            groups.append(field)
        elif wire_type == 4:
            if not groups or groups.pop() != field:
                raise WireError("unbalanced group")
        else:
            raise WireError(f"invalid wire type {wire_type}")
        if pos > end:
            raise WireError("field past the end of the message")
    if groups:
        raise WireError("unterminated group")
    return spans, counts, has


def _string(data: Buffer, spans: list[int], slot: int) -> str:
    start = spans[2 * slot]
    if start < 0:
        return ""
    raw = memoryview(data).cast("B")[start : start + spans[2 * slot + 1]]
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError:
        raise WireError("string field is not valid UTF-8") from None


def peek_request(data: Buffer) -> RequestPeek:
    """Peek a SotW ``DiscoveryRequest``; raise :class:`WireError` if malformed."""
    spans, counts, has = _scan(data, _REQUEST)
    return RequestPeek(
        _string(data, spans, 1),
        _string(data, spans, 0),
        _string(data, spans, 2),
        has[0],
        has[1],
        counts[0],
    )


def peek_response(data: Buffer) -> ResponsePeek:
    """Peek a SotW ``DiscoveryResponse``; raise :class:`WireError` if malformed."""
    spans, counts, _ = _scan(data, _RESPONSE)
    return ResponsePeek(
        _string(data, spans, 1),
        _string(data, spans, 0),
        _string(data, spans, 2),
        counts[0],
    )


def peek_delta_request(data: Buffer) -> DeltaRequestPeek:
    """Peek a ``DeltaDiscoveryRequest``; raise :class:`WireError` if malformed."""
    spans, counts, has = _scan(data, _DELTA_REQUEST)
    return DeltaRequestPeek(
        _string(data, spans, 1),
        _string(data, spans, 2),
        has[0],
        has[1],
        counts[0],
        counts[1],
    )


def peek_delta_response(data: Buffer) -> DeltaResponsePeek:
    """Peek a ``DeltaDiscoveryResponse``; raise :class:`WireError` if malformed."""
    spans, counts, _ = _scan(data, _DELTA_RESPONSE)
    return DeltaResponsePeek(
        _string(data, spans, 1),
        _string(data, spans, 0),
        _string(data, spans, 2),
        counts[0],
        counts[1],
    )


# -- the streaming peeker -------------------------------------------------------------------

#: Longest string field the streaming peeker keeps (type URLs, versions and nonces are tens
#: of bytes).  It holds no message, so a longer one that would be returned ends it with
#: WireError; a longer one that a later occurrence replaces does not matter.
STRING_LIMIT = 4096

# What the next byte fed is part of.
_TAG = 0  # a field's tag (varint)
_VALUE = 1  # a varint field's value
_LENGTH = 2  # a length-delimited field's length (varint)
_SKIP = 3  # a body nobody reads: only counted down
_STRING = 4  # the body of a string field that is kept

_FIRST = 3  # string slot of the first resource's type URL (0..2: as the whole peeker's)

_TRUNCATED = "truncated varint"
_LENGTH_PAST = "length past the end of the message"
_FIELD_PAST = "field past the end of the message"
_NOT_UTF8 = "string field is not valid UTF-8"


class ResponseScanner:
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

    __slots__ = (
        "_carry",
        "_counts",
        "_delta",
        "_ends",
        "_error",
        "_field",
        "_first",
        "_groups",
        "_left",
        "_level",
        "_phase",
        "_pos",
        "_shift",
        "_skip_error",
        "_slot",
        "_string_errors",
        "_strings",
        "_table",
        "_total",
        "_value",
    )

    def __init__(self, delta: bool = False, length: int | None = None) -> None:
        if length is not None and length < 0:
            raise ValueError(f"negative message length {length}")
        self._delta = delta
        self._table = _DELTA_RESPONSE if delta else _RESPONSE
        self._total = -1 if length is None else length
        self._pos = 0  # bytes fed so far
        self._phase = _TAG
        self._value = 0  # the varint being read, and how far
        self._shift = 0
        self._field = 0  # the current field's number
        self._left = 0  # body bytes still to skip or keep
        self._skip_error = _LENGTH_PAST  # what the message ending inside that body means
        self._slot = 0  # where the string being kept goes
        self._carry = bytearray()  # the string being kept, at most STRING_LIMIT bytes
        self._groups: list[int] = []  # field numbers of the groups we are inside
        self._counts = [0, 0]
        self._strings = ["", "", ""]  # as the whole peeker's slots: version, type_url, nonce
        self._string_errors: list[str | None] = [None, None, None]
        # 0: the top level; 1: inside the first resource; 2: inside its Any (delta).
        self._level = 0
        self._ends = [0, 0, 0]  # where each level ends
        self._first: str | None = None
        self._error: str | None = None

    @property
    def first_resource_type(self) -> str | None:
        """The first resource's type URL once its bytes are fed; None before (or if the
        message has no resource); "" when the first resource has none or an unreadable one
        (empty, not UTF-8, over :data:`STRING_LIMIT`, or not a well-formed message).

        It is the first ``type_url`` field met (serialisers write one, first): deciding
        there, not at the end of the resource, keeps the decision early for big ones."""
        return self._first

    @property
    def fed(self) -> int:
        """Bytes fed so far."""
        return self._pos

    def feed(self, chunk: Buffer) -> None:
        """Read the next bytes of the message; raise :class:`WireError` if they prove it
        malformed (ValueError past ``length``)."""
        if self._error is not None:
            raise WireError(self._error)
        buf = memoryview(chunk).cast("B")
        end = len(buf)
        if self._total >= 0 and end > self._total - self._pos:
            raise ValueError(f"fed past the message's {self._total} bytes")
        try:
            self._feed(buf, end)
        except WireError as exc:
            self._error = str(exc)
            raise

    def finish(self) -> ResponsePeek | DeltaResponsePeek:
        """The message ends here: its peek, as the whole-message peeker's, or WireError."""
        if self._error is None:
            try:
                return self._finish()
            except WireError as exc:
                self._error = str(exc)
        raise WireError(self._error)

    def _feed(self, buf: memoryview, end: int) -> None:
        p = 0
        while p < end:
            phase = self._phase
            if phase in (_SKIP, _STRING):
                take = min(self._left, end - p)
                if phase == _STRING:
                    self._carry += buf[p : p + take]
                p += take
                self._pos += take
                self._left -= take
                if not self._left:
                    if phase == _STRING:
                        self._string_done()
                    else:
                        self._field_done()
                continue
            if self._shift >= 70:
                if self._level:
                    self._give_up()
                    continue
                raise WireError("varint longer than 10 bytes")
            byte = buf[p]
            p += 1
            self._pos += 1
            self._value |= (byte & 0x7F) << self._shift
            if byte >= 0x80:
                self._shift += 7
                self._check_varint_room()
                continue
            value = self._value & 0xFFFFFFFFFFFFFFFF  # protobuf keeps 64 bits
            self._value = self._shift = 0
            if phase == _TAG:
                self._tag(value)
            elif phase == _VALUE:
                self._field_done()
            else:
                self._length(value)

    def _tag(self, tag: int) -> None:
        if self._level:
            self._nested_tag(tag)
            return
        if tag > 0xFFFFFFFF:
            raise WireError("tag out of range")
        field = tag >> 3
        wire_type = tag & 7
        if field == 0:
            raise WireError("field number 0")
        self._field = field
        if wire_type == 0:
            self._phase = _VALUE
            self._check_varint_room()
        elif wire_type == 2:
            self._phase = _LENGTH
            self._check_varint_room()
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            if 0 <= self._total - self._pos < size:
                raise WireError(_FIELD_PAST)
            self._skip(size, _FIELD_PAST)
        elif wire_type == 3:
            if len(self._groups) >= _MAX_DEPTH:
                raise WireError("groups nested too deeply")
            self._groups.append(field)
            self._field_done()
        elif wire_type == 4:
            if not self._groups or self._groups.pop() != field:
                raise WireError("unbalanced group")
            self._field_done()
        else:
            raise WireError(f"invalid wire type {wire_type}")

    def _check_varint_room(self) -> None:
        """A varint is (still) to come: it cannot if its message or sub-message ends here."""
        if self._level:
            if self._pos == self._ends[self._level]:
                self._give_up()
        elif self._pos == self._total:
            raise WireError(_TRUNCATED)

    def _length(self, length: int) -> None:
        if self._level:
            self._nested_length(length)
            return
        if self._total >= 0 and length > self._total - self._pos:
            raise WireError(_LENGTH_PAST)
        field = self._field
        if not self._groups and field < 16:
            action = self._table[field]
            slot = action & 0x0F
            if action & 0xF0 == _STR:
                self._collect(slot, length)
                return
            if action & 0xF0 == _CNT:
                self._counts[slot] += 1
                if field == 2 and self._first is None:  # the first resource: look inside
                    self._enter(1, length)
                    return
        self._skip(length, _LENGTH_PAST)

    # The first resource is walked like a message of its own, only to find its type URL;
    # what is wrong inside it is no error of the response's (the whole peeker never looks
    # there): the walk gives up and the rest of the resource is skipped.

    def _nested_tag(self, tag: int) -> None:
        field = tag >> 3
        wire_type = tag & 7
        if tag > 0xFFFFFFFF or field == 0:
            self._give_up()
            return
        self._field = field
        if wire_type == 0:
            self._phase = _VALUE
            self._check_varint_room()
        elif wire_type == 2:
            self._phase = _LENGTH
            self._check_varint_room()
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            if size > self._ends[self._level] - self._pos:
                self._give_up()
            else:
                self._skip(size, _LENGTH_PAST)
        elif wire_type == 3 and len(self._groups) < _MAX_DEPTH:
            self._groups.append(field)
            self._field_done()
        elif wire_type == 4 and self._groups and self._groups[-1] == field:
            self._groups.pop()
            self._field_done()
        else:
            self._give_up()

    def _nested_length(self, length: int) -> None:
        if length > self._ends[self._level] - self._pos:
            self._give_up()
        elif self._groups:
            self._skip(length, _LENGTH_PAST)
        elif self._delta and self._level == 1:
            if self._field == 2:  # Resource.resource, an Any
                self._enter(2, length)
            else:
                self._skip(length, _LENGTH_PAST)
        elif self._field == 1:  # Any.type_url
            self._collect(_FIRST, length)
        else:
            self._skip(length, _LENGTH_PAST)

    def _enter(self, level: int, length: int) -> None:
        self._level = level
        self._ends[level] = self._pos + length
        self._field_done()  # an empty body ends at once

    def _give_up(self) -> None:
        self._first = ""
        self._leave()

    def _leave(self) -> None:
        """Back to the top level: skip what is left of the first resource."""
        self._groups.clear()  # the resource's own: the top level has none open here
        self._value = self._shift = 0  # and so is any varint cut short
        self._level = 0
        self._skip(self._ends[1] - self._pos, _LENGTH_PAST)

    def _collect(self, slot: int, length: int) -> None:
        if length > STRING_LIMIT:
            if slot == _FIRST:
                self._give_up()
                return
            self._strings[slot] = ""
            self._string_errors[slot] = f"string field longer than {STRING_LIMIT} bytes"
            self._skip(length, _LENGTH_PAST)
            return
        self._slot = slot
        self._carry.clear()
        self._left = length
        self._skip_error = _LENGTH_PAST
        self._phase = _STRING
        if not length:
            self._string_done()

    def _string_done(self) -> None:
        try:
            text: str | None = str(self._carry, "utf-8")
        except UnicodeDecodeError:
            text = None
        if self._slot == _FIRST:
            self._first = text or ""
            self._leave()
            return
        self._strings[self._slot] = text or ""
        self._string_errors[self._slot] = None if text is not None else _NOT_UTF8
        self._field_done()

    def _skip(self, size: int, error: str) -> None:
        self._left = size
        self._skip_error = error
        self._phase = _SKIP
        if not size:
            self._field_done()

    def _field_done(self) -> None:
        self._phase = _TAG
        while self._level and self._pos == self._ends[self._level]:
            if self._groups:
                self._give_up()
                return
            self._level -= 1
            if not self._level:
                self._first = ""  # the first resource ended without a type URL
        if not self._level and self._pos == self._total and self._groups:
            raise WireError("unterminated group")

    def _finish(self) -> ResponsePeek | DeltaResponsePeek:
        if self._level:  # inside the first resource, which runs past the end
            raise WireError(_LENGTH_PAST)
        if self._phase in (_SKIP, _STRING):
            raise WireError(self._skip_error)
        if self._phase != _TAG or self._shift:
            raise WireError(_TRUNCATED)
        if self._groups:
            raise WireError("unterminated group")
        if self._total >= 0 and self._pos != self._total:
            raise WireError(f"message ended after {self._pos} of its {self._total} bytes")
        for slot in (1, 0, 2):  # the whole peeker's order
            error = self._string_errors[slot]
            if error is not None:
                raise WireError(error)
        version, type_url, nonce = self._strings
        if self._delta:
            return DeltaResponsePeek(type_url, version, nonce, *self._counts)
        return ResponsePeek(type_url, version, nonce, self._counts[0])
