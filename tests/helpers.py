"""Helpers shared by tests (``from tests.helpers import ...``): small networks, the
torch.optim twins by name, Dynamo's counters, standard data files written on the fly."""

import contextlib
import gzip
import pickle
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch._dynamo.utils import counters

TORCH = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
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
