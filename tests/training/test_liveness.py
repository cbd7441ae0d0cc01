"""The heartbeats that name a dead rank: every way a rank can stop, told apart in one
process (each "rank" is a Heartbeat on the same store), and a store whose host died."""

from __future__ import annotations

import gc
import time

import pytest
import torch
import torch.distributed as dist

from functorch_diary.training.liveness import Heartbeat

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)

FAST = {"period_s": 0.01, "wait_s": 0.2}


def _server() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def test_every_way_a_rank_stops_is_told_apart():
    store = _server()
    beats = [Heartbeat(store, rank, 6, **FAST) for rank in range(5)]  # rank 5 never starts
    survivor, alive, exited, dead, failed = beats
    exited.close()  # atexit after an error, or after fewer steps
    dead.close(exited=False)  # os._exit, SIGKILL, a segfault: no record
    failed.mark_failed()
    failed.close()
    assert survivor.who_stopped() == (
        "rank 3 died (no heartbeat for 0.2 s and no clean exit: killed or crashed); "
        "rank 2 exited (an error there, or it ran fewer steps); "
        "rank 4 saw a collective fail too; "
        "rank 5 never joined the heartbeat (it did not start with init_from_env)"
    )
    for beat in (survivor, alive):
        beat.close()


def test_two_dead_ranks_and_none():
    store = _server()
    beats = [Heartbeat(store, rank, 3, **FAST) for rank in range(3)]
    assert beats[0].who_stopped().startswith("every other rank is still alive: one is stuck")
    beats[1].close(exited=False)
    beats[2].close(exited=False)
    assert beats[0].who_stopped().startswith("ranks 1 and 2 died (no heartbeat")
    beats[0].close()


def test_what_a_rank_saw_before_the_store_s_host_went_names_the_dead_rank():
    # Without torchrun rank 0 hosts the store. Rank 2 dies; rank 0's collective fails,
    # it raises the alarm and exits, taking the store with it; rank 1's collective fails
    # only then: it names rank 2 from what it watched since the alarm.
    server = _server()
    clients = [dist.TCPStore("127.0.0.1", server.port, is_master=False) for _ in range(3)]
    host, survivor, dead = (Heartbeat(clients[rank], rank, 3, **FAST) for rank in range(3))
    survivor.host = "rank 0, which hosts the job's store,"
    dead.close(exited=False)
    host.mark_failed()
    time.sleep(0.3)  # rank 1's heartbeat watches for a while
    host.close()
    del server, clients  # rank 0's process, which ran the store, is gone
    gc.collect()
    said = survivor.who_stopped()
    assert said.startswith("rank 2 died (no heartbeat for 0."), said
    assert said.endswith(
        "rank 0 saw a collective fail too; rank 0, which hosts the job's store, no longer "
        "answers (DistNetworkError)"
    ), said
    survivor.close()


def test_a_store_gone_before_anything_was_seen_is_named():
    server = _server()
    beat = Heartbeat(dist.TCPStore("127.0.0.1", server.port, is_master=False), 1, 2, **FAST)
    beat.host = "rank 0, which hosts the job's store,"
    del server
    gc.collect()
    assert beat.who_stopped().startswith(
        "rank 0, which hosts the job's store, no longer answers (DistNetworkError), so it has"
    )
    beat.close()
