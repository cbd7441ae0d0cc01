"""The heartbeats that name a dead rank: every way a rank can stop, told apart in one
process (each "rank" is a Heartbeat on the same store), and a store whose host died."""

from __future__ import annotations

import gc

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
        "rank 4 stopped after a collective failed there too; "
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


def test_a_store_whose_host_died_is_named():
    server = _server()
    client = dist.TCPStore("127.0.0.1", server.port, is_master=False)
    beat = Heartbeat(client, 1, 2, host="rank 0, which hosts the job's store,", **FAST)
    del server  # rank 0's process, which runs the store, is gone
    gc.collect()
    assert beat.who_stopped().startswith("rank 0, which hosts the job's store, no longer answers")
    beat.close()
