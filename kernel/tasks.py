"""Background tasks with an owner (Kopf's `aiotasks`, in small): every task has a name, a
failure is logged with it instead of vanishing with an unawaited task, and `close()` gives
the running ones a bounded time to finish, then cancels and awaits the rest, so a stopped
component leaves nothing behind."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskGroup:
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def names(self) -> list[str]:
        return sorted(t.get_name() for t in self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self.owner}: task group closed; {name} not started")
        task = asyncio.create_task(coro, name=f"{self.owner}/{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s failed", task.get_name(), exc_info=exc)

    async def close(self, timeout: float = 0.0) -> None:
        """Idempotent: no new tasks; wait up to `timeout` for the running ones, cancel the
        rest and wait for them to unwind."""
        self._closed = True
        if not self._tasks:
            return
        if timeout > 0:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        late = set(self._tasks)
        while late:
            for task in late:
                task.cancel()
            # Cancel again if need be: on Python 3.11, asyncio.wait_for swallows a
            # cancellation that races its inner future's completion (a NATS reply arriving
            # at that instant), and the task carries on as if nothing happened.
            _, late = await asyncio.wait(late, timeout=1.0)
            if late:
                log.warning("%s: %d task(s) ignored cancellation; cancelling again",
                            self.owner, len(late))
