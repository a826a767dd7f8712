"""The latest NameTable from istiod, and the compiled name table the DNS proxy answers from.

``update`` (called by the relay) keeps the NameTable as its wire bytes (not
parsed: ``/debug/ndsz`` and ``hosts()`` decode an entry at a time, see
:mod:`xdsfast.dns.wiretable`) and returns at once; the name table is compiled
in a worker thread and swapped in whole when ready, so the relay never waits
on a build and no query ever sees half a table.  A table (or rules) arriving
while a build runs supersedes it: the running build is told to stop (a flag it
looks at every 1024 hosts, 1-3 ms of work; the compiled build's sort of the
hosts, 20-40 ms at 100k, is the longest stretch between two looks), nothing
of it is served, and the next build takes the latest, so a burst of pushes
costs about one full build (``superseded`` counts the builds stopped so).  A
build that finished before it saw the flag is served: it is newer than what is
served, and the latest is built next.

The compiled table (``xdsfast._dnstable``, or its pure-Python twin) is built
straight from the NameTable's wire bytes into flat buffers (names, addresses,
a hash index) with the GIL released, so the event loop keeps running while a
big table is built; replies are written per query (see ``_dnstable_py``).
"""

from __future__ import annotations

import asyncio
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple

from xdsfast import _ext, log
from xdsfast.dns.names import Cancelled, NameRules
from xdsfast.dns.wire import CLASS_IN, TYPE_A, TYPE_AAAA
from xdsfast.dns.wiretable import WireNameTable

if TYPE_CHECKING:  # protobuf loads with the first table, not at start
    from xdsfast.nds_pb2 import NameTable

if TYPE_CHECKING:  # both have the same API; the twin is the reference
    from xdsfast import _dnstable_py as _impl

    IMPLEMENTATION = "python"
else:
    _impl = _ext.load("_dnstable")
    IMPLEMENTATION = _ext.implementation("_dnstable")

CompiledTable = _impl.CompiledTable
ROTATIONS = _impl.ROTATIONS
accepted = _impl.accepted  # the compiled module: True if protobuf surely takes the bytes

_log = log.scope("dns")

A_IN = struct.pack("!HH", TYPE_A, CLASS_IN)
AAAA_IN = struct.pack("!HH", TYPE_AAAA, CLASS_IN)


def build(
    table: NameTable | bytes, rules: NameRules, cancel: bytearray | None = None
) -> CompiledTable:
    """The compiled table for a NameTable (parsed, or its wire bytes) under the rules.

    Encodings the compiled parser leaves to protobuf (repeated keys or values, which
    protobuf merges; unknown fields, which it keeps and the build drops) are re-encoded
    by protobuf first.  Raises ValueError if the bytes are no NameTable, and
    :class:`~xdsfast.dns.names.Cancelled` if ``cancel[0]`` was set (by another thread)
    before the build finished."""
    data = table if isinstance(table, bytes) else table.SerializeToString()
    compiled = _impl.build(data, rules, cancel)
    if compiled is None and not (cancel and cancel[0]):
        # fields a newer istiod may add are kept by protobuf: drop them
        from xdsfast.nds_pb2 import NameTable

        canonical = NameTable.FromString(data)
        canonical.DiscardUnknownFields()
        compiled = _impl.build(canonical.SerializeToString(), rules, cancel)
    if compiled is None:
        if cancel and cancel[0]:
            raise Cancelled
        raise ValueError("NameTable encoding not understood")
    return compiled


class _Built(NamedTuple):
    answers: CompiledTable | None  # None: the build failed, or was superseded
    seconds: float
    superseded: bool = False


def _timed_build(
    table: NameTable | bytes, rules: NameRules, cancel: bytearray | None = None
) -> _Built:
    start = time.perf_counter()
    try:
        return _Built(build(table, rules, cancel), time.perf_counter() - start)
    except Cancelled:
        return _Built(None, time.perf_counter() - start, superseded=True)
    except Exception:  # a bug must not take DNS down: keep serving the old answers
        _log.exception("cannot build the DNS name table; keeping the previous one")
        return _Built(None, time.perf_counter() - start)


class DnsTable:
    """Holds the NameTable the relay consumed and the compiled table the DNS server serves.

    ``table``, ``version`` and ``updates`` change as soon as the relay applies a
    push; ``answers`` (and so ``ready``) once the compiled table for it is built.
    The relay's tables are kept as wire bytes (:class:`WireNameTable`), not parsed.
    ``superseded`` counts builds stopped early for a newer table or rules.
    """

    def __init__(self, rules: NameRules | None = None) -> None:
        self.table: NameTable | WireNameTable | None = None
        self.version = ""
        self.updates = 0
        self.rules = rules or NameRules()
        self.answers: CompiledTable | None = None
        self.answers_version = ""
        self.build_seconds = 0.0
        self.superseded = 0
        self._wanted = 0  # bumped by every table or rules change
        self._built = 0  # the _wanted value the current answers were built for
        self._building = False
        self._cancel = bytearray(1)  # the running build's flag: set, it stops
        self._closed = False
        self._executor: ThreadPoolExecutor | None = None
        self._changed = asyncio.Event()

    @property
    def ready(self) -> bool:
        """True once answers for a first table are served (Istio gates pod readiness on it)."""
        return self.answers is not None

    def update(self, table: NameTable | bytes, version: str) -> None:
        """Take a new NameTable (from the relay: its wire bytes, already accepted by
        protobuf): returns at once, answers follow."""
        self.table = WireNameTable(table) if isinstance(table, bytes) else table
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
        if isinstance(self.table, WireNameTable):
            return self.table.hosts()
        return {name: list(info.ips) for name, info in self.table.table.items()}

    def stats(self) -> tuple[int, int, int]:
        """(hosts, names, bytes) of the compiled table served now; zeros before the first."""
        answers = self.answers
        if answers is None:
            return 0, 0, 0
        return answers.hosts, answers.names, answers.nbytes

    async def wait_updates(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` tables were applied and answers built for the latest."""

        async def _wait() -> None:
            while self.updates < count or self._built != self._wanted:
                await self._changed.wait()

        await asyncio.wait_for(_wait(), timeout)

    def close(self) -> None:
        self._closed = True
        self._cancel[0] = 1  # a running build stops: nobody will serve it
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # -- building -------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _schedule(self) -> None:
        if self._building:
            self._cancel[0] = 1  # superseded: its end (soon) starts the next build
            return
        if self._closed:
            return
        table = self.table
        assert table is not None
        source = table.wire if isinstance(table, WireNameTable) else table
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a plain call): build right here
            built = _timed_build(source, self.rules)
            self._finish(self._wanted, self.version, built.answers, built.seconds)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="xdsfast-dns-build")
        self._building = True
        wanted, version = self._wanted, self.version
        self._cancel = cancel = bytearray(1)
        future = self._executor.submit(_timed_build, source, self.rules, cancel)
        future.add_done_callback(
            lambda done: loop.call_soon_threadsafe(self._built_in_thread, done, wanted, version)
        )

    def _built_in_thread(self, done: Future[_Built], wanted: int, version: str) -> None:
        self._building = False
        if done.cancelled() or self._closed:
            return
        built = done.result()
        if built.superseded:  # nothing of it is served; the latest is built next
            self.superseded += 1
            _log.debug(
                "DNS table build superseded",
                extra=log.fields(version=version, build_ms=round(built.seconds * 1000, 2)),
            )
        else:
            self._finish(wanted, version, built.answers, built.seconds)
        if self._built != self._wanted:
            self._schedule()

    def _finish(
        self, wanted: int, version: str, answers: CompiledTable | None, seconds: float
    ) -> None:
        if answers is not None:
            self.answers = answers  # the atomic swap: one reference assignment
            self.answers_version = version
            self.build_seconds = seconds
            _log.info(
                "DNS table applied",
                extra=log.fields(
                    version=version,
                    hosts=answers.hosts,
                    names=answers.names,
                    table_bytes=answers.nbytes,
                    build_ms=round(seconds * 1000, 2),
                ),
            )
        self._built = wanted
        self._notify()
