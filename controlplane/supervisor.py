"""Keeps the servers `fnplane up` started running: when nats-server or redis-server dies,
it is started again on the same port with the same configuration (JetStream on disk, the
AOF), so every component's reconnect finds it where it was. A dependency that exited
uncleanly is restarted at once, then with a doubling back-off while it keeps failing, as a
kubelet restarts a crashing container. `down` says what is down right now, for readiness and
`fnplane status`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from kernel.procs import ManagedProcess
from kernel.tasks import TaskGroup

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.2
MAX_BACKOFF_S = 10.0


class Server(Protocol):
    process: ManagedProcess

    async def stop(self, timeout: float = 5.0) -> None: ...


@dataclass
class Watched:
    """One supervised server and how to start it again."""

    name: str
    server: Server
    restart: Callable[[], Awaitable[Server]]
    restarts: int = 0
    down_since: float | None = None
    last_exit: str = ""


@dataclass
class Supervisor:
    watched: dict[str, Watched] = field(default_factory=dict)
    tasks: TaskGroup = field(default_factory=lambda: TaskGroup("supervisor"))
    # Called with the new server after each successful restart (the stack keeps its own
    # references current through it).
    on_restart: Callable[[str, Server], None] | None = None

    def watch(self, name: str, server: Server,
              restart: Callable[[], Awaitable[Server]]) -> None:
        self.watched[name] = w = Watched(name, server, restart)
        self.tasks.spawn(self._keep(w), name=name)

    def down(self) -> dict[str, str]:
        """What is down now and why: empty when everything runs."""
        return {w.name: f"down for {time.time() - w.down_since:.1f}s ({w.last_exit})"
                for w in self.watched.values() if w.down_since is not None}

    async def _keep(self, w: Watched) -> None:
        while True:
            code = await w.server.process.wait()
            w.down_since, w.last_exit = time.time(), f"exited with code {code}"
            log.error("supervisor: %s exited with code %s; restarting it", w.name, code)
            backoff = FIRST_BACKOFF_S
            while True:
                try:
                    w.server = await w.restart()
                    break
                except Exception as exc:  # a start that fails is retried, never given up
                    w.last_exit = f"restart failed: {str(exc).splitlines()[0]}"
                    log.error("supervisor: restarting %s failed (again in %.1fs): %s",
                              w.name, backoff, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
            w.restarts += 1
            log.warning("supervisor: %s is back after %.1fs (restart %d)", w.name,
                        time.time() - w.down_since, w.restarts)
            w.down_since = None
            if self.on_restart is not None:
                self.on_restart(w.name, w.server)

    async def close(self) -> None:
        """Stop watching (before the servers are stopped on purpose)."""
        await self.tasks.close()
