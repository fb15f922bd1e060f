"""Warm spares: worker processes started ahead of a spawn, so a spawn skips their slow start.

A worker's spawn spends about a second on the interpreter and its imports before it can load
anything (bench/coldstart.py: 0.92 s of a 1.13 s spawn to first token from the page cache). The
pool keeps one warm spare (services.worker.spare) per kind of worker it has started: the same
command (the install's python, or the pool's rbee-worker), engine, device and environment.
A spawn that matches takes the spare and sends it the worker's command line; the spare becomes
that worker in the same process. A spawn that finds none starts a process as before.

When: a spare for a key is started only after a worker of that key has been started (so an
idle pool holds none), and only after the spawn that used the key is over plus a short delay,
so its imports never compete for the CPU with the load and first requests of the worker just
spawned. At most `limit` spares are kept; the oldest is stopped for a newer one.

Which devices: `device_kinds` (RBEE_POOL_SPARE_DEVICE_KINDS, default cpu). A spare imports its
backend but loads nothing; whether importing a CUDA or Metal backend already holds GPU memory
has not been measured on such hardware, so those kinds are opt-in.

Spares are the pool's children like its workers: own session, PR_SET_PDEATHSIG, stopped when
the pool closes, and a spare whose stdin closes (the pool died) exits without starting.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from services.catalog.domain import DeviceKind
from services.worker.pool.process import LaunchSpec, LineWatch, WorkerProcess
from services.worker.spare import SPARE_FLAG
from services.worker.stdout_lines import SPARE_READY

logger = logging.getLogger(__name__)

# After the spawn that used a key is over, before a spare for it starts (see the module doc).
REFILL_DELAY_S = 2.0
SPARE_TAIL_LINES = 200
# A ready spare exits within milliseconds of the end of its input.
STOP_WAIT_S = 0.5


@dataclass(frozen=True)
class SpareKey:
    """What a spare must share with the worker it becomes."""

    command: tuple[str, ...]  # rbee-worker, or an install's python -m services.worker
    engine: str
    device: str  # the worker's --device value: cpu, cuda:0, mps
    environment: str  # a digest of the environment (it is fixed at exec)

    @classmethod
    def of(cls, command: Sequence[str], engine: str, device: str, env: dict[str, str]) -> SpareKey:
        digest = hashlib.sha256(
            "\0".join(f"{k}={v}" for k, v in sorted(env.items())).encode()
        ).hexdigest()
        return cls(tuple(command), engine, device, digest)


@dataclass
class _Spare:
    key: SpareKey
    process: WorkerProcess
    ready: LineWatch  # SPARE_READY seen: its imports are done
    watcher: asyncio.Task[None] | None = None

    def unwatch(self) -> None:
        self.ready.cancel()
        if self.watcher is not None:
            self.watcher.cancel()


class SpareWorkers:
    """The pool's warm spares (see the module doc). Use from the event loop thread."""

    def __init__(
        self,
        *,
        device_kinds: frozenset[DeviceKind],
        limit: int = 2,
        refill_delay: float = REFILL_DELAY_S,
    ) -> None:
        self._kinds = device_kinds
        self._limit = limit
        self._delay = refill_delay
        self._spares: dict[SpareKey, _Spare] = {}
        self._refills: dict[SpareKey, asyncio.Task[None]] = {}
        self._closed = False
        self._closing: asyncio.Task[None] | None = None

    def wanted(self, kind: DeviceKind) -> bool:
        """Whether workers on devices of `kind` get spares."""
        return self._limit > 0 and kind in self._kinds and not self._closed

    @property
    def ready_count(self) -> int:
        """Spares that have finished their imports and wait for a launch."""
        return sum(1 for spare in self._spares.values() if spare.ready.seen.is_set())

    def pids(self) -> list[int]:
        """The running spares' pids (for tests and diagnostics)."""
        return [s.process.pid for s in self._spares.values() if s.process.returncode is None]

    async def claim(self, key: SpareKey) -> WorkerProcess | None:
        """The running spare for `key`, now the caller's (who sends it a launch), else None.
        Cancels a refill of `key` that has not started yet."""
        refill = self._refills.pop(key, None)
        if refill is not None:
            refill.cancel()
        spare = self._spares.pop(key, None)
        if spare is None:
            return None
        spare.unwatch()
        if spare.process.returncode is not None:
            logger.info(
                "the warm spare for %s had exited (%s)", key.engine, spare.process.returncode
            )
            return None
        return spare.process

    def refill(self, key: SpareKey, kind: DeviceKind, env: dict[str, str]) -> None:
        """Start a spare for `key` after the refill delay, unless one exists or is coming."""
        if not self.wanted(kind) or key in self._spares or key in self._refills:
            return
        self._refills[key] = asyncio.get_running_loop().create_task(
            self._start_later(key, env), name=f"spare:{key.engine}:{key.device}"
        )

    async def _start_later(self, key: SpareKey, env: dict[str, str]) -> None:
        try:
            await asyncio.sleep(self._delay)
            if self._closed or key in self._spares:
                return
            while len(self._spares) >= self._limit:
                oldest = next(iter(self._spares))
                await self._stop(self._spares.pop(oldest))
            argv = [*key.command, SPARE_FLAG, "--engine", key.engine, "--device", key.device]
            try:
                process = await WorkerProcess.start(
                    LaunchSpec(argv=argv, env=env, stdin_pipe=True),
                    tail_lines=SPARE_TAIL_LINES,
                )
            except OSError as exc:
                logger.warning("cannot start a warm spare %s: %s", " ".join(argv), exc)
                return
            spare = _Spare(key=key, process=process, ready=process.watch_line(SPARE_READY))
            spare.watcher = asyncio.get_running_loop().create_task(
                self._watch(spare), name=f"spare-watch:{process.pid}"
            )
            self._spares[key] = spare
            logger.debug("warm spare %d started for %s on %s", process.pid, key.engine, key.device)
        finally:
            if self._refills.get(key) is asyncio.current_task():
                del self._refills[key]

    async def _watch(self, spare: _Spare) -> None:
        """Forget the spare (saying why, with its stderr) if it exits unclaimed."""
        code = await spare.process.wait()
        if self._spares.get(spare.key) is spare:
            del self._spares[spare.key]
            if not self._closed:
                logger.warning(
                    "the warm spare %d for %s exited with %s: %s",
                    spare.process.pid,
                    spare.key.engine,
                    code,
                    spare.process.stderr_tail_text(lines=5) or "no output",
                )

    async def _stop(self, spare: _Spare) -> None:
        spare.unwatch()
        # End of input first: the spare exits 0 by itself; SIGTERM only if it does not.
        spare.process.close_stdin()
        try:
            await asyncio.wait_for(spare.process.wait(), STOP_WAIT_S)
        except TimeoutError:  # still importing: its imports do not read stdin
            with contextlib.suppress(Exception):
                await spare.process.stop(grace=2.0)

    async def close(self) -> None:
        """Stop every spare and every pending refill (the pool is going away). Idempotent, and
        a cancelled caller does not cut the stopping short: a second call waits for the same
        work (the pool closes from its stop hook and from a watcher that the hook cancels)."""
        self._closed = True
        if self._closing is None:
            for task in self._refills.values():
                task.cancel()
            refills = list(self._refills.values())
            self._refills.clear()
            spares = list(self._spares.values())
            self._spares.clear()

            async def stop_all() -> None:
                await asyncio.gather(*refills, return_exceptions=True)
                await asyncio.gather(*(self._stop(s) for s in spares), return_exceptions=True)

            self._closing = asyncio.get_running_loop().create_task(stop_all(), name="spares:close")
        await asyncio.shield(self._closing)
