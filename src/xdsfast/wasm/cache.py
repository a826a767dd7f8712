"""The on-disk Wasm module cache, laid out as Istio's: ``<dir>/<sha256(url)>/<sha256>.wasm``.

A module is fetched at most once per (URL, checksum) while it is cached; an entry
not used for ``WASM_MODULE_EXPIRY`` is deleted by the purge that runs every
``WASM_PURGE_INTERVAL``. Without a checksum in the config, the checksum last
fetched for the URL is used (pull policy IfNotPresent). With pull policy Always,
the module is fetched again whenever the plugin's resource version changes.
Concurrent requests for one URL share one download. The directory is created on
the first write, so an agent that never sees remote Wasm never touches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from xdsfast import log
from xdsfast.config import DEFAULT_WASM_MODULE_EXPIRY, DEFAULT_WASM_PURGE_INTERVAL
from xdsfast.periodic import Periodic
from xdsfast.wasm.fetch import FetchError, FetchSettings, fetch
from xdsfast.wasm.metrics import WasmMetrics

_log = log.scope("wasm")

Fetcher = Callable[[str, float, FetchSettings], Awaitable[bytes]]


class ChecksumMismatch(FetchError):
    """The downloaded module's sha256 is not the configured one."""


@dataclass
class _Entry:
    path: Path
    last_used: float


@dataclass(frozen=True)
class _Known:
    checksum: str
    resource_version: str


def module_path(directory: str | Path, url: str, checksum: str) -> Path:
    """Where the module of ``url`` with ``checksum`` lives (Istio's layout)."""
    return Path(directory) / hashlib.sha256(url.encode()).hexdigest() / f"{checksum}.wasm"


class ModuleCache:
    """Remote Wasm modules as local files."""

    def __init__(
        self,
        directory: str,
        settings: FetchSettings,
        metrics: WasmMetrics,
        *,
        expiry: float = DEFAULT_WASM_MODULE_EXPIRY,
        purge_interval: float = DEFAULT_WASM_PURGE_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        fetcher: Fetcher = fetch,
    ) -> None:
        self.directory = Path(directory)
        self.settings = settings
        self.metrics = metrics
        self.expiry = expiry
        self.clock = clock
        self.fetcher = fetcher
        self._entries: dict[tuple[str, str], _Entry] = {}
        # url -> the checksum last fetched for it, and for which resource version
        self._known: dict[str, _Known] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._purger = Periodic(purge_interval, self.purge)

    def __len__(self) -> int:
        return len(self._entries)

    async def get(
        self,
        url: str,
        checksum: str,
        *,
        timeout: float,
        pull_always: bool = False,
        resource_version: str = "",
    ) -> Path:
        """The local file of the module, fetching it if needed; raises FetchError."""
        lock = self._locks.setdefault(url, asyncio.Lock())
        async with lock:
            path = self._lookup(url, checksum, pull_always, resource_version)
            self.metrics.cache_lookups.inc_label("true" if path is not None else "false")
            if path is not None:
                return path
            return await self._fetch(url, checksum, timeout, resource_version)

    def _lookup(
        self, url: str, checksum: str, pull_always: bool, resource_version: str
    ) -> Path | None:
        known = self._known.get(url)
        if not checksum:
            if known is None:
                return None
            checksum = known.checksum
        if pull_always and (known is None or known.resource_version != resource_version):
            return None
        entry = self._entries.get((url, checksum))
        if entry is None:
            return None
        if not entry.path.is_file():  # removed behind our back: fetch again
            del self._entries[(url, checksum)]
            self._update_gauge()
            return None
        entry.last_used = self.clock()
        return entry.path

    async def _fetch(self, url: str, checksum: str, timeout: float, resource_version: str) -> Path:
        try:
            body = await self.fetcher(url, timeout, self.settings)
        except FetchError:
            self.metrics.remote_fetches.inc_label("download_failure")
            raise
        actual = await asyncio.to_thread(_sha256, body)
        if checksum and actual != checksum:
            self.metrics.remote_fetches.inc_label("checksum_mismatched")
            raise ChecksumMismatch(
                f"module downloaded from {url} has sha256 {actual}, not the configured {checksum}",
                retryable=False,
            )
        path = module_path(self.directory, url, actual)
        try:
            await asyncio.to_thread(_write, path, body)
        except OSError as exc:
            self.metrics.remote_fetches.inc_label("fetch_failure")
            raise FetchError(f"cannot write the module to {path}: {exc}") from None
        self.metrics.remote_fetches.inc_label("success")
        self._entries[(url, actual)] = _Entry(path, self.clock())
        self._known[url] = _Known(actual, resource_version)
        self._update_gauge()
        _log.info(
            "Wasm module downloaded and cached",
            extra=log.fields(url=url, sha256=actual, size=len(body), path=str(path)),
        )
        return path

    def purge(self) -> int:
        """Delete the entries unused for longer than the expiry; returns how many."""
        now = self.clock()
        expired = [k for k, e in self._entries.items() if now - e.last_used > self.expiry]
        for key in expired:
            entry = self._entries.pop(key)
            with contextlib.suppress(OSError):
                entry.path.unlink()
            with contextlib.suppress(OSError):
                entry.path.parent.rmdir()  # only when empty
            known = self._known.get(key[0])
            if known is not None and known.checksum == key[1]:
                del self._known[key[0]]
            _log.info("expired Wasm module removed", extra=log.fields(path=str(entry.path)))
        self._update_gauge()
        return len(expired)

    def start(self) -> None:
        """Purge periodically (in the running loop) until :meth:`stop`."""
        self._purger.start()

    async def stop(self) -> None:
        await self._purger.stop()

    def _update_gauge(self) -> None:
        self.metrics.cache_entries.value = float(len(self._entries))


def _sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _write(path: Path, body: bytes) -> None:
    """Write atomically: Envoy never sees a half-written module."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(body)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
