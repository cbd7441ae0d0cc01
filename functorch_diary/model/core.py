"""``Model``: any ``nn.Module`` as two pure functions, ``init`` and ``apply``.

The module itself is kept only as a *template* on the ``meta`` device (shapes, no
storage); the numbers live in two flat dicts keyed exactly like the module's own:

- ``params``: ``dict(module.named_parameters())``;
- ``state``: ``dict(module.named_buffers())`` (BatchNorm running statistics,
  ``num_batches_tracked``, ...).

A torchvision ``state_dict`` is ``params`` and ``state`` merged, with no renaming.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from functorch_diary import Model
    >>> model = Model(lambda: nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)))
    >>> params, state = model.init(seed=0)
    >>> y, new_state = model.apply(params, state, torch.randn(16, 4), train=True)
    >>> int(new_state["1.num_batches_tracked"]), int(state["1.num_batches_tracked"])
    (1, 0)
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .. import prng
from ..tree import Params
from .checks import LeafSpec, check_inputs, check_leaves
from .diagnose import check_has_forward, locate_layer_error
from .randomness import KeyedRandomness, MissingRngError

__all__ = ["Model", "State", "extract"]

State = dict[str, Tensor]

def extract(module: nn.Module) -> tuple[Params, State]:
    """Copy a live module's parameters and buffers into ``(params, state)``.

    The copies are detached and share no storage with the module, so later training of
    either side does not touch the other.

    Example:
        >>> from torch import nn
        >>> params, state = extract(nn.BatchNorm1d(3))
        >>> sorted(params), sorted(state)
        (['bias', 'weight'], ['num_batches_tracked', 'running_mean', 'running_var'])
    """
    params = {name: p.detach().clone() for name, p in module.named_parameters()}
    state = {name: b.detach().clone() for name, b in module.named_buffers()}
    return params, state


def _seed_from(seed: int | torch.Generator) -> int:
    if isinstance(seed, torch.Generator):
        return int(torch.randint(0, 2**62, (), generator=seed))
    return int(seed)


@contextlib.contextmanager
def seeded_cpu(seed: int | torch.Generator) -> Iterator[None]:
    """Build on the CPU under ``torch.manual_seed(seed)``; the global RNG is restored after.

    Every ``init`` builds its module inside this, so a seed gives torch's own initial
    weights, the same on every device, without disturbing the caller's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_from(seed))
        with torch.device("cpu"):
            yield


_RNG_HINT = "; pass rng= (an int or prng.key) to apply"


class Model:
    """An ``nn.Module`` turned into pure ``init`` and ``apply`` functions.

    Args:
        factory: a zero-argument callable that builds the module, e.g. ``LeNet`` or
            ``functools.partial(torchvision.models.resnet18, num_classes=10)``. It is
            called on the ``meta`` device for the template, and for real in ``init``, so
            ``init(seed)`` gives exactly the weights ``torch.manual_seed(seed); factory()``
            gives.

    Attributes:
        template: the module on the ``meta`` device (shapes only), in training mode.
        param_specs / state_specs: name -> :class:`LeafSpec`, what ``apply`` checks against.
    """

    def __init__(self, factory: Callable[[], nn.Module]) -> None:
        self._factory = factory
        with torch.device("meta"):
            template = factory()
        self._install_template(template)

    @classmethod
    def from_module(cls, module: nn.Module) -> tuple[Model, Params, State]:
        """The ``Model`` of an existing module, with that module's current weights.

        ``init`` of the returned model re-initialises with each submodule's
        ``reset_parameters``; the module passed in is not modified.

        Example:
            >>> import torch, torchvision
            >>> net = torchvision.models.resnet18(num_classes=10).eval()
            >>> model, params, state = Model.from_module(net)
            >>> x = torch.randn(2, 3, 32, 32)
            >>> torch.allclose(model.apply(params, state, x)[0], net(x), atol=1e-6)
            True
        """
        params, state = extract(module)
        template = _converted(module, lambda m: m.to("meta"))

        def rebuild() -> nn.Module:
            fresh = _converted(template, lambda m: m.to_empty(device=torch.get_default_device()))
            for sub in fresh.modules():
                if hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()
            return fresh

        model = cls.__new__(cls)
        model._factory = rebuild
        model._install_template(template)
        return model, params, state

    @property
    def factory(self) -> Callable[[], nn.Module]:
        """The zero-argument callable that builds the module (``init`` calls it)."""
        return self._factory

    def _install_template(self, template: nn.Module) -> None:
        check_has_forward(template)
        self.param_specs = {n: LeafSpec(p.shape, p.dtype) for n, p in template.named_parameters()}
        self.state_specs = {n: LeafSpec(b.shape, b.dtype) for n, b in template.named_buffers()}
        # Two meta templates, one per mode, so apply never flips a module's mode: flipping
        # would be a side effect that torch.compile has to guard on and re-trace.
        self.template = template.train(True)
        self._templates = {True: self.template, False: copy.deepcopy(template).train(False)}
        self._persistent = list(template.state_dict().keys())
        # A tied tensor is one param (or buffer) under its first name; its other names are
        # aliases, present in state_dicts only. functional_call's weight-tying pass walks
        # every module on every call (~0.2 ms on LeNet), so it runs only when there are any.
        self._aliases = tied_aliases(template)

    def init(
        self,
        seed: int | torch.Generator = 0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[Params, State]:
        """Fresh ``(params, state)``, initialised as torch's own layers initialise.

        The module is built on the CPU under ``torch.manual_seed(seed)`` (without
        touching the global RNG) and then moved, so a seed gives the same numbers on
        every device.

        Args:
            seed: an integer, or a ``torch.Generator`` to draw the seed from.
            device: where the tensors go (default: the CPU).
            dtype: a floating dtype for floating leaves (``num_batches_tracked`` stays int64).
        """
        with seeded_cpu(seed):
            module = self._factory()
        return extract(module.to(device=device, dtype=dtype))

    def apply(
        self,
        params: Params,
        state: State,
        *inputs: Any,
        train: bool = False,
        rng: int | Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Any, State]:
        """Run the module on ``inputs`` with these params and state; mutate nothing.

        Args:
            params, state: as returned by :meth:`init` (or :func:`extract`).
            *inputs, **kwargs: passed to the module's ``forward``.
            train: training mode (BatchNorm uses batch statistics and updates its running
                statistics; dropout is active). ``False`` is ``module.eval()``.
            rng: an int seed or a :func:`prng.key`, needed when the forward draws random
                numbers (dropout in training mode, stochastic depth, a ``torch.randn`` of
                its own...). Every draw comes from it (:mod:`~functorch_diary.model.
                randomness`), never from torch's global generator: the same ``rng`` gives
                the same bits, another gives other draws.

        Returns:
            ``(outputs, new_state)``. ``new_state`` holds the updated running statistics
            in training mode and is ``state`` itself in eval mode.

        Raises:
            TreeMismatchError: a key of ``params``/``state`` is missing or unexpected, or a
                leaf or input has the wrong shape, dtype or device (the message names it).
            MissingRngError: the forward drew random numbers and ``rng`` is ``None`` (the
                message names the function and the layer).
        """
        float_dtype, device = check_leaves("params", params, self.param_specs)
        check_leaves("state", state, self.state_specs, float_dtype=float_dtype, device=device)
        check_inputs(inputs, float_dtype, device)
        tensors = dict(params)
        # BatchNorm writes its running statistics in place; it writes into copies, which
        # become new_state, so the caller's state is never touched.
        new_state = {name: b.clone() for name, b in state.items()} if train else state
        tensors.update(new_state)
        key = None if rng is None else prng.key(rng, device=device)
        try:
            with KeyedRandomness(key, hint=_RNG_HINT):
                outputs = functional_call(
                    self._templates[train],
                    tensors,
                    inputs,
                    kwargs,
                    tie_weights=bool(self._aliases),
                    strict=False,
                )
        except (RuntimeError, NotImplementedError, MissingRngError) as error:
            # Only on the error path: re-run once with hooks on a copy to name the layer
            # (under the same keyed randomness, so the re-run draws nothing globally).
            with KeyedRandomness(key, hint=_RNG_HINT):
                located = locate_layer_error(
                    self._templates[train], tensors, inputs, kwargs, error
                )
            if located is None:
                raise
            if isinstance(error, MissingRngError):
                where = f"layer {located.path!r}" if located.path else "the model's own forward"
                raise MissingRngError(f"{error} (in {where})") from None
            raise located from error
        return outputs, new_state

    def paths_of(self, *module_types: type[nn.Module], leaf: str = "weight") -> list[str]:
        """The param paths called ``leaf`` in every submodule of one of ``module_types``.

        The functional form of seed 000's ``for m in self.modules(): if isinstance(m,
        nn.Conv2d): ...``: the result is a selector for :func:`~functorch_diary.tree.select`.

        Example:
            >>> from torch import nn
            >>> model = Model(lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
            >>> model.paths_of(nn.Conv2d), model.paths_of(nn.BatchNorm2d, leaf="bias")
            (['0.weight'], ['1.bias'])
        """
        found = []
        for prefix, sub in self.template.named_modules():
            path = f"{prefix}.{leaf}" if prefix else leaf
            if isinstance(sub, module_types) and path in self.param_specs:
                found.append(path)
        return found

    def state_dict(self, params: Params, state: State) -> OrderedDict[str, Tensor]:
        """``params`` and ``state`` as the module's ``state_dict`` (same keys and order)."""
        merged = {**params, **state}
        return OrderedDict(
            (name, merged[self._aliases.get(name, name)]) for name in self._persistent
        )

    def from_state_dict(self, state_dict: Mapping[str, Tensor]) -> tuple[Params, State]:
        """Split a ``state_dict`` (e.g. torchvision's pretrained file) into ``(params, state)``.

        Every key must match; the tensors are copied. Non-persistent buffers (absent from
        state_dicts) take the values ``init`` gives them.

        Raises:
            TreeMismatchError: a key is missing or unexpected, or a shape differs.
        """
        persistent = set(self._persistent)
        specs = {
            n: s for n, s in {**self.param_specs, **self.state_specs}.items() if n in persistent
        }
        state_dict = {k: v for k, v in state_dict.items() if k not in self._aliases}
        check_leaves("state_dict", state_dict, specs)
        params = {n: state_dict[n].detach().clone() for n in self.param_specs}
        state = {n: state_dict[n].detach().clone() for n in self.state_specs if n in persistent}
        missing = [n for n in self.state_specs if n not in persistent]
        if missing:
            _, fresh = self.init()
            device = next(iter(params.values())).device if params else None
            state.update({n: fresh[n].to(device) for n in missing})
        return params, {n: state[n] for n in self.state_specs}

    def __repr__(self) -> str:
        name = type(self.template).__name__
        return f"Model({name}, {len(self.param_specs)} params, {len(self.state_specs)} buffers)"


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """``{other name: first name}`` of every tensor registered under several names."""
    aliases = {}
    for named in (module.named_parameters, module.named_buffers):
        first: dict[int, str] = {}
        for name, tensor in named(remove_duplicate=False):
            if first.setdefault(id(tensor), name) != name:
                aliases[name] = first[id(tensor)]
    return aliases


def _converted(module: nn.Module, convert: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """``convert`` of a copy of ``module``, with its tied tensors tied again: ``.to("meta")``
    and ``.to_empty`` give each name its own tensor, which would make a tied weight two
    parameters. ``module`` is not modified."""
    converted = convert(copy.deepcopy(module))
    for name, source in tied_aliases(module).items():
        owner, _, leaf = name.rpartition(".")
        source_owner, _, source_leaf = source.rpartition(".")
        shared = getattr(converted.get_submodule(source_owner), source_leaf)
        sub = converted.get_submodule(owner)
        if isinstance(shared, nn.Parameter):
            sub.register_parameter(leaf, shared)
        else:
            sub.register_buffer(leaf, shared)
    return converted
