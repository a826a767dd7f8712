"""A NameTable kept as the wire bytes istiod sent, read an entry at a time.

A parsed NameTable costs about 300 bytes per host (29 MiB for 100 000 hosts)
for something read only by ``/debug/ndsz`` and ``DnsTable.hosts()``; its
wire bytes cost about 80.  The map's entries are top-level records of field 1,
so they can be found by walking the tags (no decode) and each decoded alone
by protobuf as a one-entry NameTable, with the same values as a whole decode
(protobuf keeps the last entry of a repeated key, as :meth:`entries` does).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # protobuf loads with the first table, not at start
    from xdsfast.nds_pb2 import NameTable

    NameInfo = NameTable.NameInfo

_TABLE_FIELD = 1  # NameTable.table, map<string, NameInfo>: repeated length-delimited entries


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _skip(data: bytes, pos: int, wire_type: int) -> int:
    """The position after a field's value of this wire type (groups skipped whole)."""
    depth = 0
    while True:
        if wire_type == 0:
            pos = _varint(data, pos)[1]
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            pos += length
        elif wire_type == 5:
            pos += 4
        elif wire_type == 3:
            depth += 1
        elif wire_type == 4:
            depth -= 1
        else:
            raise ValueError(f"wire type {wire_type}")
        if pos > len(data):
            raise ValueError("truncated field")
        if depth == 0:
            return pos
        tag, pos = _varint(data, pos)
        wire_type = tag & 7


class WireNameTable:
    """A NameTable as its wire bytes (already accepted by protobuf); replaced, never changed."""

    __slots__ = ("__weakref__", "wire")

    def __init__(self, wire: bytes) -> None:
        self.wire = wire

    def records(self) -> Iterator[tuple[int, int]]:
        """(start, end) of each map entry's record (tag, length and entry), in wire order."""
        data = self.wire
        pos = 0
        while pos < len(data):
            start = pos
            tag, pos = _varint(data, pos)
            pos = _skip(data, pos, tag & 7)
            if tag == _TABLE_FIELD << 3 | 2:
                yield start, pos

    def entry(self, start: int, end: int) -> tuple[str, NameInfo]:
        """The host and NameInfo of one record from :meth:`records`."""
        from xdsfast.nds_pb2 import NameTable

        one = NameTable.FromString(self.wire[start:end]).table
        host = next(iter(one))
        return host, one[host]

    def entries(self) -> Iterator[tuple[str, NameInfo]]:
        """Each host once, with its last entry's NameInfo (as protobuf's map), in no order."""
        last: dict[str, tuple[int, int]] = {}
        for start, end in self.records():
            last[self.entry(start, end)[0]] = (start, end)
        for span in last.values():
            yield self.entry(*span)

    def hosts(self) -> dict[str, list[str]]:
        """Hostname -> IPs."""
        return {host: list(info.ips) for host, info in self.entries()}
