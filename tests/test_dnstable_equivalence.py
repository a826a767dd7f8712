"""The compiled name table (``_dnstable``) against its twin and against the answers the
proxy used to precompute: random NameTables, rules and queries, byte for byte.

``reference_answers`` is the precomputation the table replaced (every name x A/AAAA
-> the answer section in each round-robin order), kept here as the oracle.
"""

from __future__ import annotations

import itertools
import struct
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twins import Cores, both

from xdsfast import _dnstable_py, nds_pb2
from xdsfast.dns import table as table_module
from xdsfast.dns.names import Addresses, Lookup, NameRules, build_lookup
from xdsfast.dns.wire import CLASS_IN, TTL, TYPE_A, TYPE_AAAA, TYPE_CNAME, NameEncoder

Info = nds_pb2.NameTable.NameInfo


def compiled() -> ModuleType:
    """The compiled table's module (the test is skipped where it is not built)."""
    return both()[1].dnstable


# -- the reference: the precomputed answers of earlier versions --------------------------------

_RR = struct.Struct("!HHIH")
_POINTER = b"\xc0\x0c"
MAX_SECTION = 65535 - 12 - 259
A_IN = struct.pack("!HH", TYPE_A, CLASS_IN)
AAAA_IN = struct.pack("!HH", TYPE_AAAA, CLASS_IN)


def _orders(prefix: list[bytes], records: list[bytes]) -> list[bytes]:
    size = sum(map(len, prefix)) + sum(map(len, records))
    while records and size > MAX_SECTION:
        size -= len(records.pop())
    n = len(records)
    if n <= 1:
        return [b"".join(prefix + records)]
    steps = range(n) if n <= 8 else [i * n // 8 for i in range(8)]
    return [b"".join(prefix + records[i:] + records[:i]) for i in steps]


def _records(owner: bytes, rtype: int, addresses: tuple[bytes, ...]) -> list[bytes]:
    return [owner + _RR.pack(rtype, CLASS_IN, TTL, len(a)) + a for a in addresses]


def reference_answers(lookup: Lookup) -> dict[bytes, list[bytes]]:
    """Question key (name wire + type + class) -> answer section in each order."""
    answers: dict[bytes, list[bytes]] = {}
    encoder = NameEncoder()
    wires: dict[str, bytes] = {}
    for name, addresses in lookup.addresses.items():
        wire = encoder.encode(name)
        if wire is None:
            continue
        wires[name] = wire
        for qtype, rtype, family in ((A_IN, TYPE_A, addresses.v4), (AAAA_IN, TYPE_AAAA,
                                                                     addresses.v6)):  # fmt: skip
            answers[wire + qtype] = _orders([], _records(_POINTER, rtype, family))
    suffix = encoder.encode(lookup.suffix) if lookup.suffix else None
    for target in lookup.cnames.values():
        target_wire = wires.get(target)
        if target_wire is None or suffix is None:
            continue
        wire = target_wire[:-1] + suffix
        if len(wire) > 255:
            continue
        found: Addresses = lookup.addresses[target]
        cname = _POINTER + _RR.pack(TYPE_CNAME, CLASS_IN, TTL, len(target_wire)) + target_wire
        for qtype, rtype, family in ((A_IN, TYPE_A, found.v4), (AAAA_IN, TYPE_AAAA, found.v6)):
            # The records' owner: a pointer to the CNAME's target (after the header, the
            # question and the CNAME record's own pointer and fixed fields).
            owner = struct.pack("!H", 0xC000 | (12 + len(wire) + 4 + 12))
            answers[wire + qtype] = (
                _orders([cname], _records(owner, rtype, family)) if family else [b""]
            )
    return answers


# -- random tables ----------------------------------------------------------------------------

LABELS = ["a", "B", "svc", "ns1", "default", "Default", "*", "x" * 63, "y" * 64, "", "é",
          "cluster", "local", "K\u212a"]  # fmt: skip
IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "2001:db8::1", "::ffff:1.2.3.4", "nonsense",
       "1.2.3\x004", "010.1.1.1", "fe80::1%eth0", "10.0.0.1"]  # fmt: skip
hostnames = st.builds(
    lambda labels, tail: ".".join(labels) + tail,
    st.lists(st.sampled_from(LABELS), min_size=0, max_size=6),
    st.sampled_from(
        [
            "",
            "",
            ".",
            "..",
            ".svc.cluster.local",
            ".ns1.svc.cluster.local",
            ".m" + ".m".join(["m" * 59] * 3),
        ]
    ),  # names near the 255-byte limit
)
infos = st.builds(
    lambda ips, registry, short, ns, alt: Info(
        ips=ips, registry=registry, shortname=short, namespace=ns, alt_hosts=alt
    ),
    st.lists(
        st.sampled_from(IPS)
        | st.builds(lambda i: f"10.1.{i // 250}.{i % 250}", st.integers(0, 4000)),
        max_size=5,
    )
    | st.builds(
        lambda n, v6: [f"2001:db8::{i}" if v6 else f"10.2.0.{i}" for i in range(n)],
        st.integers(9, 40),
        st.booleans(),
    ),  # more than 8: rotated in steps
    st.sampled_from(["Kubernetes", "Kubernetes", "External", ""]),
    st.sampled_from(["", "a", "svc", "B", "x" * 63]),
    st.sampled_from(["", "default", "ns1", "Default"]),
    st.lists(hostnames, max_size=2),
)
tables = st.dictionaries(hostnames, infos, max_size=12)
rules = st.builds(
    NameRules,
    st.sampled_from(["default", "ns1", ""]),
    st.sampled_from(["", "default.svc.cluster.local", "svc.corp", "default", "cluster.local"]),
    st.sampled_from([(), ("default.svc.cluster.local", "svc.cluster.local"),
                     ("NS1.svc.cluster.local.",), ("é.x",), ("x" * 64,), ("svc.corp",)]),
)  # fmt: skip


def name_table(entries: dict[str, nds_pb2.NameTable.NameInfo]) -> bytes:
    table = nds_pb2.NameTable()
    for host, info in entries.items():
        table.table[host].CopyFrom(info)
    return table.SerializeToString()


def question(name: bytes, qtype: int, *, edns: bool = False, qid: int = 0x4242) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0110, 1, 0, 0, 1 if edns else 0)
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0) if edns else b""
    return header + name + struct.pack("!HH", qtype, 1) + opt


def flip_case(name: bytes) -> bytes:
    return bytes(c ^ 0x20 if 0x61 <= c <= 0x7A and i % 2 else c for i, c in enumerate(name))


SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))


@given(tables, rules)
@SETTINGS
def test_twin_answers_exactly_as_the_precomputed_answers(
    entries: dict[str, nds_pb2.NameTable.NameInfo], rule: NameRules
) -> None:
    wire = name_table(entries)
    expected = reference_answers(build_lookup(nds_pb2.NameTable.FromString(wire).table, rule))
    twin = _dnstable_py.build(wire, rule)
    assert twin is not None
    assert set(twin) == set(expected)
    for key, sections in expected.items():
        assert twin.sections(key[:-4], key[-3]) == sections, key


@given(tables, rules)
@SETTINGS
def test_compiled_table_is_its_twin(
    entries: dict[str, nds_pb2.NameTable.NameInfo], rule: NameRules
) -> None:
    """Same questions, same sections in the same order, same replies to the same queries
    (fast and slow paths, any case, EDNS, wildcards), same counts."""
    twin_module, compiled_module = (cores.dnstable for cores in both())
    wire = name_table(entries)
    twin = twin_module.build(wire, rule)
    compiled = compiled_module.build(wire, rule)
    assert twin is not None and compiled is not None
    assert (compiled.hosts, compiled.names, len(compiled)) == (twin.hosts, twin.names, len(twin))
    assert set(compiled) == set(twin)
    names = {key[:-4] for key in twin} | {b"\x01q\x01a\x00", b"\x01q" + b"\x01*\x03svc\x00"}
    for name in names:
        for qtype in (1, 28, 16):
            assert compiled.sections(name, qtype) == twin.sections(name, qtype)
            for query in (question(name, qtype), question(flip_case(name), qtype, edns=True),
                          question(b"\x02zz" + name, qtype)):  # fmt: skip
                qend = len(query) - (11 if query[11] else 0)
                _same_reply(compiled.fast(query), twin.fast(query), qend)
                _same_reply(compiled.reply(query, qend), twin.reply(query, qend), qend)


def _same_reply(got: bytes | None, want: bytes | None, qend: int) -> None:
    """Equal, but for which round-robin order each module's counter was at."""
    assert (got is None) == (want is None)
    if got is None or want is None:
        return
    assert got[:qend] == want[:qend] and len(got) == len(want)


def test_compiled_round_robin_steps_through_the_orders_in_turn() -> None:
    """Each reply takes the next order, as the precomputed rotation did."""
    compiled_module = compiled()
    rule = NameRules("default")
    for count in (3, 20):
        entries = {"many.example": Info(ips=[f"10.0.0.{i}" for i in range(1, count + 1)],
                                        registry="External")}  # fmt: skip
        table = compiled_module.build(name_table(entries), rule)
        assert table is not None
        name = b"\x04many\x07example\x00"
        sections = table.sections(name, 1)
        assert sections is not None
        query = question(name, 1)
        got = []
        for _ in range(2 * len(sections)):
            reply = table.fast(query)
            assert reply is not None
            got.append(sections.index(reply[len(query) :]))
        assert all((b - a) % len(sections) == 1 for a, b in itertools.pairwise(got))


def test_repeated_keys_are_left_to_protobuf() -> None:
    """Two map entries with one key: protobuf keeps the last; the compiled parser hands such
    an encoding back (None) and ``table.build`` re-encodes it with protobuf first."""
    compiled_module = compiled()
    first = name_table({"a.example": Info(ips=["10.0.0.1"], registry="External")})
    second = name_table({"a.example": Info(ips=["10.0.0.2"], registry="External")})
    rule = NameRules("default")
    assert compiled_module.build(first + second, rule) is None
    built = table_module.build(first + second, rule)
    sections = built.sections(b"\x01a\x07example\x00", 1)
    assert sections is not None and sections[0].endswith(bytes([10, 0, 0, 2]))


@pytest.mark.parametrize("cut", [1, 2, 5, 9])
def test_compiled_parser_rejects_truncated_bytes(cut: int) -> None:
    compiled_module = compiled()
    wire = name_table({"a.example": Info(ips=["10.0.0.1"], registry="External")})
    with pytest.raises(ValueError, match="cannot decode NameTable"):
        compiled_module.build(wire[:-cut], NameRules("default"))


def test_compiled_table_is_compact() -> None:
    """20k Kubernetes services (6 names each, with the search-domain CNAMEs) in well under
    400 bytes per host: names share their hostname's bytes and CNAMEs take none."""
    compiled_module = compiled()
    table = nds_pb2.NameTable()
    for i in range(20000):
        ns = f"ns-{i % 50:02d}"
        table.table[f"svc-{i:05d}.{ns}.svc.cluster.local"].CopyFrom(
            Info(
                ips=[f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"],
                registry="Kubernetes",
                shortname=f"svc-{i:05d}",
                namespace=ns,
            )
        )
    rule = NameRules("ns-00", "", ("ns-00.svc.cluster.local", "svc.cluster.local"))
    built = compiled_module.build(table.SerializeToString(), rule)
    assert built is not None and built.hosts == 20000 and built.names >= 6 * 20000 - 400
    assert built.nbytes < 20000 * 250


def test_naming_rule_spellings(twins: Cores) -> None:
    """One spelling per DNS name: a trailing ``..`` is ``.`` (an alt_hosts entry ``x.``
    answers as ``x.``), only ASCII names are lowercased (KELVIN SIGN is no ``k``), and
    the root name gets no search-domain CNAME."""
    rule = NameRules("default", "", ("default.svc.cluster.local",))
    entries = {
        "backend.default.svc.cluster.local": Info(
            ips=["10.0.0.1"], registry="Kubernetes", shortname="backend", namespace="default",
            alt_hosts=["Alias.Example.", "\u212a.example"]),
        "": Info(ips=["10.0.0.9"], registry="External"),
    }  # fmt: skip
    built = twins.dnstable.build(name_table(entries), rule)
    assert built is not None
    assert b"\x05alias\x07example\x00" + A_IN in built
    assert b"\x01k\x07example\x00" + A_IN not in built
    assert b"\x00" + A_IN in built  # the root itself, as before
    assert b"\x07default\x03svc\x07cluster\x05local\x00" + A_IN not in built
