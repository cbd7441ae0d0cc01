"""Helpers shared by tests (``from tests.helpers import ...``): small networks, the
torch.optim twins by name, Dynamo's counters, standard data files written on the fly."""

import contextlib
import gzip
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
