"""functorch-diary: JAX-style, pure-functional training for PyTorch through ``torch.func``.

Models are pure functions over explicit parameter dicts, optimisers are optax-shaped
pairs of pure functions, and a training step is one pure function that can be compiled
as a single graph. The subpackages show the architecture:

- :mod:`~functorch_diary.model`: ``Model`` (``init``/``apply``), checks, reparametrisations;
- :mod:`~functorch_diary.optim`: optimisers, schedules, masks and wrappers;
- :mod:`~functorch_diary.training`: the step, GAN steps, ``fit``, distributed;
- :mod:`~functorch_diary.checkpoint`: the safe file format and torch interop;
- :mod:`~functorch_diary.zoo`: the model zoo: networks, layers, losses and style transfer;
- :mod:`~functorch_diary.data`: bundled and local datasets; :mod:`~functorch_diary.cli`.

Example:
    >>> import torch
    >>> import functorch_diary as fd
    >>> model = fd.models.mlp(in_features=4, hidden=(8,), num_classes=3)
    >>> ts = fd.init_train_state(model, fd.optim.adam(1e-2), seed=0)
    >>> step = fd.make_train_step(model, torch.nn.functional.cross_entropy, fd.optim.adam(1e-2))
    >>> ts, metrics = step(ts, (torch.randn(16, 4), torch.randint(0, 3, (16,))))
    >>> int(ts.step)
    1
"""

import importlib
from typing import Any

from . import checkpoint, data, func, model, optim, prng, training, tree
from .checkpoint import CheckpointError
from .model import LayerError, Model, State, TreeMismatchError, extract
from .optim import apply_if_finite
from .testing import assert_trees_close
from .training import (
    TrainState,
    guard_train_step,
    init_train_state,
    make_eval_step,
    make_train_step,
)
from .tree import Params

__version__ = "0.1.0"

# The zoo imports torchvision, which imports torch._dynamo, torch._inductor and sympy
# (seconds): it loads on first use of fd.zoo / fd.models / fd.losses, not on import.
_LAZY = {"zoo": ".zoo", "models": ".zoo.models", "losses": ".zoo.losses"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CheckpointError",
    "LayerError",
    "Model",
    "Params",
    "State",
    "TrainState",
    "TreeMismatchError",
    "apply_if_finite",
    "assert_trees_close",
    "checkpoint",
    "data",
    "extract",
    "func",
    "guard_train_step",
    "init_train_state",
    "losses",
    "make_eval_step",
    "make_train_step",
    "model",
    "models",
    "optim",
    "prng",
    "training",
    "tree",
    "zoo",
]
