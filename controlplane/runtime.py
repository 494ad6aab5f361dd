"""Instance runtimes: how the coordinator starts and stops control-function instances.

`TaskRuntime` runs each instance as objects on this event loop (the embedded default: cheap,
one process); `ProcessRuntime` runs each as its own OS process (`python -m
controlplane.instance KIND`), which is what lets instances use more than one core.
`controlplane.kube_runtime.KubernetesRuntime` has the same verbs over a Deployment's scale
subresource. Either way
an instance that dies is reported through `on_exit`, so the coordinator reassigns its
partition at once instead of waiting for missed heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable

from controlplane.elastic import ExitCallback, Instance
from controlplane.instance import CONFIG_ENV
from kernel.config import Config, dumps
from kernel.procs import ManagedProcess

log = logging.getLogger(__name__)


class TaskRuntime:
    """Each instance as objects on this loop; a factory builds a started-to-be instance
    with its own connected bus (controlplane/build.py)."""

    def __init__(self, factories: dict[str, Callable[[], Awaitable[Instance]]]) -> None:
        self.factories = factories
        self.running: dict[str, list[Instance]] = {k: [] for k in factories}
        self.on_exit: ExitCallback | None = None
        self._lock = asyncio.Lock()

    def kinds(self) -> list[str]:
        return list(self.factories)

    def instances(self, kind: str) -> list[str]:
        return [i.id for i in self.running.get(kind, [])]

    async def scale(self, kind: str, n: int) -> None:
        async with self._lock:
            group = self.running[kind]
            while len(group) < n:
                inst = await self.factories[kind]()
                await inst.start()
                group.append(inst)
                log.info("runtime: started %s %s (%d running)", kind, inst.id, len(group))
            while len(group) > n:
                inst = group.pop()  # the newest: the oldest have the warmest state
                await inst.stop()
                log.info("runtime: stopped %s %s (%d running)", kind, inst.id, len(group))

    async def kill(self, kind: str, instance: str) -> None:
        """Crash an instance: no goodbye, no drain; its NATS connection just drops."""
        group = self.running.get(kind, [])
        for inst in list(group):
            if inst.id == instance:
                group.remove(inst)
                crash = getattr(inst, "crash", None)
                await (crash() if crash is not None else inst.stop())
                if self.on_exit is not None:
                    self.on_exit(kind, instance)

    async def stop(self) -> None:
        for kind in list(self.running):
            group, self.running[kind] = self.running[kind], []
            for inst in reversed(group):
                try:
                    await inst.stop()
                except Exception:
                    log.exception("runtime: stopping %s %s failed", kind, inst.id)


class ProcessRuntime:
    """One OS process per instance (`python -m controlplane.instance KIND --id ID`), handed
    the whole `Config` as JSON in its environment, so it honours every setting."""

    def __init__(self, config: Config, *, kinds: list[str]) -> None:
        self.config = config
        self.running: dict[str, dict[str, ManagedProcess]] = {k: {} for k in kinds}
        self.on_exit: ExitCallback | None = None
        self._watchers: set[asyncio.Task[None]] = set()
        self._seq = 0
        # Ids unique across runtimes: a restarted coordinator's new instances must not take
        # the ids (and so the partitions, at their old epochs) of the ones that died with it.
        self._token = uuid.uuid4().hex[:4]
        self._lock = asyncio.Lock()

    def argv_for(self, kind: str, instance: str) -> list[str]:
        return [sys.executable, "-m", "controlplane.instance", kind, "--id", instance]

    def env(self) -> dict[str, str]:
        return {**os.environ, CONFIG_ENV: dumps(self.config)}

    def kinds(self) -> list[str]:
        return list(self.running)

    def instances(self, kind: str) -> list[str]:
        return list(self.running.get(kind, {}))

    async def scale(self, kind: str, n: int) -> None:
        async with self._lock:
            group = self.running[kind]
            while len(group) < n:
                self._seq += 1
                instance = f"{kind}-p{self._seq}-{self._token}"
                proc = await ManagedProcess.start(self.argv_for(kind, instance), name=instance,
                                                  env=self.env())
                group[instance] = proc
                task = asyncio.create_task(self._watch(kind, instance, proc))
                self._watchers.add(task)
                task.add_done_callback(self._watchers.discard)
            while len(group) > n:
                instance = sorted(group)[-1]
                proc = group.pop(instance)
                await proc.stop(timeout=5.0)

    async def _watch(self, kind: str, instance: str, proc: ManagedProcess) -> None:
        code = await proc.wait()
        if self.running.get(kind, {}).pop(instance, None) is not None:
            log.warning("runtime: %s %s exited with %s:\n%s", kind, instance, code, proc.tail(20))
            if self.on_exit is not None:
                self.on_exit(kind, instance)

    async def kill(self, kind: str, instance: str) -> None:
        proc = self.running.get(kind, {}).get(instance)
        if proc is not None and proc.pid:
            os.kill(proc.pid, signal.SIGKILL)

    async def stop(self) -> None:
        for kind in list(self.running):
            group, self.running[kind] = self.running[kind], {}
            await asyncio.gather(*(p.stop(timeout=5.0) for p in group.values()),
                                 return_exceptions=True)
        for task in list(self._watchers):
            task.cancel()
