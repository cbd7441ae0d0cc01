"""Helpers shared by tests (``from tests.helpers import ...``): small networks, the
torch.optim twins by name, Dynamo's counters, standard data files written on the fly."""

import contextlib
import gzip
import os
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch._dynamo.utils import counters

TORCH = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
    "adamax": torch.optim.Adamax,
    "adadelta": torch.optim.Adadelta,
    "asgd": torch.optim.ASGD,
    "rprop": torch.optim.Rprop,
    "adafactor": torch.optim.Adafactor,
    "muon": torch.optim.Muon,
}


class SmallBNNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> Linear on 1x8x8 inputs: the smallest CNN with BN state."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        # No conv bias before BatchNorm (as torchvision does): BN cancels it, so its true
        # gradient is 0 and in float32 only rounding noise, which Adam would amplify.
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4 * 6 * 6, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


@contextlib.contextmanager
def dynamo_counts() -> Iterator[dict[str, int]]:
    """Yield a dict that holds, on exit, the graphs compiled and graph breaks seen inside."""
    seen: dict[str, int] = {}
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    yield seen
    seen["graphs"] = counters["stats"]["unique_graphs"] - graphs
    seen["breaks"] = sum(counters["graph_break"].values()) - breaks


def interop_net(bias: bool = True) -> nn.Module:
    """The float64 4-5-2 MLP that the torch.optim interop tests train in both worlds."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5, bias), nn.Tanh(), nn.Linear(5, 2, bias)).double()


#: The one (inputs, targets) batch of the interop tests (mean squared error).
INTEROP_BATCH = (
    torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
    torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)),
)


def torch_mse_steps(net: nn.Module, torch_opt: torch.optim.Optimizer, n: int) -> None:
    """``n`` imperative steps of ``torch_opt`` on :data:`INTEROP_BATCH`."""
    x, y = INTEROP_BATCH
    for _ in range(n):
        torch_opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        torch_opt.step()


def write_idx(path, array, gz=False):
    """Write ``array`` (uint8) in the IDX format: magic, dims, big-endian sizes, bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb") as handle:
        handle.write(data)


def write_mnist(folder, n_train=20, n_test=10, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, gz=gz)
    return arrays


def write_image(image: torch.Tensor, path, **save_options) -> None:
    """Write a uint8 ``(1|3, H, W)`` tensor as the image file ``path`` with Pillow itself
    (the format from the suffix), not with the library's writer under test."""
    pixels = image.permute(1, 2, 0).numpy()
    Image.fromarray(pixels[:, :, 0] if image.shape[0] == 1 else pixels).save(path, **save_options)


CIFAR_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
               b"ship", b"truck"]  # fmt: skip


def _cifar_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows of 3072 bytes: class 0 reddish, class 1 bluish, plus noise (learnable)."""
    rows = rng.integers(0, 96, size=(len(labels), 3072), dtype=np.int64)
    rows[labels == 0, :1024] += 150  # red plane
    rows[labels == 1, 2048:] += 150  # blue plane
    return rows.astype(np.uint8)


def write_cifar(folder, per_batch=60, n_test=100, protocol=2, seed=0):
    """Seven files laid out like cifar-10-batches-py: dicts with bytes keys, as in the
    Python 2 originals, data (N, 3072) uint8, labels a list of ints."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        labels = rng.integers(0, 2, size=n)
        batch = {
            b"batch_label": f"{name} of 5".encode(),
            b"labels": [int(v) for v in labels],
            b"data": _cifar_images(labels, rng),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=protocol)
        written[name] = batch
    meta = {b"num_cases_per_batch": per_batch, b"label_names": CIFAR_NAMES, b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(meta, handle, protocol=protocol)
    return written


REPO = Path(__file__).resolve().parents[1]


def rank_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this checkout first on the path, one thread."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: Sequence[str], cwd, nproc: int = 2, timeout: float = 300) -> str:
    """``torchrun --standalone --nproc-per-node nproc -m functorch_diary.cli.distributed
    args``, as a user runs it; its stdout. A failure raises with torchrun's output (its
    workers' errors included: a bare exit status says nothing)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    cmd = [*launcher, str(nproc), "-m", "functorch_diary.cli.distributed", *args]
    done = subprocess.run(
        cmd, env=rank_env(), cwd=cwd, timeout=timeout, capture_output=True, text=True
    )
    if done.returncode:
        raise AssertionError(
            f"torchrun exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
        )
    return done.stdout


def torchrun_reference(steps: int, batch_size: int):
    """What ``cli.distributed`` trains with ``--optimizer adam --lr 0.01 --dtype float64``,
    in one process on the whole batches: the MLP's ``TrainState`` after ``steps`` steps."""
    import functorch_diary as fd
    from functorch_diary import data, models, optim

    model = models.mlp(in_features=64, hidden=(32,), num_classes=10)
    opt = optim.adam(0.01)
    ts = fd.init_train_state(model, opt, seed=0, dtype=torch.float64)
    step = fd.make_train_step(model, torch.nn.functional.cross_entropy, opt)
    for i in range(steps):
        ts, _ = step(ts, data.digits_batch(i, batch_size, 0, torch.float64))
    return ts


def start_ranks(script: Path, world_size: int, args: Sequence[str] = (), cwd=None):
    """``world_size`` processes of ``script`` with torchrun's variables (gloo on localhost),
    started at once; returns the ``Popen`` s (stdout/stderr piped, text)."""
    port = str(free_port())
    return [
        subprocess.Popen(
            [sys.executable, str(script), *args],
            env=rank_env(
                RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
        )
        for rank in range(world_size)
    ]


def run_ranks(
    script: Path, world_size: int, args: Sequence[str] = (), timeout: float = 120, cwd=None
):
    """Run :func:`start_ranks` to the end; raise with every rank's stderr if one fails.

    ``free_port`` releases its port before rank 0 binds it, so another test process may
    take it in between: a launch whose store could not bind (``EADDRINUSE``) is retried on
    a new port, up to twice."""
    for attempt in range(3):
        procs = start_ranks(script, world_size, args, cwd)
        outputs = []
        try:
            for proc in procs:
                outputs.append(proc.communicate(timeout=timeout))
        finally:
            for proc in procs:
                proc.kill()
        failed = [
            (r, p.returncode, err)
            for r, (p, (_, err)) in enumerate(zip(procs, outputs, strict=True))
            if p.returncode
        ]
        if not (failed and attempt < 2 and any("EADDRINUSE" in e for _, _, e in failed)):
            break
    if failed:
        raise AssertionError("\n".join(f"rank {r} exited {c}:\n{e[-3000:]}" for r, c, e in failed))
    return [out for out, _ in outputs]


def assert_survivors_name_the_dead_rank(
    procs, timeout_s: float, message: str, dead: int = 1, also: Sequence[str] = ()
) -> float:
    """Rank ``dead`` of ``procs`` dies (exit code 7); assert every other rank fails sooner
    than the collectives' timeout ``timeout_s`` (so from noticing the death, not from
    waiting it out) with ``DistributedError`` ``message`` (``{rank}`` filled in) naming
    ``dead`` as the rank that died, and the texts ``also``; return the seconds the last
    survivor took."""
    _, err_dead = procs[dead].communicate(timeout=300)
    died_at = time.monotonic()
    survivors = [rank for rank in range(len(procs)) if rank != dead]
    outputs = {}
    try:
        for rank in survivors:
            outputs[rank] = procs[rank].communicate(timeout=3 * timeout_s)
    finally:
        for proc in procs:
            proc.kill()
    waited = time.monotonic() - died_at
    assert procs[dead].returncode == 7, err_dead
    for rank in survivors:
        out, err = outputs[rank]
        assert procs[rank].returncode != 0 and "finished" not in out
        assert f"DistributedError: {message.format(rank=rank)}" in err, err[-3000:]
        for text in (f"rank {dead} died (no heartbeat", *also):
            assert text in err, err[-3000:]
    assert waited < timeout_s, f"the survivors took {waited:.1f}s to notice"
    return waited


def sharded_case(name: str):
    """``(model, optimizer, dtype, batches)`` of one sharded-vs-single-process case, named
    ``model-optimizer-dtype`` (e.g. ``"lenet-adamw-float64"``). The batches are the global
    ones, drawn from a seeded generator, the same in every process."""
    from functorch_diary import data, models, optim

    model_name, opt_name, dtype_name = name.split("-")
    dtype = getattr(torch, dtype_name)
    steps, batch = {"mlp": (3, 8), "lenet": (2, 8), "resnet18": (1, 4)}[model_name]
    model = {
        "mlp": lambda: models.mlp(in_features=64, hidden=(32,), num_classes=10),
        "lenet": lambda: models.lenet(num_classes=10),
        "resnet18": lambda: models.resnet18(num_classes=10),
    }[model_name]()
    optimizer = {
        "sgdm": lambda: optim.sgd(0.05, momentum=0.9),
        # Adam's first step is lr * g / (|g| + eps): for a gradient near eps the update
        # moves by lr / eps times the gradient's rounding, whoever computes it; eps 1e-4
        # keeps that gain at 10 instead of 1e5 (torch's default 1e-8).
        "adamw": lambda: optim.adamw(1e-3, weight_decay=0.01, eps=1e-4),
        # torch's param_groups with a schedule each, and a frozen leaf: the optimiser
        # selects leaves by path, and a rank's shards keep their paths.
        "groups": lambda: optim.multi_transform(
            {
                "body": optim.sgd(optim.step_lr(0.1, step_size=2, gamma=0.5), momentum=0.9),
                "head": optim.adamw(optim.cosine_annealing_lr(1e-2, T_max=3), eps=1e-4),
            },
            {"body": "net.1.*", "head": "net.3.*"},
        ),
        "frozen": lambda: optim.freeze(optim.adamw(1e-2, eps=1e-4), "net.1.bias"),
    }[opt_name]()
    shape = {"lenet": (1, 28, 28), "resnet18": (3, 8, 8)}.get(model_name)
    gen = torch.Generator().manual_seed(0)
    batches = [
        data.digits_batch(i, batch, 0, dtype)
        if shape is None
        else (
            torch.randn(batch, *shape, generator=gen, dtype=dtype),
            torch.randint(0, 10, (batch,), generator=gen),
        )
        for i in range(steps)
    ]
    return model, optimizer, dtype, batches


def sharded_tolerance(name: str) -> float:
    """The relative tolerance (of each leaf's scale: :func:`assert_close_to_scale`) of a
    :func:`sharded_case` against one process. MLP and LeNet: 1e-12 in float64. ResNet-18:
    its BatchNorm backward through synchronised statistics rounds apart from torch's
    fused kernel (by 1.5e-13 of a leaf's scale in one process already), and AdamW's first
    step divides by the gradients' size: measured up to 4e-11 on BatchNorm biases, which
    start at 0 (their scale is one step's size). float32: 3e-6 (LeNet AdamW's second
    moments reach 2.4e-6: squaring doubles a gradient's relative rounding)."""
    if name.endswith("float32"):
        return 3e-6
    return 1e-10 if name.startswith("resnet18") else 1e-12


def assert_close_to_scale(actual, expected, rtol: float) -> None:
    """``assert_trees_close`` leaf by leaf with ``atol = rtol * max|expected leaf|``: the
    rounding of a sum-heavy computation (a BatchNorm backward, a reduce-scatter) is
    relative to the leaf's scale, not to each entry (an entry near 0 has no digits left)."""
    from functorch_diary.testing import assert_trees_close
    from functorch_diary.tree import tree_flatten_with_paths

    pairs = zip(tree_flatten_with_paths(actual), tree_flatten_with_paths(expected), strict=True)
    for (path, a), (_, b) in pairs:
        floating = isinstance(b, torch.Tensor) and b.is_floating_point() and b.numel()
        atol = rtol * float(b.abs().max()) if floating else 0.0
        assert_trees_close({path: a}, {path: b}, rtol=rtol, atol=atol)
