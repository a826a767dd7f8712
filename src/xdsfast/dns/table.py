"""The latest NameTable from istiod, and the DNS answers precomputed from it.

``update`` (called by the relay) keeps the NameTable and returns at once; the
answers are built in a worker thread and swapped in whole when ready, so the
relay never waits on a build and no query ever sees half a table.  Tables that
arrive while a build runs are coalesced: the next build takes the latest.

The answers are a dict from a question's wire bytes (lowercased name, type,
class) to a precomputed answer section: a local hit is one dict lookup, then a
header and the client's question joined in front of ready-made bytes.  Names
with several addresses get up to ``ROTATIONS`` precomputed orders (round-robin).  Answer
records name their owner with a pointer to the question (or spell out a CNAME
target in full), so an answer section fits any question it is joined to, which
is also what lets a wildcard entry answer for every name under it.
"""

from __future__ import annotations

import asyncio
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor

from xdsfast import log
from xdsfast.dns.names import Lookup, NameRules, build_lookup
from xdsfast.dns.wire import CLASS_IN, TTL, TYPE_A, TYPE_AAAA, TYPE_CNAME, NameEncoder
from xdsfast.nds_pb2 import NameTable

_log = log.scope("dns")

A_IN = struct.pack("!HH", TYPE_A, CLASS_IN)
AAAA_IN = struct.pack("!HH", TYPE_AAAA, CLASS_IN)
_POINTER_TO_QUESTION = b"\xc0\x0c"
_RR = struct.Struct("!HHIH")
ROTATIONS = 8  # precomputed orders per answer; more addresses rotate in steps

# One entry is one bytes object: the answer section's length L (2 bytes), the counts
# (QD AN NS AR, 8 bytes), then the answer section in each precomputed order (L bytes
# each).  A dict of bytes to bytes is invisible to the garbage collector, so even a
# 20k-host table adds nothing to the cost of collections (which hold the GIL).
Entry = bytes
Answers = dict[bytes, Entry]
ENTRY_HEADER = 10
MAX_SECTION = 65535 - 12 - 259  # what fits in a message after the header and question


def _entry(prefix: list[bytes], records: list[bytes]) -> Entry:
    """``prefix`` (a CNAME) + ``records`` (A/AAAA), the records in up to ROTATIONS orders."""
    size = sum(map(len, prefix)) + sum(map(len, records))
    while records and size > MAX_SECTION:
        size -= len(records.pop())
    n = len(records)
    head = struct.pack("!HHHHH", size, 1, len(prefix) + n, 0, 0)
    if n <= 1:
        return head + b"".join(prefix + records)
    steps = range(n) if n <= ROTATIONS else [i * n // ROTATIONS for i in range(ROTATIONS)]
    return head + b"".join(b"".join(prefix + records[i:] + records[:i]) for i in steps)


def sections(entry: Entry) -> list[bytes]:
    """The answer section of ``entry`` in each of its precomputed orders."""
    size = (entry[0] << 8) | entry[1]
    if size == 0:
        return [b""]
    return [entry[i : i + size] for i in range(ENTRY_HEADER, len(entry), size)]


_EMPTY = _entry([], [])


def _address_records(owner: bytes, rtype: int, addresses: tuple[bytes, ...]) -> list[bytes]:
    return [owner + _RR.pack(rtype, CLASS_IN, TTL, len(a)) + a for a in addresses]


def compile_answers(lookup: Lookup) -> Answers:
    """Every name x {A, AAAA} -> its answer; names that cannot be DNS names are skipped."""
    answers: Answers = {}
    encoder = NameEncoder()
    wires: dict[str, bytes] = {}
    per_entry: dict[int, tuple[Entry, Entry]] = {}  # a table entry's names share answers
    for name, addresses in lookup.addresses.items():
        wire = encoder.encode(name)
        if wire is None:
            continue
        wires[name] = wire
        pair = per_entry.get(id(addresses))
        if pair is None:
            pair = (_direct(addresses.v4, TYPE_A), _direct(addresses.v6, TYPE_AAAA))
            per_entry[id(addresses)] = pair
        answers[wire + A_IN] = pair[0]
        answers[wire + AAAA_IN] = pair[1]
    suffix = encoder.encode(lookup.suffix) if lookup.suffix else None
    for target in lookup.cnames.values():
        target_wire = wires.get(target)
        if target_wire is None or suffix is None:
            continue
        wire = target_wire[:-1] + suffix  # name == target + suffix
        if len(wire) > 255:
            continue
        addresses = lookup.addresses[target]
        answers[wire + A_IN] = _via_cname(target_wire, addresses.v4, TYPE_A)
        answers[wire + AAAA_IN] = _via_cname(target_wire, addresses.v6, TYPE_AAAA)
    return answers


def _direct(addresses: tuple[bytes, ...], rtype: int) -> Entry:
    if not addresses:
        return _EMPTY
    return _entry([], _address_records(_POINTER_TO_QUESTION, rtype, addresses))


def _via_cname(target: bytes, addresses: tuple[bytes, ...], rtype: int) -> Entry:
    """CNAME to ``target`` plus the target's records; empty if it has none of the family."""
    if not addresses:
        return _EMPTY
    cname = _POINTER_TO_QUESTION + _RR.pack(TYPE_CNAME, CLASS_IN, TTL, len(target)) + target
    return _entry([cname], _address_records(target, rtype, addresses))


def build(table: NameTable, rules: NameRules) -> Answers:
    """The answers for a whole NameTable under the proxy's rules."""
    return compile_answers(build_lookup(table.table, rules))


def _timed_build(table: NameTable, rules: NameRules) -> tuple[Answers | None, float]:
    start = time.perf_counter()
    try:
        answers: Answers | None = build(table, rules)
    except Exception:  # a bug must not take DNS down: keep serving the old answers
        _log.exception("cannot build DNS answers; keeping the previous ones")
        answers = None
    return answers, time.perf_counter() - start


class DnsTable:
    """Holds the NameTable the relay consumed and the answers the DNS server serves.

    ``table``, ``version`` and ``updates`` change as soon as the relay applies a
    push; ``answers`` (and so ``ready``) once the answers for it are built.
    """

    def __init__(self, rules: NameRules | None = None) -> None:
        self.table: NameTable | None = None
        self.version = ""
        self.updates = 0
        self.rules = rules or NameRules()
        self.answers: Answers | None = None
        self.answers_version = ""
        self.build_seconds = 0.0
        self._wanted = 0  # bumped by every table or rules change
        self._built = 0  # the _wanted value the current answers were built for
        self._building = False
        self._executor: ThreadPoolExecutor | None = None
        self._changed = asyncio.Event()

    @property
    def ready(self) -> bool:
        """True once answers for a first table are served (Istio gates pod readiness on it)."""
        return self.answers is not None

    def update(self, table: NameTable, version: str) -> None:
        """Take a new NameTable (from the relay): returns at once, answers follow."""
        self.table = table
        self.version = version
        self.updates += 1
        self._wanted += 1
        self._notify()
        self._schedule()

    def configure(self, rules: NameRules) -> None:
        """Set the proxy's rules (namespace, domain, search list); rebuilds if needed."""
        self.rules = rules
        if self.table is not None:
            self._wanted += 1
            self._schedule()

    def hosts(self) -> dict[str, list[str]]:
        """Hostname -> IPs of the current table (empty before the first one)."""
        if self.table is None:
            return {}
        return {name: list(info.ips) for name, info in self.table.table.items()}

    async def wait_updates(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` tables were applied and answers built for the latest."""

        async def _wait() -> None:
            while self.updates < count or self._built != self._wanted:
                await self._changed.wait()

        await asyncio.wait_for(_wait(), timeout)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # -- building -------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _schedule(self) -> None:
        if self._building:
            return  # the running build's completion starts the next one
        table = self.table
        assert table is not None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a plain call): build right here
            self._finish(self._wanted, self.version, *_timed_build(table, self.rules))
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="xdsfast-dns-build")
        self._building = True
        wanted, version = self._wanted, self.version
        future = self._executor.submit(_timed_build, table, self.rules)
        future.add_done_callback(
            lambda done: loop.call_soon_threadsafe(self._built_in_thread, done, wanted, version)
        )

    def _built_in_thread(
        self, done: Future[tuple[Answers | None, float]], wanted: int, version: str
    ) -> None:
        self._building = False
        if done.cancelled():
            return
        self._finish(wanted, version, *done.result())
        if self._built != self._wanted:
            self._schedule()

    def _finish(self, wanted: int, version: str, answers: Answers | None, seconds: float) -> None:
        if answers is not None:
            self.answers = answers  # the atomic swap: one reference assignment
            self.answers_version = version
            self.build_seconds = seconds
            _log.info(
                "DNS table applied",
                extra=log.fields(
                    version=version,
                    hosts=len(self.table.table) if self.table is not None else 0,
                    answers=len(answers),
                    build_ms=round(seconds * 1000, 2),
                ),
            )
        self._built = wanted
        self._notify()
