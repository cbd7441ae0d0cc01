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
from .averaging import (
    Averager,
    AverageState,
    averaged_model,
    ema_avg_fn,
    ema_multi_avg_fn,
    swa_avg_fn,
    swa_lr,
    swa_multi_avg_fn,
    update_bn,
)
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
from .dp import DPAggregateState, dp_aggregate, dp_noise_key, make_dp_train_step
from .factored import AdafactorState, adafactor
from .guard import FiniteGuardState, all_finite, apply_if_finite, nonfinite_paths
from .lookahead import LookaheadState, lookahead, slow_params
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
    "AverageState",
    "Averager",
    "DPAggregateState",
    "EmptyState",
    "FiniteGuardState",
    "GradientTransformation",
    "LookaheadState",
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
    "averaged_model",
    "chain",
    "clip",
    "clip_by_global_norm",
    "constant_lr",
    "cosine_annealing_lr",
    "current_lr",
    "dp_aggregate",
    "dp_noise_key",
    "ema_avg_fn",
    "ema_multi_avg_fn",
    "exponential_lr",
    "freeze",
    "identity",
    "join_schedules",
    "lambda_lr",
    "linear_lr",
    "lookahead",
    "make_dp_train_step",
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
    "slow_params",
    "step_lr",
    "swa_avg_fn",
    "swa_lr",
    "swa_multi_avg_fn",
    "trace",
    "track_learning_rate",
    "update_bn",
]
