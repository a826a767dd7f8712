"""A callable run every N seconds in the running event loop, until stopped."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable


class Periodic:
    """Runs ``action`` every ``interval`` seconds once started (the first run one interval
    after :meth:`start`); :meth:`stop` cancels it and waits until it has ended."""

    def __init__(self, interval: float, action: Callable[[], object]) -> None:
        self.interval = interval
        self._action = action
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self._action()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
