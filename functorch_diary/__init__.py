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

from . import init, models, optim, prng, tree
from .checks import TreeMismatchError
from .functional import Model, State, extract
from .testing import assert_trees_close
from .train import TrainState, init_train_state, make_eval_step, make_train_step
from .tree import Params

__version__ = "0.1.0"

__all__ = [
    "Model",
    "Params",
    "State",
    "TrainState",
    "TreeMismatchError",
    "assert_trees_close",
    "extract",
    "init",
    "init_train_state",
    "make_eval_step",
    "make_train_step",
    "models",
    "optim",
    "prng",
    "tree",
]
