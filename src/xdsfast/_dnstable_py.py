"""Pure-Python twin of :mod:`xdsfast._dnstable`: the DNS proxy's compiled name table.

A table maps each name it answers (the lowercased wire form of the question's
name) to its addresses, or to a CNAME target and the target's addresses.  No
answer is stored: each reply is written when the query comes, as the header
(the query's ID, QR AA and the query's RD and CD), the client's question as
sent, then for A or AAAA the CNAME record (search-domain forms) and the
family's address records, rotated round-robin: with ``n`` records, up to
``ROTATIONS`` orders (``n`` <= 8: each rotation; else every ``n / 8``-th), the
next order per reply from one counter shared by all names.
Records name their owner with a pointer to the question, or to the CNAME
record's target, TTL 30.  That is what the precomputed answers of earlier
versions held (which spelled the target out again: fewer records fit in 512
bytes than in Istio's answer), at a fraction of the memory.

``build`` takes the NameTable's wire bytes and the proxy's rules.  The
compiled module parses the bytes itself with the GIL released; this twin
decodes them with protobuf and applies :mod:`xdsfast.dns.names` (the
reference rules), so the two are tested against each other.
"""

from __future__ import annotations

import itertools
import struct
import sys
from collections.abc import Iterator
from typing import Protocol

from xdsfast.dns.names import CANCEL_EVERY, Cancelled, build_lookup
from xdsfast.dns.wire import NameEncoder, parent_wildcards

ROTATIONS = 8
MAX_SECTION = 65535 - 12 - 259  # what fits in a message after the header and question
UDP_MIN = 512
_A_IN = b"\x00\x01\x00\x01"
_AAAA_IN = b"\x00\x1c\x00\x01"
_PLAIN_COUNTS = b"\x00\x01\x00\x00\x00\x00\x00"  # QD=1, AN=0, NS=0, AR high byte 0
_POINTER = b"\xc0\x0c"
_RR = struct.Struct("!HHIH")
_COUNTS = struct.Struct("!HHHH")
_TTL = 30

_turns = itertools.count()  # the round-robin counter: which order the next answer uses


class Rules(Protocol):
    """What the build needs of ``xdsfast.dns.names.NameRules``."""

    @property
    def namespace(self) -> str: ...
    @property
    def proxy_domain(self) -> str: ...
    @property
    def search_suffix(self) -> str: ...


# A name's entry: (CNAME target's wire or None, IPv4 addresses, IPv6 addresses).
_Entry = tuple[bytes | None, tuple[bytes, ...], tuple[bytes, ...]]


class CompiledTable:
    """The names of one NameTable, ready to answer; immutable once built."""

    def __init__(self, index: dict[bytes, _Entry], hosts: int) -> None:
        self._index = index
        self.hosts = hosts  # NameTable entries
        self.names = len(index)  # names answered (each for A and AAAA)
        self.nbytes = sys.getsizeof(index) + sum(
            sys.getsizeof(k) + sum(map(len, v[1] + v[2])) for k, v in index.items()
        )

    def fast(self, data: bytes) -> bytes | None:
        """The reply to a plain query (one question, no answer or authority record, at
        most two additional) of a name in the table, if it fits in 512 bytes; else None.

        Nothing past the question is read; the question's end is its first NUL byte."""
        if len(data) < 17 or data[2] & 0xF8 or data[4:11] != _PLAIN_COUNTS or data[11] > 2:
            return None
        qend = data.find(0, 12) + 5
        if qend < 17 or qend > len(data):
            return None
        qtype = data[qend - 4 : qend]
        if qtype != _A_IN and qtype != _AAAA_IN:
            return None
        entry = self._index.get(data[12 : qend - 4].lower())
        if entry is None:
            return None
        reply = _compose(data, qend, entry, qtype == _AAAA_IN, None)
        return reply if len(reply) <= UDP_MIN else None

    def reply(self, data: bytes, qend: int) -> bytes | None:
        """The whole reply (untruncated) to a validated query whose question ends at
        ``qend``: A or AAAA, class IN, of a name or under a ``*.`` wildcard (the most
        specific first); None if the table has no answer, or the name is longer than
        a name can be (255 bytes), as the compiled module says."""
        if qend - 16 > 255:
            return None
        qtype = data[qend - 4 : qend]
        if qtype != _A_IN and qtype != _AAAA_IN:
            return None
        name = data[12 : qend - 4].lower()
        entry = self._index.get(name)
        if entry is None:
            for wildcard in parent_wildcards(name):
                entry = self._index.get(wildcard)
                if entry is not None:
                    break
            else:
                return None
        return _compose(data, qend, entry, qtype == _AAAA_IN, None)

    def sections(self, name: bytes, qtype: int) -> list[bytes] | None:
        """The answer section of ``name`` (a lowercased wire name) in each of its orders,
        in round-robin order; None if the table does not have the name."""
        entry = self._index.get(name)
        if entry is None:
            return None
        aaaa = qtype == 28
        query = b"\x00" * 12 + name + struct.pack("!HH", qtype, 1)
        qend = len(query)
        return [_compose(query, qend, entry, aaaa, k)[qend:] for k in range(_orders(entry, aaaa))]

    def __iter__(self) -> Iterator[bytes]:
        """Every question the table answers: name wire + A or AAAA, class IN."""
        for name in self._index:
            yield name + _A_IN
            yield name + _AAAA_IN

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, bytes) or key[-4:] not in (_A_IN, _AAAA_IN):
            return False
        return key[:-4] in self._index

    def __len__(self) -> int:
        return 2 * self.names


def _records(entry: _Entry, aaaa: bool) -> tuple[bytes, bytes, list[bytes]]:
    """(the CNAME record or b"", the owner's spelling, the family's addresses, capped)."""
    target, v4, v6 = entry
    addresses = v6 if aaaa else v4
    if not addresses:
        return b"", b"", []
    prefix = b"" if target is None else _POINTER + _RR.pack(5, 1, _TTL, len(target)) + target
    owner = _POINTER  # or, after a CNAME, a pointer to its target (``_compose`` knows where)
    size = len(owner) + 10 + len(addresses[0])
    n = len(addresses)
    if len(prefix) + n * size > MAX_SECTION:
        n = max(0, (MAX_SECTION - len(prefix)) // size)
    return prefix, owner, list(addresses[:n])


def _orders(entry: _Entry, aaaa: bool) -> int:
    n = len(_records(entry, aaaa)[2])
    return 1 if n <= 1 else min(n, ROTATIONS)


def _compose(data: bytes, qend: int, entry: _Entry, aaaa: bool, order: int | None) -> bytes:
    """The reply; ``order``: that rotation, or None for the next turn of the counter."""
    prefix, owner, addresses = _records(entry, aaaa)
    n = len(addresses)
    start = 0
    if n > 1:
        k = (next(_turns) if order is None else order) % min(n, ROTATIONS)
        start = k if n <= ROTATIONS else k * n // ROTATIONS
    rtype = 28 if aaaa else 1
    if prefix:  # the records' owner is the CNAME's target, where its record spells it
        owner = struct.pack("!H", 0xC000 | (qend + 12))
    parts = [
        data[:2],
        bytes((0x84 | (data[2] & 1), data[3] & 0x10)),
        _COUNTS.pack(1, n + (1 if prefix else 0), 0, 0),
        data[12:qend],
        prefix,
    ]
    for i in itertools.chain(range(start, n), range(start)):
        address = addresses[i]
        parts.append(owner + _RR.pack(rtype, 1, _TTL, len(address)) + address)
    return b"".join(parts)


def build(wire: bytes, rules: Rules, cancel: bytearray | None = None) -> CompiledTable | None:
    """The table for a serialized NameTable under the proxy's rules.

    (None means "re-encode the NameTable canonically and call again": the compiled
    build says so for encodings it does not parse itself; this twin never does.)
    Raises ValueError if ``wire`` is not a NameTable.  ``cancel``: a one-byte
    ``bytearray`` another thread may set; the build looks at it every
    ``CANCEL_EVERY`` hosts (and names) and, once set, stops and returns None."""
    from xdsfast.nds_pb2 import NameTable  # protobuf loads with the first table

    try:
        table = NameTable.FromString(wire)
    except Exception as exc:  # DecodeError
        raise ValueError(f"cannot decode NameTable: {exc}") from exc
    try:
        lookup = build_lookup(table.table, rules, cancel)  # type: ignore[arg-type]
    except Cancelled:
        return None
    encoder = NameEncoder()
    index: dict[bytes, _Entry] = {}
    per_entry: dict[int, _Entry] = {}
    wires: dict[str, bytes] = {}
    for count, (name, addresses) in enumerate(lookup.addresses.items()):
        if cancel is not None and count % CANCEL_EVERY == 0 and cancel[0]:
            return None
        name_wire = encoder.encode(name)
        if name_wire is None:
            continue
        wires[name] = name_wire
        entry = per_entry.get(id(addresses))
        if entry is None:
            entry = per_entry[id(addresses)] = (None, addresses.v4, addresses.v6)
        index[name_wire] = entry
    suffix = encoder.encode(lookup.suffix) if lookup.suffix else None
    for target in lookup.cnames.values():
        target_wire = wires.get(target)
        if target_wire is None or suffix is None:
            continue
        name_wire = target_wire[:-1] + suffix
        if len(name_wire) > 255:
            continue
        addresses = lookup.addresses[target]
        index[name_wire] = (target_wire, addresses.v4, addresses.v6)
    return CompiledTable(index, len(table.table))


def accepted(wire: bytes) -> bool:
    """Whether protobuf surely decodes ``wire`` as a NameTable without asking it; the
    twin is never sure (the compiled module checks the wire bytes in C)."""
    return False
