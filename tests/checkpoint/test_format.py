"""The checkpoint format: round trips, bit-for-bit resume in a new process, crash safety,
refusal of malicious, damaged and forged files, cross-device loading, temporary files
and permissions."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn

import functorch_diary as fd
from functorch_diary import checkpoint, optim
from functorch_diary.checkpoint.format import CheckpointError
from functorch_diary.optim.guard import FiniteGuardState, apply_if_finite

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    # The package's own checkout first, whatever the cwd and the installed copy.
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


def _adam_train_state() -> fd.TrainState:
    model = fd.Model(lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    opt = apply_if_finite(optim.adam(1e-2))
    ts = fd.init_train_state(model, opt, seed=3)
    step = fd.make_train_step(model, nn.functional.cross_entropy, opt)
    ts, _ = step(ts, (torch.randn(5, 3), torch.randint(0, 2, (5,))))
    return ts


def _assert_same(actual, expected) -> None:
    """Bit-for-bit equal trees with the same container types at every node."""
    assert type(actual) is type(expected)
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        assert torch.equal(actual, expected) or (actual.isnan() == expected.isnan()).all()
    elif isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            _assert_same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            _assert_same(a, e)
    else:
        assert actual == expected or (actual != actual and expected != expected)


def test_round_trip_train_state_bit_for_bit(tmp_path):
    ts = _adam_train_state()
    before = fd.tree.tree_clone(ts)
    checkpoint.save(tmp_path / "ts.ckpt", ts, metadata={"epoch": 4})
    fd.assert_trees_close(ts, before)  # saving does not touch the tree
    back = checkpoint.load(tmp_path / "ts.ckpt")
    _assert_same(back, ts)
    assert isinstance(back.opt_state, FiniteGuardState)
    assert checkpoint.read_metadata(tmp_path / "ts.ckpt") == {"epoch": 4}
    # Fresh tensors: no memory shared with each other.
    assert back.params["0.weight"].data_ptr() != back.params["0.bias"].data_ptr()


def test_round_trip_every_dtype_and_container(tmp_path):
    tree = {
        "dtypes": [
            torch.arange(6, dtype=d).reshape(2, 3)
            for d in (
                torch.float64,
                torch.float16,
                torch.bfloat16,
                torch.int32,
                torch.int8,
                torch.uint8,
            )
        ],
        "flags": torch.tensor([True, False]),
        "complex": torch.randn(3, dtype=torch.complex64),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
        "odict": OrderedDict([("z", 1), ("a", -2.5)]),
        "nested": ((None, "text", True), [float("inf"), float("nan")]),
        3: "int key",
    }
    checkpoint.save(tmp_path / "t.ckpt", tree)
    _assert_same(checkpoint.load(tmp_path / "t.ckpt"), tree)


class UserState(NamedTuple):
    a: torch.Tensor
    b: int


def test_user_namedtuple_needs_like_or_registration(tmp_path):
    checkpoint.save(tmp_path / "u.ckpt", UserState(torch.ones(2), 3))
    with pytest.raises(CheckpointError, match=r"UserState.*like=.*register_type"):
        checkpoint.load(tmp_path / "u.ckpt")
    like = UserState(torch.zeros(2), 0)
    _assert_same(checkpoint.load(tmp_path / "u.ckpt", like=like), UserState(torch.ones(2), 3))
    checkpoint.register_type(UserState)
    _assert_same(checkpoint.load(tmp_path / "u.ckpt"), UserState(torch.ones(2), 3))


def test_like_mismatch_names_the_path(tmp_path):
    ts = _adam_train_state()
    checkpoint.save(tmp_path / "ts.ckpt", ts)
    wrong_shape = ts._replace(params={**ts.params, "2.weight": torch.zeros(3, 4)})
    with pytest.raises(CheckpointError, match=r"params\.2\.weight.*\(2, 4\).*\(3, 4\)"):
        checkpoint.load(tmp_path / "ts.ckpt", like=wrong_shape)
    missing = ts._replace(params={k: v for k, v in ts.params.items() if k != "0.bias"})
    with pytest.raises(CheckpointError, match=r"at params: keys differ.*0\.bias"):
        checkpoint.load(tmp_path / "ts.ckpt", like=missing)
    other_opt = ts._replace(opt_state=optim.sgd(0.1).init(ts.params))
    with pytest.raises(CheckpointError, match=r"at opt_state"):
        checkpoint.load(tmp_path / "ts.ckpt", like=other_opt)


def _rewrite(path: Path, edit) -> None:
    """Re-pack ``path`` with ``edit(header_dict)`` applied and a valid checksum, as a
    forger (or a file written on another machine) would."""
    raw = path.read_bytes()
    header_len = struct.unpack_from("<Q", raw, 8)[0]
    header = json.loads(raw[16 : 16 + header_len])
    edit(header)
    new_header = json.dumps(header).encode()
    body = raw[:8] + struct.pack("<Q", len(new_header)) + new_header + raw[16 + header_len : -32]
    path.write_bytes(body + hashlib.sha256(body).digest())


def test_checkpoint_written_on_cuda3_loads_on_cpu(tmp_path):
    """Seed 004 error 9: the device a tensor was saved from never matters."""
    path = tmp_path / "gpu.ckpt"
    checkpoint.save(path, {"w": torch.arange(4.0)})

    def on_cuda3(header):
        header["tree"]["c"][0]["device"] = "cuda:3"

    _rewrite(path, on_cuda3)
    assert checkpoint.load(path)["w"].device == torch.device("cpu")
    assert checkpoint.load(path, device="cpu")["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_checkpoint_loads_on_cpu_and_back(tmp_path):
    path = tmp_path / "gpu.ckpt"
    checkpoint.save(path, {"w": torch.arange(4.0, device="cuda")})
    assert checkpoint.load(path)["w"].device.type == "cpu"
    like = {"w": torch.zeros(4, device="cuda")}
    assert checkpoint.load(path, like=like)["w"].device.type == "cuda"


class _Evil:
    """Unpickling this runs ``touch marker``: the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Evil(marker)))
    zipped = tmp_path / "evil.pth"
    torch.save({"weight": torch.ones(2), "payload": _Evil(marker)}, zipped)
    for path in (raw, zipped):
        with pytest.raises(CheckpointError, match="not a functorch-diary checkpoint"):
            checkpoint.load(path)
        with pytest.raises(CheckpointError, match=r"refused|cannot read"):
            checkpoint.load_torch_file(path)
    assert not marker.exists()
    # A plain state_dict saved on any device still loads through the same door.
    torch.save({"weight": torch.ones(2)}, tmp_path / "ok.pth")
    assert checkpoint.load_torch_file(tmp_path / "ok.pth")["weight"].tolist() == [1.0, 1.0]


def test_forged_header_cannot_name_arbitrary_types(tmp_path):
    path = tmp_path / "forged.ckpt"
    checkpoint.save(path, UserState(torch.ones(1), 1))

    def to_os_system(header):
        header["tree"]["name"] = "os.system"

    _rewrite(path, to_os_system)
    with pytest.raises(CheckpointError, match=r"os\.system"):
        checkpoint.load(path)


def test_truncated_and_corrupted_files_give_clear_errors(tmp_path):
    path = tmp_path / "ts.ckpt"
    checkpoint.save(path, _adam_train_state())
    raw = path.read_bytes()
    for cut in (0, 5, 16, 100, len(raw) // 2, len(raw) - 1):
        path.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match=r"truncated or corrupted|not a functorch-diary"):
            checkpoint.load(path)
    for position in (20, len(raw) // 2, len(raw) - 40):
        flipped = bytearray(raw)
        flipped[position] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match="truncated or corrupted"):
            checkpoint.load(path)
    with pytest.raises(CheckpointError, match="cannot read"):
        checkpoint.load(tmp_path / "missing.ckpt")


def test_failed_save_keeps_the_old_checkpoint_and_no_temp_file(tmp_path):
    path = tmp_path / "a.ckpt"
    checkpoint.save(path, {"w": torch.ones(2)})
    with pytest.raises(CheckpointError, match=r"at bad: cannot save a object"):
        checkpoint.save(path, {"w": torch.zeros(2), "bad": object()})
    assert checkpoint.load(path)["w"].tolist() == [1.0, 1.0]
    with pytest.raises(CheckpointError, match="metadata must be JSON-serialisable"):
        checkpoint.save(path, {"w": torch.zeros(2)}, metadata={"when": object()})
    assert checkpoint.load(path)["w"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_while_saving_never_leaves_an_unreadable_checkpoint(tmp_path):
    """A writer process is SIGKILLed at random moments, 24 times; after each kill the
    latest checkpoint must load and be one of the complete trees that were written."""
    path = tmp_path / "latest.ckpt"
    # Built before forking: the child only serialises (no torch kernels after fork).
    trees = [{"step": k, "w": torch.full((1 << 20,), float(k))} for k in (1, 2)]
    checkpoint.save(path, trees[0])
    rng = random.Random(0)
    kills_mid_write = 0
    for _ in range(24):
        pid = os.fork()
        if pid == 0:  # the writer: save, save, save... until killed
            try:
                for i in range(10**9):
                    checkpoint.save(path, trees[i % 2])
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.01, 0.12))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        tree = checkpoint.load(path)
        assert tree["step"] in (1, 2)
        assert torch.equal(tree["w"], trees[tree["step"] - 1]["w"])
        # Each save removes what the previous kills left, so at most this kill's is here.
        temporaries = list(tmp_path.glob(".latest.ckpt.*.tmp"))
        assert len(temporaries) <= 1, temporaries
        kills_mid_write += bool(temporaries)
    assert kills_mid_write > 0, "no kill landed during a write: the test proved nothing"
    checkpoint.save(path, trees[0])  # the next save leaves nothing behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.ckpt"]


_JOB = '''
"""Train a small BatchNorm+dropout net with a guarded Adam; resumable from a checkpoint."""
import sys
import torch
from torch import nn
import functorch_diary as fd
from functorch_diary import checkpoint, optim
from functorch_diary.optim.guard import apply_if_finite


def build():
    model = fd.Model(lambda: nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3)))
    opt = apply_if_finite(optim.adam(1e-2, weight_decay=1e-3))
    return model, opt, fd.make_train_step(model, nn.functional.cross_entropy, opt)


def batch(i):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def run(ts, step, stop):
    while int(ts.step) < stop:
        ts, _ = step(ts, batch(int(ts.step)))
    return ts


if __name__ == "__main__":
    source, target, stop, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    _, _, step = build()
    checkpoint.save(target, run(checkpoint.load(source), step, stop))
'''


def test_resume_in_a_new_process_is_bit_for_bit(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(_JOB)
    spec = importlib.util.spec_from_file_location("resume_job", script)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)

    model, opt, step = job.build()
    ts = fd.init_train_state(model, opt, seed=7)
    at_12 = job.run(ts, step, 12)
    checkpoint.save(tmp_path / "step12.ckpt", at_12)
    uninterrupted = job.run(at_12, step, 30)

    subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp_path / "step12.ckpt"),
            str(tmp_path / "step30.ckpt"),
            "30",
            str(torch.get_num_threads()),
        ],
        check=True,
        env=_env(),
        timeout=300,
    )
    resumed = checkpoint.load(tmp_path / "step30.ckpt")
    assert int(resumed.step) == 30
    fd.assert_trees_close(resumed, uninterrupted)  # rtol = atol = 0: bit for bit
    _assert_same(resumed, uninterrupted)


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    return int(child.stdout)


def test_a_save_removes_stale_temporaries_of_killed_saves_and_nothing_else(tmp_path):
    """Only files named like save()'s temporaries whose writer is gone (or that are over
    an hour old) go; a save in progress elsewhere, other files and symlinks stay."""
    dead, alive = _dead_pid(), os.getpid()
    stale = [f".run.ckpt.{dead}.0123abcd.tmp", f".other.ckpt.{dead}.fedcba98.tmp"]
    old = f".run.ckpt.{alive}.00000000.tmp"
    kept = [
        f".run.ckpt.{alive}.89abcdef.tmp",  # a save in progress (this process's pid)
        f".run.ckpt.{dead}.0123abcd.tmp.bak",  # not the pattern
        "run.ckpt.tmp",
        f".run.ckpt.{dead}.xyz.tmp",
        "notes.txt",
    ]
    for name in [*stale, old, *kept]:
        (tmp_path / name).write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(tmp_path / old, (two_hours_ago, two_hours_ago))
    target = tmp_path / "elsewhere.txt"
    target.write_text("not ours")
    link = f".link.ckpt.{dead}.11111111.tmp"
    (tmp_path / link).symlink_to(target)
    checkpoint.save(tmp_path / "run.ckpt", {"w": torch.ones(1)})
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([*kept, link, "elsewhere.txt", "run.ckpt"])
    assert target.read_text() == "not ours"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_file_permissions_follow_the_umask_like_torch_save(tmp_path, umask):
    previous = os.umask(umask)
    try:
        checkpoint.save(tmp_path / "ours.ckpt", {"w": torch.ones(1)})
        torch.save({"w": torch.ones(1)}, tmp_path / "torch.pth")
    finally:
        os.umask(previous)
    ours = (tmp_path / "ours.ckpt").stat().st_mode & 0o777
    theirs = (tmp_path / "torch.pth").stat().st_mode & 0o777
    assert ours == theirs == 0o666 & ~umask


def test_loaded_leaves_never_share_memory(tmp_path):
    base = torch.arange(8.0)
    checkpoint.save(tmp_path / "s.ckpt", {"a": base, "again": base, "view": base[2:5]})
    back = checkpoint.load(tmp_path / "s.ckpt")
    back["a"].add_(100)
    assert back["again"].tolist() == base.tolist() and back["view"].tolist() == [2.0, 3.0, 4.0]
    storages = {t.untyped_storage().data_ptr() for t in back.values()}
    assert len(storages) == 3


def test_save_refuses_what_the_reader_would_refuse(tmp_path):
    path = tmp_path / "x.ckpt"
    with pytest.raises(CheckpointError, match=r"at big: an int of more than 40 digits"):
        checkpoint.save(path, {"big": 10**40})
    with pytest.raises(CheckpointError, match=r"an integer of 41 digits"):
        checkpoint.save(path, {"w": torch.ones(1)}, metadata={"seed": 10**40})
    deep: list = []
    for _ in range(checkpoint.format.MAX_TREE_DEPTH + 1):
        deep = [deep]
    with pytest.raises(CheckpointError, match=r"nests deeper than 64"):
        checkpoint.save(path, deep)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    checkpoint.save(path, {"seed": 2**64 - 1, "neg": -(10**39)})  # 128-bit values fit
    assert checkpoint.load(path) == {"seed": 2**64 - 1, "neg": -(10**39)}
