"""Pure, optax-shaped optimisers, schedules, masks, clipping and accumulation that match
``torch.optim`` step for step.

Example:
    >>> import torch
    >>> from functorch_diary import optim
    >>> schedule = optim.multistep_lr(0.1, milestones=[50_000, 75_000], gamma=0.1)
    >>> opt = optim.sgd(schedule, momentum=0.9, weight_decay=1e-4)
    >>> params = {"w": torch.ones(2)}
    >>> updates, opt_state = opt.update({"w": torch.ones(2)}, opt.init(params), params)
    >>> float(optim.current_lr(opt_state))
    0.1
"""

from .accumulate import AccumulateState, accumulate_gradients
from .adam_family import AdamaxState, NAdamState, RAdamState, adamax, nadam, radam
from .base import (
    EmptyState,
    GradientTransformation,
    apply_gradients,
    apply_updates,
    chain,
    identity,
)
from .classic import AdadeltaState, ASGDState, RpropState, adadelta, asgd, rprop
from .clipping import clip, clip_by_global_norm
from .factored import AdafactorState, adafactor
from .guard import FiniteGuardState, all_finite, apply_if_finite, nonfinite_paths
from .masking import MultiTransformState, freeze, masked, multi_transform, set_to_zero
from .optimizers import adagrad, adam, adamw, rmsprop, sgd
from .orthogonal import MuonState, muon
from .schedules import (
    constant_lr,
    cosine_annealing_lr,
    exponential_lr,
    join_schedules,
    lambda_lr,
    linear_lr,
    multistep_lr,
    polynomial_lr,
    step_lr,
)
from .transforms import (
    ScaleByAdamState,
    ScaleByLearningRateState,
    ScaleByRmsState,
    ScaleByRssState,
    ScaleByScheduleState,
    Schedule,
    TraceState,
    add_decayed_weights,
    current_lr,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    scale_by_rss,
    scale_by_schedule,
    trace,
    track_learning_rate,
)

__all__ = [
    "ASGDState",
    "AccumulateState",
    "AdadeltaState",
    "AdafactorState",
    "AdamaxState",
    "EmptyState",
    "FiniteGuardState",
    "GradientTransformation",
    "MultiTransformState",
    "MuonState",
    "NAdamState",
    "RAdamState",
    "RpropState",
    "ScaleByAdamState",
    "ScaleByLearningRateState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "ScaleByScheduleState",
    "Schedule",
    "TraceState",
    "accumulate_gradients",
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "add_decayed_weights",
    "all_finite",
    "apply_gradients",
    "apply_if_finite",
    "apply_updates",
    "asgd",
    "chain",
    "clip",
    "clip_by_global_norm",
    "constant_lr",
    "cosine_annealing_lr",
    "current_lr",
    "exponential_lr",
    "freeze",
    "identity",
    "join_schedules",
    "lambda_lr",
    "linear_lr",
    "masked",
    "multi_transform",
    "multistep_lr",
    "muon",
    "nadam",
    "nonfinite_paths",
    "polynomial_lr",
    "radam",
    "rmsprop",
    "rprop",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_rms",
    "scale_by_rss",
    "scale_by_schedule",
    "set_to_zero",
    "sgd",
    "step_lr",
    "trace",
    "track_learning_rate",
]
