"""Which rank died: a heartbeat per rank in the job's store, read when a collective fails.

gloo and NCCL report a lost peer by a socket address at best, so the rank that survives
cannot say which rank is gone. Each rank that joins with
:func:`~functorch_diary.training.distributed.init_from_env` starts a :class:`Heartbeat`: a
daemon thread that adds 1 to the rank's counter in the job's ``TCPStore`` (the one
torchrun's agent, or rank 0, hosts at ``MASTER_ADDR:MASTER_PORT``) every ``period_s``,
over its own connection. A rank also records, in the same store, that it exits cleanly
(``atexit``) or that a collective failed on it. When a collective fails, the survivor
reads the counters for up to ``wait_s``: a rank whose counter stands still and that left
no record died (killed, crashed, out of memory, ``os._exit``); a rank that still beats is
alive, but stuck or running another collective. Where a rank hosts the store (rank 0,
launched without torchrun), every rank also watches the others once a collective failed
somewhere (the failing rank raises an alarm in the store), so a rank whose own collective
fails only later, when rank 0 has exited and taken the store with it, still knows.

Example (one process plays rank 0 of 2; rank 1 never started):
    >>> import torch.distributed as dist
    >>> from functorch_diary.training.liveness import Heartbeat
    >>> store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    >>> beat = Heartbeat(store, rank=0, world_size=2, period_s=0.01, wait_s=0.05)
    >>> beat.who_stopped()
    'rank 1 never joined the heartbeat (it did not start with init_from_env)'
    >>> beat.close()
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
from datetime import timedelta

import torch.distributed as dist

__all__ = ["Heartbeat", "current", "start"]

_current: Heartbeat | None = None
_generation = 0  # one key space per process group: every rank joins them in the same order


def _ranks(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(map(str, ranks[:-1])) + f" and {ranks[-1]}"


class Heartbeat:
    """This rank's heartbeat in ``store``, and the reading of every other rank's.

    Args:
        store: the job's store (a client of its own: the thread uses it every
            ``period_s``, and a collective blocked on a shared client would stop it).
        rank, world_size: this rank and the number of ranks.
        period_s: how often the counter moves.
        wait_s: how long a counter must stand still for its rank to count as stopped.
        host: who hosts the store, named when it stops answering.
        prefix: the key space (one per process group of a job).
        watch: after an alarm, read every other rank's records each period (3 store
            reads per rank), in case the store's host exits; needless when it outlives
            the ranks (torchrun's agent), and costly with thousands of ranks.
    """

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        *,
        period_s: float = 0.25,
        wait_s: float = 2.0,
        host: str = "the job's store",
        prefix: str = "functorch_diary/liveness/0/",
        watch: bool = True,
    ):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.period_s, self.wait_s, self.host, self.prefix = period_s, wait_s, host, prefix
        self._others = [r for r in range(world_size) if r != rank]
        # What this rank saw of the others, once some rank raised the alarm: each one's
        # counter, since when it stood at that value, whether it ever moved, its records.
        self._lock = threading.Lock()
        self._seen: dict[int, dict] = {}
        self._last_seen: float | None = None
        self._watch, self._watching = watch, False
        self._stop = threading.Event()
        self._add("beat", rank, 1)  # registered before init_from_env returns
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def _add(self, kind: str, rank: int | None, amount: int) -> int:
        # add() never blocks on a missing key (get() would wait out the store's timeout).
        key = f"{self.prefix}{kind}" + ("" if rank is None else f"/{rank}")
        return int(self.store.add(key, amount))

    def _run(self) -> None:
        # Once a rank raised the alarm, every rank also watches the others: if the store's
        # host (rank 0, without torchrun) exits after its own failure before this rank's
        # collective fails, who_stopped() still has what this rank saw until then.
        while not self._stop.wait(self.period_s):
            try:
                self._add("beat", self.rank, 1)
                if self._watching or (self._watch and self._add("alarm", None, 0)):
                    self._watching = True
                    self._observe()
            except Exception:  # the store's host is gone: nobody is left to tell
                return

    def _observe(self) -> None:
        now = time.monotonic()
        counts = {
            r: (self._add("beat", r, 0), self._add("failed", r, 0), self._add("exit", r, 0))
            for r in self._others
        }
        with self._lock:
            for r, (beat, failed, exited) in counts.items():
                seen = self._seen.setdefault(r, {"beat": beat, "since": now, "moved": False})
                if beat != seen["beat"]:
                    seen.update(beat=beat, since=now, moved=True)
                seen.update(failed=failed > 0, exited=exited > 0)
            self._last_seen = now

    def _stood(self, r: int) -> float:
        return self._last_seen - self._seen[r]["since"]

    def _undecided(self, r: int, began: float) -> bool:
        seen = self._seen[r]
        beating = seen["moved"] and seen["since"] >= began  # moved while we looked
        known = seen["failed"] or seen["beat"] == 0 or beating
        return not known and self._stood(r) < self.wait_s

    def mark_failed(self) -> None:
        """Record that a collective failed here (so this rank's end is not taken for a
        death), and raise the alarm: from now on every rank watches the others."""
        with contextlib.suppress(Exception):  # the store's host is gone: who_stopped() says so
            self._add("failed", self.rank, 1)
            self._add("alarm", None, 1)

    def close(self, exited: bool = True) -> None:
        """Stop beating; with ``exited``, record a clean exit."""
        self._stop.set()
        self._thread.join(timeout=2 * self.period_s + 1)
        if exited:
            with contextlib.suppress(Exception):  # the store's host is gone: no one reads it
                self._add("exit", self.rank, 1)

    def who_stopped(self) -> str:
        """Which other ranks stopped, and how, in words: watches them for up to ``wait_s``
        (less when every one is accounted for), or says what it saw before the store's
        host stopped answering."""
        # A silent rank is decided once it stood still for wait_s between two readings;
        # the deadline only guards against readings that take long themselves.
        began = time.monotonic()
        deadline = began + self.wait_s + 4 * self.period_s
        try:
            while True:
                self._observe()
                with self._lock:
                    pending = [r for r in self._others if self._undecided(r, began)]
                if not pending or time.monotonic() >= deadline:
                    break
                time.sleep(self.period_s)
        except Exception as exc:
            gone = f"{self.host} no longer answers ({type(exc).__name__})"
            with self._lock:
                if self._last_seen is None:
                    return f"{gone}, so it has probably died"
                # Four missed beats, as seen before the store went, are a stop.
                return self._describe(4 * self.period_s, gone)
        with self._lock:
            return self._describe(self.wait_s, None)

    def _describe(self, threshold: float, gone: str | None) -> str:
        seen = self._seen
        failed = [r for r in self._others if seen[r]["failed"]]
        never = [r for r in self._others if r not in failed and seen[r]["beat"] == 0]
        stopped = [
            r for r in self._others
            if r not in failed + never and self._stood(r) >= threshold
        ]  # fmt: skip
        exited = [r for r in stopped if seen[r]["exited"]]
        dead = [r for r in stopped if r not in exited]
        parts = []
        if dead:
            quiet = min(self._stood(r) for r in dead)
            parts.append(
                f"{_ranks(dead)} died (no heartbeat for {quiet:.1f} s and no clean exit: "
                "killed or crashed)"
            )
        if exited:
            parts.append(f"{_ranks(exited)} exited (an error there, or it ran fewer steps)")
        if failed:
            parts.append(f"{_ranks(failed)} saw a collective fail too")
        if never:
            parts.append(
                f"{_ranks(never)} never joined the heartbeat (it did not start with init_from_env)"
            )
        if gone:
            parts.append(gone)
        if not parts:
            return (
                "every other rank is still alive: one is stuck past the process group's "
                "timeout, or the ranks ran different collectives"
            )
        return "; ".join(parts)


def start(rank: int, world_size: int) -> Heartbeat:
    """This process's heartbeat in the store at ``MASTER_ADDR:MASTER_PORT`` (torchrun's
    variables); replaces the one of an earlier process group. Called by ``init_from_env``."""
    global _current, _generation
    if _current is not None:
        _current.close(exited=False)
    _generation += 1
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    # torchrun's agent keeps its store across restarts: one key space per restart.
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(address, port, is_master=False, timeout=timedelta(seconds=10))
    host = "torchrun's agent" if agent else "rank 0"
    _current = Heartbeat(
        store,
        rank,
        world_size,
        host=f"{host}, which hosts the job's store at {address}:{port},",
        prefix=f"functorch_diary/liveness/{restart}/{_generation}/",
        watch=not agent,  # the agent's store outlives every rank
    )
    return _current


def current() -> Heartbeat | None:
    """The heartbeat :func:`start` began in this process, if any."""
    return _current


@atexit.register
def _record_exit() -> None:
    if _current is not None:
        _current.close()
