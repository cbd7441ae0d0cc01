"""Reparametrisations as ``Model`` transforms: spectral norm, weight norm, weight standardisation.

``spectral_norm(model, selector)`` returns a new :class:`~functorch_diary.Model` whose
``apply`` computes ``W / sigma(W)`` for every selected weight from the raw weight in
``params`` and the power-iteration vectors ``u``, ``v`` in ``state``. Nothing is a hook,
nothing is written in place: ``u`` and ``v`` come back in ``new_state`` (only when
``train=True``), so seed 000's hand-written ``SpectralNorm`` and its out-of-memory error
(the graph kept growing through ``self.u`` until ``.detach()`` was added) have no
counterpart here: ``u`` and ``v`` are plain state tensors computed from a detached
weight, and each step's graph dies with the step.

Keys are exactly those of the module after ``torch.nn.utils.parametrize``:

=========================  ==================================================  =======
reparametrisation          keys for a selected ``"<prefix>.<name>"``           tree
=========================  ==================================================  =======
spectral norm              ``<prefix>.parametrizations.<name>.original``       params
                           ``<prefix>.parametrizations.<name>.0._u``, ``._v``  state
weight norm                ``<prefix>.parametrizations.<name>.original0`` (g)  params
                           ``<prefix>.parametrizations.<name>.original1`` (v)  params
weight standardisation     ``<prefix>.parametrizations.<name>.original``       params
=========================  ==================================================  =======

so ``model.state_dict(params, state)`` loads into (and comes from) a module wrapped with
``torch.nn.utils.parametrizations.spectral_norm`` / ``weight_norm`` with no renaming.
(A 1-d weight under spectral norm is just ``W / ||W||`` and has no ``u``/``v``, as in torch.)

Example:
    >>> import torch
    >>> from torch import nn
    >>> from functorch_diary import Model
    >>> from functorch_diary.model import reparam
    >>> model = reparam.spectral_norm(Model(lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(),
    ...                                                        nn.Linear(8, 1))), "*.weight")
    >>> params, state = model.init(seed=0)
    >>> sorted(state)[:2]
    ['0.parametrizations.weight.0._u', '0.parametrizations.weight.0._v']
    >>> y, new_state = model.apply(params, state, torch.randn(3, 4), train=True)
    >>> new_state is state, model.apply(params, state, torch.randn(3, 4))[1] is state
    (False, True)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

from .. import _torch
from ..tree import Params, Selector, select
from .checks import LeafSpec, check_leaves
from .core import Model, State, seeded_cpu, tied_aliases

__all__ = [
    "Reparametrized",
    "WeightStandardization",
    "power_iteration",
    "spectral_norm",
    "spectral_normalize",
    "standardize_weight",
    "weight_norm",
    "weight_standardization",
]

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# --- pure functions ------------------------------------------------------------------------


def _weight_matrix(weight: Tensor, dim: int) -> Tensor:
    """``weight`` as a matrix with ``dim`` (the output dimension) as rows, as torch does."""
    if dim != 0:
        weight = weight.permute(dim, *(d for d in range(weight.dim()) if d != dim))
    return weight.flatten(1)


def power_iteration(
    weight_mat: Tensor, u: Tensor, v: Tensor, n_power_iterations: int, eps: float = 1e-12
) -> tuple[Tensor, Tensor]:
    """``n_power_iterations`` power-method steps: ``u <- Wv/|Wv|``, then ``v <- W^T u/|W^T u|``.

    The same operations, in the same order, as torch's ``_SpectralNorm._power_method``, so
    the results agree to the last bit. No gradient flows into ``u`` or ``v`` when
    ``weight_mat`` is detached (as :func:`spectral_normalize` passes it).

    Example:
        >>> import torch
        >>> w = torch.diag(torch.tensor([3.0, 1.0]))
        >>> u, v = power_iteration(w, torch.tensor([0.6, 0.8]), torch.tensor([0.6, 0.8]), 30)
        >>> torch.vdot(u, w @ v).item()
        3.0
    """
    for _ in range(n_power_iterations):
        u = F.normalize(torch.mv(weight_mat, v), dim=0, eps=eps)
        v = F.normalize(torch.mv(weight_mat.H, u), dim=0, eps=eps)
    return u, v


def spectral_normalize(
    weight: Tensor,
    u: Tensor,
    v: Tensor,
    *,
    train: bool,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``weight / sigma`` with ``sigma = u . (W v)``, after power iterations when ``train``.

    Gradients flow through ``weight`` in the numerator and in ``sigma``; ``u`` and ``v``
    are constants, exactly as in ``torch.nn.utils.parametrizations.spectral_norm``.

    Args:
        weight: the raw weight (at least 2-d).
        u, v: the current singular-vector estimates (lengths: ``weight.shape[dim]`` and the
            product of the other dimensions).
        train: run ``n_power_iterations`` first (training mode) or use ``u``, ``v`` as given.
        n_power_iterations, eps, dim: as in torch's ``spectral_norm``.

    Returns:
        ``(normalised weight, new u, new v)``; ``u`` and ``v`` are the inputs when not ``train``.

    Example:
        >>> import torch
        >>> w = torch.diag(torch.tensor([4.0, 2.0]))
        >>> w_sn, u, v = spectral_normalize(w, torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]),
        ...                                 train=False)
        >>> w_sn.diagonal().tolist()
        [1.0, 0.5]
    """
    weight_mat = _weight_matrix(weight, dim)
    if train:
        u, v = power_iteration(weight_mat.detach(), u, v, n_power_iterations, eps)
    sigma = torch.vdot(u, torch.mv(weight_mat, v))
    return weight / sigma, u, v


def standardize_weight(weight: Tensor, eps: float = 1e-5) -> Tensor:
    """Weight standardisation: per output channel, subtract the mean and divide by ``std + eps``.

    The operations of seed 004's ``Conv2d(weight_std=True)`` (from DeepLabv3): means
    taken one dimension at a time, the unbiased standard deviation, ``eps`` added to it.

    Example:
        >>> import torch
        >>> w = standardize_weight(torch.randn(4, 3, 3, 3), eps=0.0)
        >>> w.flatten(1).mean(1).abs().max() < 1e-6, w.flatten(1).std(1).sub(1).abs().max() < 1e-5
        (tensor(True), tensor(True))
    """
    mean = weight
    for d in range(1, weight.dim()):
        mean = mean.mean(dim=d, keepdim=True)
    centred = weight - mean
    std = centred.view(centred.size(0), -1).std(dim=1) + eps
    return centred / std.view(-1, *([1] * (weight.dim() - 1))).expand_as(centred)


class WeightStandardization(nn.Module):
    """The imperative twin: ``register_parametrization(conv, "weight", WeightStandardization())``.

    Example:
        >>> from torch import nn
        >>> from torch.nn.utils import parametrize
        >>> conv = parametrize.register_parametrization(nn.Conv2d(3, 4, 3), "weight",
        ...                                             WeightStandardization())
        >>> conv.weight.flatten(1).mean(1).abs().max().item() < 1e-6
        True
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, weight: Tensor) -> Tensor:
        return standardize_weight(weight, self.eps)


# --- the reparametrisations, one small class each -----------------------------------------


class _SpectralNormRule:
    """Spectral norm of one weight: init draws ``u``, ``v``; apply normalises."""

    param_suffixes = ("original",)

    def __init__(self, n_power_iterations: int, eps: float, dim: int) -> None:
        self.n_power_iterations, self.eps, self.dim = n_power_iterations, eps, dim

    def state_suffixes(self, ndim: int) -> tuple[str, ...]:
        return ("0._u", "0._v") if ndim > 1 else ()

    def register(self, module: nn.Module, name: str) -> None:
        parametrizations.spectral_norm(module, name, self.n_power_iterations, self.eps, self.dim)

    def originals(self, weight: Tensor) -> dict[str, Tensor]:
        return {"original": weight}

    def init_state(self, weight: Tensor, training: bool) -> dict[str, Tensor]:
        if weight.ndim <= 1:
            return {}
        # torch's _SpectralNorm.__init__: u then v drawn from N(0, 1) in the weight's dtype,
        # normalised, 15 warm-up iterations; then register_parametrization calls the
        # parametrization once to check it, which (in training mode) iterates once more.
        weight_mat = _weight_matrix(weight.detach(), self.dim)
        h, w = weight_mat.size()
        u = F.normalize(weight_mat.new_empty(h).normal_(0, 1), dim=0, eps=self.eps)
        v = F.normalize(weight_mat.new_empty(w).normal_(0, 1), dim=0, eps=self.eps)
        iterations = 15 + (self.n_power_iterations if training else 0)
        u, v = power_iteration(weight_mat, u, v, iterations, self.eps)
        return {"0._u": u, "0._v": v}

    def __call__(self, tensors: dict[str, Tensor], train: bool) -> tuple[Tensor, dict[str, Tensor]]:
        weight = tensors["original"]
        if weight.ndim <= 1:
            return F.normalize(weight, dim=0, eps=self.eps), {}
        w, u, v = spectral_normalize(
            weight,
            tensors["0._u"],
            tensors["0._v"],
            train=train,
            n_power_iterations=self.n_power_iterations,
            eps=self.eps,
            dim=self.dim,
        )
        return w, {"0._u": u, "0._v": v}


class _WeightNormRule:
    """Weight norm ``g * v / |v|`` (torch's ``_WeightNorm``): two params, no state."""

    param_suffixes = ("original0", "original1")

    def __init__(self, dim: int | None) -> None:
        self.dim = -1 if dim is None else dim
        self._torch_dim = dim

    def register(self, module: nn.Module, name: str) -> None:
        parametrizations.weight_norm(module, name, self._torch_dim)

    def originals(self, weight: Tensor) -> dict[str, Tensor]:
        return {"original0": torch.norm_except_dim(weight, 2, self.dim), "original1": weight}

    def state_suffixes(self, ndim: int) -> tuple[str, ...]:
        return ()

    def init_state(self, weight: Tensor, training: bool) -> dict[str, Tensor]:
        return {}

    def __call__(self, tensors: dict[str, Tensor], train: bool) -> tuple[Tensor, dict[str, Tensor]]:
        return _torch.weight_norm(tensors["original1"], tensors["original0"], self.dim), {}


class _WeightStdRule:
    """Weight standardisation (seed 004's ``Conv2d`` with ``weight_std``): no state."""

    param_suffixes = ("original",)

    def __init__(self, eps: float) -> None:
        self.eps = eps

    def register(self, module: nn.Module, name: str) -> None:
        parametrize.register_parametrization(module, name, WeightStandardization(self.eps))

    def originals(self, weight: Tensor) -> dict[str, Tensor]:
        return {"original": weight}

    def state_suffixes(self, ndim: int) -> tuple[str, ...]:
        return ()

    def init_state(self, weight: Tensor, training: bool) -> dict[str, Tensor]:
        return {}

    def __call__(self, tensors: dict[str, Tensor], train: bool) -> tuple[Tensor, dict[str, Tensor]]:
        return standardize_weight(tensors["original"], self.eps), {}


# --- the Model wrapper ---------------------------------------------------------------------


def _key(prefix: str, name: str, suffix: str) -> str:
    """Where torch's ``parametrize`` keeps ``suffix`` of the weight ``<prefix>.<name>``."""
    return f"{prefix}.parametrizations.{name}.{suffix}".removeprefix(".")


class _Site(NamedTuple):
    """One reparametrised weight: where it is, its rule, and its keys in params/state."""

    path: str
    prefix: str
    rule: Any
    param_keys: dict[str, str]  # suffix -> params key
    state_keys: dict[str, str]  # suffix -> state key


def _materialize(model: Model) -> tuple[nn.Module, Params, State]:
    """Build ``model``'s module from the *current* global RNG, as ``init`` does after seeding.

    Returns the live module (without parametrizations) and ``(params, state)``; a wrapped
    model draws its own random numbers after its inner model's, in torch's order.
    """
    if isinstance(model, Reparametrized):
        return model._materialize()
    module = model.factory()
    named, buffers = dict(module.named_parameters()), dict(module.named_buffers())
    params = {n: named[n].detach().clone() for n in model.param_specs}
    state = {n: buffers[n].detach().clone() for n in model.state_specs}
    return module, params, state


class Reparametrized(Model):
    """A :class:`Model` whose selected weights are computed from reparametrised leaves.

    Built by :func:`spectral_norm`, :func:`weight_norm` and :func:`weight_standardization`,
    which nest (on different weights). ``init``, ``apply``, ``state_dict`` and
    ``from_state_dict`` behave as for the module with torch's ``parametrize``
    parametrizations on those weights.

    Attributes:
        inner: the wrapped model.
        template: the inner template with torch's parametrizations registered (on the meta
            device: only its names, shapes and order are used).
    """

    def __init__(
        self, inner: Model, selector: Selector, make_rule: Callable[[nn.Module, str], Any]
    ) -> None:
        candidates = dict(inner.template.named_parameters())
        chosen = [path for path, keep in select(candidates, selector).items() if keep]
        template = copy.deepcopy(inner.template)
        self.inner = inner
        self._sites: list[_Site] = []
        for path in chosen:
            if ".parametrizations." in f".{path}":
                raise ValueError(
                    f"{path!r} is already reparametrised; stacking two reparametrisations on "
                    "one weight is not supported (select plain weights)"
                )
            prefix, _, name = path.rpartition(".")
            submodule = template.get_submodule(prefix)
            ndim = getattr(submodule, name).ndim
            rule = make_rule(submodule, name)
            rule.register(submodule, name)
            self._sites.append(
                _Site(
                    path,
                    prefix,
                    rule,
                    {s: _key(prefix, name, s) for s in rule.param_suffixes},
                    {s: _key(prefix, name, s) for s in rule.state_suffixes(ndim)},
                )
            )
        own_state = {key for site in self._sites for key in site.state_keys.values()}
        self.template = template
        self.param_specs = {n: LeafSpec(p.shape, p.dtype) for n, p in template.named_parameters()}
        self.state_specs = {
            n: LeafSpec(b.shape, b.dtype)
            for n, b in template.named_buffers()
            if n in inner.state_specs or n in own_state
        }
        known = {**self.param_specs, **self.state_specs}
        self._persistent = [n for n in template.state_dict() if n in known]
        self._aliases = tied_aliases(template)
        self._factory = self._parametrized_module

    def _parametrized_module(self) -> nn.Module:
        """The imperative twin: the inner module with torch's parametrizations registered
        on the selected weights (what :attr:`factory` builds)."""
        module = self.inner.factory()
        for site in self._sites:
            prefix, _, name = site.path.rpartition(".")
            site.rule.register(module.get_submodule(prefix), name)
        return module

    def _materialize(self) -> tuple[nn.Module, Params, State]:
        module, params, state = _materialize(self.inner)
        for site in self._sites:
            weight = params[site.path]
            training = module.get_submodule(site.prefix).training
            for suffix, tensor in site.rule.originals(weight).items():
                params[site.param_keys[suffix]] = tensor
            for suffix, tensor in site.rule.init_state(weight, training).items():
                state[site.state_keys[suffix]] = tensor
        return (
            module,
            {n: params[n] for n in self.param_specs},
            {n: state[n] for n in self.state_specs},
        )

    def init(
        self,
        seed: int | torch.Generator = 0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[Params, State]:
        """Fresh ``(params, state)``: the numbers of ``torch.manual_seed(seed)``, building the
        module, registering torch's parametrization on each selected weight (in
        ``named_parameters`` order) and ``.to(device, dtype)``; computed without torch's
        parametrizations."""
        with seeded_cpu(seed), torch.no_grad():
            _, params, state = self._materialize()

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return {n: move(t) for n, t in params.items()}, {n: move(t) for n, t in state.items()}

    def apply(
        self,
        params: Params,
        state: State,
        *inputs: Any,
        train: bool = False,
        rng: int | Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Any, State]:
        """Compute the selected weights, then run the inner model (see :meth:`Model.apply`).

        With ``train=True`` each spectral-normalised weight takes ``n_power_iterations``
        power-iteration steps first and its new ``u``, ``v`` come back in ``new_state``;
        with ``train=False`` ``new_state`` is ``state`` itself.
        """
        float_dtype, device = check_leaves("params", params, self.param_specs)
        check_leaves("state", state, self.state_specs, float_dtype=float_dtype, device=device)
        inner_params = {n: params[n] for n in self.inner.param_specs if n in params}
        updated: dict[str, Tensor] = {}
        for site in self._sites:
            tensors = {s: params[k] for s, k in site.param_keys.items()}
            tensors.update({s: state[k] for s, k in site.state_keys.items()})
            inner_params[site.path], new = site.rule(tensors, train)
            updated.update({site.state_keys[s]: t for s, t in new.items()})
        inner_state = {n: state[n] for n in self.inner.state_specs}
        outputs, inner_new = self.inner.apply(
            inner_params, inner_state, *inputs, train=train, rng=rng, **kwargs
        )
        if not train:
            return outputs, state
        merged = {**updated, **inner_new}
        return outputs, {n: merged[n] for n in self.state_specs}

    def paths_of(self, *module_types: type[nn.Module], leaf: str = "weight") -> list[str]:
        """As :meth:`Model.paths_of`; a reparametrised leaf gives its ``original*`` key(s)."""
        found = []
        for prefix, sub in self.template.named_modules():
            if isinstance(sub, module_types):
                plain, reparametrised = f"{prefix}.{leaf}".removeprefix("."), _key(prefix, leaf, "")
                found += [k for k in self.param_specs if k == plain or k.startswith(reparametrised)]
        return found

    def __repr__(self) -> str:
        sites = ", ".join(
            f"{s.path}: {type(s.rule).__name__.strip('_').removesuffix('Rule')}"
            for s in self._sites
        )
        return f"Reparametrized({self.inner!r}; {sites})"


# --- public constructors -------------------------------------------------------------------


def spectral_norm(
    model: Model,
    selector: Selector,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
) -> Reparametrized:
    """Spectral normalisation of the selected weights: ``W / sigma(W)`` inside ``apply``.

    The functional ``torch.nn.utils.parametrizations.spectral_norm``: the same ``u``, ``v``
    after ``init(seed)`` as ``torch.manual_seed(seed)``, building the module and registering
    it on each selected weight in ``named_parameters`` order (two N(0, 1) draws each, 15
    warm-up iterations, plus ``n_power_iterations`` from registration's check in training
    mode); the same weights, ``u``/``v`` and gradients at every step after.

    Args:
        model: the model to wrap (a plain :class:`Model` or another reparametrised one).
        selector: which params, as for :func:`~functorch_diary.tree.select`
            (e.g. ``model.paths_of(nn.Conv2d, nn.Linear)`` or ``"*.weight"``).
        n_power_iterations: power-iteration steps per ``apply(train=True)``.
        eps: for the norms, as in torch.
        dim: the output dimension; ``None`` is torch's default (1 for ``ConvTranspose*``,
            0 otherwise), decided per weight.

    Returns:
        A :class:`Reparametrized` model; ``u``/``v`` live in ``state`` under
        ``<module>.parametrizations.<name>.0._u`` / ``._v``, the raw weight in ``params``
        under ``<module>.parametrizations.<name>.original``.

    Note:
        torch iterates every time the weight is *read*; here every ``apply(train=True)``
        iterates once per weight, the same as long as the module reads each weight once
        per forward (all of torch's layers do).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from functorch_diary import Model
        >>> model = spectral_norm(Model(lambda: nn.Linear(6, 5)), "weight", n_power_iterations=20)
        >>> params, state = model.init(seed=0)
        >>> w = params["parametrizations.weight.original"]
        >>> u, v = state["parametrizations.weight.0._u"], state["parametrizations.weight.0._v"]
        >>> w_sn, *_ = spectral_normalize(w, u, v, train=False)
        >>> round(torch.linalg.matrix_norm(w_sn, ord=2).item(), 4)
        1.0
    """
    if n_power_iterations <= 0:
        raise ValueError(f"n_power_iterations must be positive, got {n_power_iterations}")

    def make_rule(module: nn.Module, name: str) -> _SpectralNormRule:
        ndim = getattr(module, name).ndim
        chosen = (1 if isinstance(module, _TRANSPOSED) else 0) if dim is None else dim
        if ndim > 1 and not -ndim <= chosen < ndim:
            raise IndexError(f"dim {chosen} is out of range for {name} of {ndim} dimensions")
        return _SpectralNormRule(n_power_iterations, eps, chosen % ndim if ndim > 1 else 0)

    return Reparametrized(model, selector, make_rule)


def weight_norm(model: Model, selector: Selector, dim: int | None = 0) -> Reparametrized:
    """Weight normalisation ``w = g * v / ||v||`` of the selected weights.

    The functional ``torch.nn.utils.parametrizations.weight_norm``: params
    ``<module>.parametrizations.<name>.original0`` (``g``, the norms over every dimension
    but ``dim``; ``dim=None``: one norm) and ``...original1`` (``v``, initially the weight).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from functorch_diary import Model
        >>> model = weight_norm(Model(lambda: nn.Linear(3, 2)), "weight")
        >>> params, state = model.init(seed=0)
        >>> params["parametrizations.weight.original0"].shape
        torch.Size([2, 1])
    """
    return Reparametrized(model, selector, lambda module, name: _WeightNormRule(dim))


def weight_standardization(model: Model, selector: Selector, eps: float = 1e-5) -> Reparametrized:
    """Weight standardisation of the selected weights (seed 004's ``Conv2d`` with ``weight_std``).

    Each output channel of the weight used by the layer has zero mean and (unbiased) standard
    deviation ``std / (std + eps)``; the raw weight is in params under
    ``<module>.parametrizations.<name>.original``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from functorch_diary import Model
        >>> base = Model(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8)))
        >>> model = weight_standardization(base, base.paths_of(nn.Conv2d))
        >>> params, state = model.init(seed=0)
        >>> model.apply(params, state, torch.randn(1, 3, 5, 5))[0].shape
        torch.Size([1, 8, 3, 3])
    """
    return Reparametrized(model, selector, lambda module, name: _WeightStdRule(eps))
