"""Pure, optax-shaped optimisers that match ``torch.optim`` step for step."""

from .base import (
    EmptyState,
    GradientTransformation,
    apply_updates,
    chain,
    identity,
)
from .optimizers import adam, sgd
from .transforms import (
    ScaleByAdamState,
    ScaleByLearningRateState,
    Schedule,
    TraceState,
    add_decayed_weights,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "Schedule",
    "ScaleByAdamState",
    "ScaleByLearningRateState",
    "TraceState",
    "adam",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "identity",
    "scale_by_adam",
    "scale_by_learning_rate",
    "sgd",
    "trace",
]
