"""Training: the one pure step, its compile policy, GAN steps, ensembles, projections, the
non-finite guard, ``fit``, data-parallel training with its dead-rank heartbeats
(``liveness``), and sharded training (``training.sharded``, imported on use: it loads
``torch.distributed.tensor``)."""

from . import distributed, ensemble, fit, gan, projections
from .guard import guard_train_step
from .step import TrainState, init_train_state, make_eval_step, make_train_step

__all__ = [
    "TrainState",
    "distributed",
    "ensemble",
    "fit",
    "gan",
    "guard_train_step",
    "init_train_state",
    "make_eval_step",
    "make_train_step",
    "projections",
]
