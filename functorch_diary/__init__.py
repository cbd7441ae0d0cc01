"""functorch-diary: JAX-style, pure-functional training for PyTorch through ``torch.func``.

Models are pure functions over explicit parameter dicts, optimisers are optax-shaped
pairs of pure functions, and a training step is one pure function that can be compiled
as a single graph.

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

# ``distributed`` is left out on purpose: ``python -m functorch_diary.distributed`` (the
# torchrun entry point) must not find itself already imported. Import it explicitly.
from . import (
    checkpoint,
    data,
    diagnose,
    features,
    fit,
    func,
    gan,
    guard,
    init,
    layers,
    losses,
    models,
    optim,
    pretrained,
    prng,
    projections,
    reparam,
    style,
    tree,
)
from .checkpoint import CheckpointError
from .checks import TreeMismatchError
from .diagnose import LayerError
from .functional import Model, State, extract
from .guard import apply_if_finite, guard_train_step
from .testing import assert_trees_close
from .train import TrainState, init_train_state, make_eval_step, make_train_step
from .tree import Params

__version__ = "0.1.0"

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
    "diagnose",
    "extract",
    "features",
    "fit",
    "func",
    "gan",
    "guard",
    "guard_train_step",
    "init",
    "init_train_state",
    "layers",
    "losses",
    "make_eval_step",
    "make_train_step",
    "models",
    "optim",
    "pretrained",
    "prng",
    "projections",
    "reparam",
    "style",
    "tree",
]
