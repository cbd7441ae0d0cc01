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
from .base import (
    EmptyState,
    GradientTransformation,
    apply_gradients,
    apply_updates,
    chain,
    identity,
)
from .clipping import clip, clip_by_global_norm
from .guard import FiniteGuardState, all_finite, apply_if_finite, nonfinite_paths
from .masking import MultiTransformState, freeze, masked, multi_transform, set_to_zero
from .optimizers import adagrad, adam, adamw, rmsprop, sgd
from .schedules import (
    ReduceLROnPlateauState,
    constant_lr,
    cosine_annealing_lr,
    cosine_annealing_warm_restarts,
    cyclic_lr,
    cyclic_momentum,
    exponential_lr,
    join_schedules,
    lambda_lr,
    linear_lr,
    multiplicative_lr,
    multistep_lr,
    one_cycle_lr,
    one_cycle_momentum,
    polynomial_lr,
    reduce_lr_on_plateau,
    report_metric,
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
    "AccumulateState",
    "EmptyState",
    "FiniteGuardState",
    "GradientTransformation",
    "MultiTransformState",
    "ReduceLROnPlateauState",
    "ScaleByAdamState",
    "ScaleByLearningRateState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "ScaleByScheduleState",
    "Schedule",
    "TraceState",
    "accumulate_gradients",
    "adagrad",
    "adam",
    "adamw",
    "add_decayed_weights",
    "all_finite",
    "apply_gradients",
    "apply_if_finite",
    "apply_updates",
    "chain",
    "clip",
    "clip_by_global_norm",
    "constant_lr",
    "cosine_annealing_lr",
    "cosine_annealing_warm_restarts",
    "current_lr",
    "cyclic_lr",
    "cyclic_momentum",
    "exponential_lr",
    "freeze",
    "identity",
    "join_schedules",
    "lambda_lr",
    "linear_lr",
    "masked",
    "multi_transform",
    "multiplicative_lr",
    "multistep_lr",
    "nonfinite_paths",
    "one_cycle_lr",
    "one_cycle_momentum",
    "polynomial_lr",
    "reduce_lr_on_plateau",
    "report_metric",
    "rmsprop",
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
