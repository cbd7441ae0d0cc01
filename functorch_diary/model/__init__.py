"""Models as pure functions: ``Model`` (init/apply over explicit params and state), leaf
checks, layer diagnosis, reparametrisations, feature taps, initialisers, weight loading."""

from . import checks, diagnose, features, init, pretrained, reparam
from .checks import LeafSpec, TreeMismatchError
from .core import Model, State, extract
from .diagnose import LayerError
from .reparam import Reparametrized

__all__ = [
    "LayerError",
    "LeafSpec",
    "Model",
    "Reparametrized",
    "State",
    "TreeMismatchError",
    "checks",
    "diagnose",
    "extract",
    "features",
    "init",
    "pretrained",
    "reparam",
]
