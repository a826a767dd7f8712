"""The latest NameTable from istiod, swapped in whole so no reader sees half a table."""

from __future__ import annotations

import asyncio

from xdsfast.nds_pb2 import NameTable


class DnsTable:
    """Holds the NameTable the relay consumed; the DNS server answers from it."""

    def __init__(self) -> None:
        self.table: NameTable | None = None
        self.version = ""
        self.updates = 0
        self._changed = asyncio.Event()

    @property
    def ready(self) -> bool:
        """True once a first table was applied (Istio gates pod readiness on it)."""
        return self.table is not None

    def update(self, table: NameTable, version: str) -> None:
        self.table = table
        self.version = version
        self.updates += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def hosts(self) -> dict[str, list[str]]:
        """Hostname -> IPs of the current table (empty before the first one)."""
        if self.table is None:
            return {}
        return {name: list(info.ips) for name, info in self.table.table.items()}

    async def wait_updates(self, count: int, timeout: float = 10.0) -> None:
        """Wait until at least ``count`` tables were applied (for tests and the demo)."""

        async def _wait() -> None:
            while self.updates < count:
                await self._changed.wait()

        await asyncio.wait_for(_wait(), timeout)
