"""The ECDS rewriter as the relay holds it: the real one is built with the first ECDS
response.  Most proxies never get one, and the cache, fetcher and Wasm protobuf code
(hashlib, pathlib, json_format, descriptors) cost ~1 MB of resident memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from xdsfast.engines import Mode
from xdsfast.wasm.types import EXTENSION_CONFIG

if TYPE_CHECKING:
    from xdsfast.wasm.convert import WasmRewriter


class DeferredRewriter:
    """A :class:`~xdsfast.intercept.Rewriter` for ECDS that builds its
    :class:`~xdsfast.wasm.convert.WasmRewriter` when first needed."""

    type_url = EXTENSION_CONFIG

    def __init__(self, build: Callable[[], WasmRewriter]) -> None:
        self._build = build
        self._rewriter: WasmRewriter | None = None
        self._purging = False

    @property
    def rewriter(self) -> WasmRewriter:
        """The real rewriter, built now if it was not yet."""
        if self._rewriter is None:
            self._rewriter = self._build()
            if self._purging:
                self._rewriter.cache.start()
        return self._rewriter

    @property
    def built(self) -> bool:
        return self._rewriter is not None

    async def rewrite(self, mode: Mode, data: bytes) -> bytes:
        return await self.rewriter.rewrite(mode, data)

    def start(self) -> None:
        """Purge expired modules periodically, from when there is a cache to purge."""
        self._purging = True
        if self._rewriter is not None:
            self._rewriter.cache.start()

    async def stop(self) -> None:
        self._purging = False
        if self._rewriter is not None:
            await self._rewriter.cache.stop()
