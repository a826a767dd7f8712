"""The streaming peeker (``ResponseScanner``), both implementations, against the
whole-message peeker: the same result or the same WireError for any split into chunks."""

from __future__ import annotations

import itertools
import random
import sys
import tracemalloc
from collections.abc import Iterator
from types import ModuleType

import pytest
import test_wire as wire_tests
from envoy.service.discovery.v3 import discovery_pb2 as pb
from google.protobuf import any_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_wire import _varint, delta_responses, responses, split_fields, unknown_fields
from twins import Cores

from xdsfast import wire

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"

FIELDS = {
    False: ("type_url", "version_info", "nonce", "resource_count"),
    True: ("type_url", "system_version_info", "nonce", "resource_count", "removed_count"),
}

Outcome = tuple[object, ...]


@pytest.fixture
def core(twins: Cores) -> ModuleType:
    """The peeker of each kind (the ``twins`` fixture: tests/twins.py)."""
    return twins.core


def record(field: int, body: bytes) -> bytes:
    """One length-delimited field."""
    return _varint(field << 3 | 2) + _varint(len(body)) + body


def whole(core: ModuleType, delta: bool, data: bytes) -> Outcome:
    """What the whole-message peeker makes of ``data``: its class and fields, or its error."""
    peek = core.peek_delta_response if delta else core.peek_response
    try:
        result = peek(data)
    except wire.WireError as exc:
        return ("WireError", str(exc))
    return (type(result), *(getattr(result, name) for name in FIELDS[delta]))


def pieces(data: bytes, cuts: list[int]) -> Iterator[bytes | bytearray | memoryview]:
    """``data`` cut at ``cuts``, as bytes, bytearray and memoryview slices in turn."""
    framed = memoryview(b"\x00\x00\x00\x00\x00" + data)  # a gRPC frame's view, as h2 gives
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        kind = i % 3
        if kind == 0:
            yield data[start:end]
        elif kind == 1:
            yield bytearray(data[start:end])
        else:
            yield framed[5 + start : 5 + end]


def streamed(
    core: ModuleType, delta: bool, data: bytes, cuts: list[int], known: bool
) -> tuple[Outcome, bool]:
    """Feed ``data`` cut at ``cuts``; the outcome, and whether an error came from feed."""
    scanner = core.ResponseScanner(delta, len(data) if known else None)
    try:
        for chunk in pieces(data, cuts):
            scanner.feed(chunk)
    except wire.WireError as exc:
        with pytest.raises(wire.WireError) as again:  # errors stick
            scanner.finish()
        assert str(again.value) == str(exc)
        return ("WireError", str(exc)), True
    try:
        result = scanner.finish()
    except wire.WireError as exc:
        return ("WireError", str(exc)), False
    assert scanner.fed == len(data)
    return (type(result), *(getattr(result, name) for name in FIELDS[delta])), False


def assert_same(core: ModuleType, delta: bool, data: bytes, cuts: list[int]) -> None:
    """Told the length or not, any split ends as the whole-message peeker does."""
    expected = whole(core, delta, data)
    for known in (False, True):
        got, in_feed = streamed(core, delta, data, cuts, known)
        assert got == expected, (known, data, cuts)
        # Told the length, the scanner raises every error the bytes prove while fed
        # (UTF-8 is the one exception: only the last occurrence of a string counts).
        if known and got[0] == "WireError" and "string field" not in str(got[1]):
            assert in_feed, (data, cuts)


def every_byte(data: bytes) -> list[int]:
    return list(range(1, len(data)))


# -- hand-built cases ---------------------------------------------------------------------


def test_result_classes_and_fields(core: ModuleType) -> None:
    resources = [any_pb2.Any(type_url=CDS, value=b"c" * size) for size in (10, 300, 70000)]
    data = pb.DiscoveryResponse(
        version_info="v1", resources=resources, type_url=CDS, nonce="n1"
    ).SerializeToString()
    scanner = core.ResponseScanner(False, len(data))
    for chunk in pieces(data, list(range(0, len(data), 16384))):
        scanner.feed(chunk)
    got = scanner.finish()
    assert isinstance(got, core.ResponsePeek)
    assert (got.type_url, got.version_info, got.nonce, got.resource_count) == (CDS, "v1", "n1", 3)
    assert scanner.first_resource_type == CDS

    delta = pb.DeltaDiscoveryResponse(
        system_version_info="s", type_url=LDS, nonce="n2", removed_resources=["a", "b"]
    )
    delta.resources.add(name="l", version="1").resource.type_url = LDS
    data = delta.SerializeToString()
    scanner = core.ResponseScanner(delta=True)
    scanner.feed(data)
    got = scanner.finish()
    assert isinstance(got, core.DeltaResponsePeek)
    assert (got.type_url, got.system_version_info, got.nonce) == (LDS, "s", "n2")
    assert (got.resource_count, got.removed_count) == (1, 2)
    assert scanner.first_resource_type == LDS


def test_exported_by_wire(core: ModuleType) -> None:
    assert wire.ResponseScanner.__module__.startswith("xdsfast._core")
    assert core.STRING_LIMIT == wire.STRING_LIMIT == 4096


def test_empty_message(core: ModuleType) -> None:
    for delta in (False, True):
        assert_same(core, delta, b"", [])
        scanner = core.ResponseScanner(delta, 0)
        scanner.feed(b"")
        assert scanner.finish().nonce == ""
        assert scanner.first_resource_type is None


MALFORMED = wire_tests.MALFORMED | {  # the whole-message peeker's cases, and the scanner's own
    "huge resource length": b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\x01ab",
    "invalid UTF-8 in nonce, then a valid one": b"*\x02\xc3\x28*\x01n",
    "valid nonce, then invalid UTF-8": b"*\x01n*\x02\xc3\x28",
    "ten-byte varint at the end": b"\x18" + b"\x80" * 10,
    "first resource runs past the end": b"\x12\x05\x0a\x01t",
    "first resource's varint runs past the end": b"\x12\x03\x0a\x01",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_malformed_ends_alike(core: ModuleType, delta: bool, data: bytes) -> None:
    assert_same(core, delta, data, [])
    assert_same(core, delta, data, every_byte(data))


def test_errors_the_bytes_prove_come_early(core: ModuleType) -> None:
    # Told the length, a field longer than the rest is an error as soon as its length is fed.
    scanner = core.ResponseScanner(False, 400)
    with pytest.raises(wire.WireError, match="length past the end"):
        scanner.feed(b"\x0a\xff\x05")
    # A bad wire type needs no length.
    scanner = core.ResponseScanner(True)
    scanner.feed(b"\x0a\x01v")
    with pytest.raises(wire.WireError, match="invalid wire type 7"):
        scanner.feed(b"\x0f")
    with pytest.raises(wire.WireError, match="invalid wire type 7"):
        scanner.feed(b"")  # and it sticks


def test_length_is_enforced(core: ModuleType) -> None:
    scanner = core.ResponseScanner(False, 3)
    with pytest.raises(ValueError, match="fed past"):
        scanner.feed(b"\x0a\x01v\x0a")
    scanner.feed(b"\x0a\x01")  # the refused chunk was not read
    with pytest.raises(wire.WireError, match="length past the end"):
        scanner.finish()
    scanner = core.ResponseScanner(False, 6)
    scanner.feed(b"\x0a\x01v")
    with pytest.raises(wire.WireError, match="message ended after 3 of its 6 bytes"):
        scanner.finish()
    with pytest.raises(ValueError):
        core.ResponseScanner(False, -1)


def test_last_one_wins_unknown_fields_and_groups(core: ModuleType) -> None:
    data = (
        b"*\x02n1"
        + b'"\x01a'
        + b"\x12\x00"
        + b"\xfb\x01"
        + b'"\x01x'
        + b"\x12\x01z"
        + b"\xfc\x01"
        + b'"\x01b'
        + b"\xf9\x01"
        + bytes(8)
        + b"\n\x02v9"
        + b"\x32\x01r"
    )
    for delta in (False, True):
        assert_same(core, delta, data, every_byte(data))
    scanner = core.ResponseScanner()
    scanner.feed(data)
    got = scanner.finish()
    assert (got.type_url, got.nonce, got.version_info, got.resource_count) == ("b", "n1", "v9", 1)


def test_string_limit(core: ModuleType) -> None:
    limit = core.STRING_LIMIT
    at_limit = record(5, b"n" * limit)
    over = record(5, b"n" * (limit + 1))
    for data, nonce in ((at_limit, "n" * limit), (over + record(5, b"ok"), "ok")):
        scanner = core.ResponseScanner()
        scanner.feed(data)
        assert scanner.finish().nonce == nonce
    scanner = core.ResponseScanner(False, len(over))
    scanner.feed(over)  # a later occurrence could still replace it
    with pytest.raises(wire.WireError, match=f"string field longer than {limit} bytes"):
        scanner.finish()
    # An over-long first type is unreadable, not an error of the response's.
    data = record(2, record(1, b"t" * (limit + 1))) + record(4, b"T")
    scanner = core.ResponseScanner()
    scanner.feed(data)
    assert scanner.finish().type_url == "T"
    assert scanner.first_resource_type == ""


# -- first_resource_type ------------------------------------------------------------------


def first_type_by_byte(core: ModuleType, delta: bool, data: bytes) -> list[str | None]:
    """first_resource_type after each byte, fed one at a time."""
    scanner = core.ResponseScanner(delta, len(data))
    seen = []
    for i in range(len(data)):
        scanner.feed(data[i : i + 1])
        seen.append(scanner.first_resource_type)
    scanner.finish()
    return seen


def test_first_type_is_known_once_its_bytes_are(core: ModuleType) -> None:
    body = record(1, CDS.encode()) + record(2, b"x" * 100000)
    data = record(1, b"v") + record(2, body) + record(2, record(1, b"other")) + record(4, b"T")
    seen = first_type_by_byte(core, False, data)
    end = data.index(CDS.encode()) + len(CDS)
    assert seen[: end - 1] == [None] * (end - 1)
    assert set(seen[end - 1 :]) == {CDS}

    # delta: Resource.version, then Resource.resource (value first, then type_url)
    resource = record(1, b"7") + record(2, record(2, b"cfg") + record(1, LDS.encode()))
    data = record(6, b"gone") + record(2, resource + record(3, b"name"))
    seen = first_type_by_byte(core, True, data)
    end = data.index(LDS.encode()) + len(LDS)
    assert seen[: end - 1] == [None] * (end - 1)
    assert set(seen[end - 1 :]) == {LDS}


@pytest.mark.parametrize(
    ("body", "known_after"),
    [
        (b"", 0),  # an empty Any
        (record(2, b"value only"), 12),  # no type URL: known at the end
        (record(1, b"\xc3\x28"), 4),  # not UTF-8
        (b"\x0e\x01", 1),  # wire type 6: known at the tag
        (b"\x0b", 1),  # a group still open at the end
        (b"\x0a\x05ab", 2),  # a type URL longer than the Any: known at its length
        (b"\x08\x80", 2),  # a varint running past the end
        (b"\x08", 1),  # a varint missing at the end
    ],
    ids=["empty", "no type", "not UTF-8", "wire type 6", "open group", "long", "varint", "tag"],
)
def test_first_type_unreadable_is_empty(core: ModuleType, body: bytes, known_after: int) -> None:
    """An Any (SotW's resource; delta's resource's resource) with no readable type URL:
    first_resource_type becomes "" as soon as its bytes show it."""
    for delta in (False, True):
        resource = record(2, body) if delta else body
        data = record(2, resource) + record(4, CDS.encode()) + record(2, record(1, b"t"))
        start = len(record(2, resource)) - len(body)  # where the Any's body starts
        seen = first_type_by_byte(core, delta, data)
        known_at = start + known_after
        assert seen[: known_at - 1] == [None] * (known_at - 1)
        assert set(seen[known_at - 1 :]) == {""}
        assert_same(core, delta, data, every_byte(data))


def test_no_resource_no_first_type(core: ModuleType) -> None:
    data = pb.DiscoveryResponse(type_url=CDS, nonce="n").SerializeToString()
    assert set(first_type_by_byte(core, False, data)) == {None}


# -- property-based equivalence -----------------------------------------------------------

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def shuffled_responses(draw: st.DrawFn) -> tuple[bool, bytes]:
    """A (delta) response re-laid: records shuffled, singular ones repeated, unknown fields
    (groups too) mixed in."""
    delta = draw(st.booleans())
    strategy = delta_responses() if delta else responses()
    records = split_fields(draw(strategy).SerializeToString())
    for _ in range(draw(st.integers(0, 2))):
        records += split_fields(draw(strategy).SerializeToString())
    records += draw(st.lists(unknown_fields(), max_size=4))
    return delta, b"".join(draw(st.permutations(records)))


@st.composite
def cuts_of(draw: st.DrawFn, data: bytes) -> list[int]:
    """Where to cut: anywhere, or after every byte."""
    if draw(st.integers(0, 4)) == 0:
        return every_byte(data)
    return draw(st.lists(st.integers(0, len(data)), max_size=12))


@SETTINGS
@given(case=shuffled_responses(), data=st.data())
def test_equivalent_over_random_splits(
    core: ModuleType, case: tuple[bool, bytes], data: st.DataObject
) -> None:
    delta, message = case
    assert_same(core, delta, message, data.draw(cuts_of(message)))


@SETTINGS
@given(
    case=shuffled_responses(),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
    truncate=st.integers(0, 10**6),
    data=st.data(),
)
def test_mutated_equivalent_over_random_splits(
    core: ModuleType,
    case: tuple[bool, bytes],
    edits: list[tuple[int, int]],
    truncate: int,
    data: st.DataObject,
) -> None:
    delta, message = case
    mutated = bytearray(message)
    for where, value in edits:
        if mutated:
            mutated[where % len(mutated)] = value
    if mutated and truncate % 2:
        del mutated[truncate % len(mutated) :]
    assert_same(core, delta, bytes(mutated), data.draw(cuts_of(bytes(mutated))))


@SETTINGS
@given(raw=st.binary(max_size=120), delta=st.booleans(), data=st.data())
def test_raw_bytes_equivalent_over_random_splits(
    core: ModuleType, raw: bytes, delta: bool, data: st.DataObject
) -> None:
    assert_same(core, delta, raw, data.draw(cuts_of(raw)))


@st.composite
def first_resource_cases(draw: st.DrawFn) -> tuple[bool, bytes, str, int]:
    """A response whose first resource has its fields in any order, unknown ones too:
    (delta, bytes, its type URL, how many bytes must be fed to know it)."""
    delta = draw(st.booleans())
    type_url = draw(st.one_of(st.none(), st.text(max_size=60)))
    unknown = draw(st.lists(unknown_fields(), max_size=3))
    parts = [record(2, draw(st.binary(max_size=300))), *unknown]
    if type_url is not None:
        parts.append(record(1, type_url.encode()))
    parts = draw(st.permutations(parts))
    body = b"".join(parts)
    # Where the type URL's field ends, within the body.
    end = None
    if type_url is not None:
        index = parts.index(record(1, type_url.encode()))
        end = sum(len(p) for p in parts[: index + 1])
    if delta:  # the Any inside a Resource, among its other fields
        others = [record(1, b"v1"), record(3, b"name"), *draw(st.lists(unknown_fields()))]
        before = draw(st.integers(0, len(others)))
        head = b"".join(others[:before])
        if end is not None:
            end += len(head) + len(record(2, body)) - len(body)
        body = head + record(2, body) + b"".join(others[before:])
    resource = record(2, body)
    end = len(resource) if end is None else end + len(resource) - len(body)
    head = b"".join(
        draw(
            st.lists(
                st.sampled_from([record(1, b"v"), record(5, b"n"), record(4, CDS.encode())])
                | unknown_fields(),
                max_size=3,
            )
        )
    )
    tail = b"".join(draw(st.lists(st.sampled_from([record(2, b""), record(4, b"T")]))))
    return delta, head + resource + tail, type_url or "", len(head) + end


@SETTINGS
@given(case=first_resource_cases(), data=st.data())
def test_first_type_set_exactly_when_fed(
    core: ModuleType, case: tuple[bool, bytes, str, int], data: st.DataObject
) -> None:
    delta, message, type_url, known_at = case
    cuts = sorted(set(data.draw(cuts_of(message))) | {0, len(message)})
    scanner = core.ResponseScanner(delta, len(message))
    for start, end in itertools.pairwise(cuts):
        scanner.feed(message[start:end])
        assert scanner.first_resource_type == (type_url if end >= known_at else None)
    scanner.finish()
    parsed = (pb.DeltaDiscoveryResponse if delta else pb.DiscoveryResponse).FromString(message)
    first = parsed.resources[0]
    assert (first.resource if delta else first).type_url == type_url
    assert_same(core, delta, message, cuts)


# -- every truncation and corruption of real pushes ---------------------------------------


def real_pushes() -> list[tuple[bool, bytes]]:
    sotw = pb.DiscoveryResponse(
        version_info="2026-11-27T04:00:00Z/9",
        resources=[any_pb2.Any(type_url=CDS, value=b"c" * size) for size in (3, 200, 0, 129)],
        type_url=CDS,
        nonce="4f1c",
    )
    delta = pb.DeltaDiscoveryResponse(
        system_version_info="s9", type_url=LDS, nonce="n", removed_resources=["old"]
    )
    for size in (5, 140):
        delta.resources.add(name="l", version="2").resource.CopyFrom(
            any_pb2.Any(type_url=LDS, value=b"l" * size)
        )
    odd = (  # a group and a fixed64 at the top level, a group inside the first resource
        b"\x0b\x12\x01x\x0c" + record(2, b"\xfb\x01\xfc\x01" + record(1, b"t")) + b"\x09" + bytes(8)
    )
    return [
        (False, sotw.SerializeToString()),
        (True, delta.SerializeToString()),
        (False, odd),
        (True, odd),
    ]


@pytest.mark.parametrize("push", range(4))
def test_every_truncation(core: ModuleType, push: int) -> None:
    delta, data = real_pushes()[push]
    rng = random.Random(push)
    for cut in range(len(data) + 1):
        prefix = data[:cut]
        assert_same(core, delta, prefix, every_byte(prefix))
        assert_same(core, delta, prefix, [rng.randrange(cut + 1) for _ in range(3)])


@pytest.mark.parametrize("push", range(4))
def test_every_corruption(core: ModuleType, push: int) -> None:
    delta, data = real_pushes()[push]
    rng = random.Random(push)
    for where in range(len(data)):
        for value in (0x00, 0x0B, 0x0C, 0x12, 0x7F, 0x80, 0xFF):
            corrupted = bytearray(data)
            corrupted[where] = value
            cuts = [rng.randrange(len(data)) for _ in range(4)]
            assert_same(core, delta, bytes(corrupted), cuts)
    for _ in range(200):  # a few bytes at once
        corrupted = bytearray(data)
        for _ in range(rng.randint(2, 4)):
            corrupted[rng.randrange(len(data))] = rng.randrange(256)
        assert_same(core, delta, bytes(corrupted), every_byte(data))


# -- bounded memory -----------------------------------------------------------------------


def test_memory_stays_bounded(core: ModuleType) -> None:
    """A 50 MB push in 16 KiB chunks: the scanner holds under 64 KiB throughout."""
    resource = record(2, record(1, CDS.encode()) + record(2, b"c" * 4000))
    count = 50 * 2**20 // len(resource)
    data = (
        record(1, b"2026-11-27T04:00:00Z/1")
        + resource * count
        + record(4, CDS.encode())
        + record(5, b"nonce")
    )
    view = memoryview(data)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        scanner = core.ResponseScanner(False, len(data))
        for start in range(0, len(data), 16384):
            scanner.feed(view[start : start + 16384])
        got = scanner.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (got.resource_count, got.type_url, got.nonce) == (count, CDS, "nonce")
    assert len(data) > 50 * 10**6
    assert peak - before < 64 * 1024, peak - before
    assert sys.getsizeof(scanner) < 64 * 1024
