"""A task that does one piece of async work every N seconds until it is stopped."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


class Periodic:
    """Runs ``work()`` every ``interval_s`` on the running loop (first run after one interval)."""

    def __init__(self, interval_s: float, work: Callable[[], Awaitable[None]]) -> None:
        self.interval_s = interval_s
        self._work = work
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._work()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
