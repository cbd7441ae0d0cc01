"""``torch.optim`` state interop: our optimiser states to and from ``optimizer.state_dict()``.

What maps where is said by the state *types*, in two registries:

- :func:`register_torch_state` (one per optimiser-state NamedTuple, e.g.
  ``ScaleByAdamState``): which fields hold per-parameter tensors and under which key
  torch keeps them (``mu -> exp_avg``), whether torch keeps a per-parameter ``step``,
  which field holds the learning rate of torch's param group, and so on
  (:class:`TorchStateMap`).
- :func:`register_torch_wrapper` (one per wrapper state, e.g. ``FiniteGuardState``):
  where the wrapped state(s) are and how to put them back; export may be refused with
  a message naming the wrapper (``accumulate_gradients`` midway through a step).

A learning-rate stage's ``lr`` and an ``inject_hyperparams`` state's values go to (and
come from) torch's ``param_groups``; a scheduler's state is apart in torch
(:func:`.torch_schedulers.export_scheduler_state`, ``import_optimizer_state(...,
scheduler=...)``).

The stages registered directly in one chain form one torch optimiser: they share one
step count and cover the parameters their tensors cover. Nested chains and wrappers are
walked into:
``apply_if_finite`` exports its inner optimiser (torch.optim keeps no skip counters, so
import starts them at the template's values), ``accumulate_gradients`` exports its inner
optimiser between steps and refuses midway (the pending gradient sum has no place in
torch), and ``multi_transform``, ``masked`` and ``freeze`` export each group's state
for the parameters of that group (frozen leaves carry none, as in torch). A state type
in neither registry is refused with its name and path.

Adding an optimiser takes a few lines here, e.g. for a NAdam whose state holds per-param
moments ``mu``/``nu`` and a shared ``mu_product`` tensor that torch keeps per parameter::

    register_torch_state(
        ScaleByNadamState,
        TorchStateMap(buffers={"mu": "exp_avg", "nu": "exp_avg_sq"},
                      scalars={"mu_product": "mu_product"}, torch_step=True),
    )

and a test row in ``tests/checkpoint/test_torch_optim.py``'s ``OPTIMIZERS`` table (train
there, continue here, and back, matched to 1e-10 in float64). Register here, next to the
others (this module imports ``optim``; ``optim`` importing it back would be a cycle).
Imported buffers are checked against the template state's leaves, not the params, so
states of other shapes (Adafactor's factored row and column variances) map as well;
a per-parameter tree of 0-dim tensors (ASGD's ``eta``, ``mu``) is a buffer too, and
``scalars`` is for one tensor shared by all parameters.

Example:
    >>> import torch
    >>> from functorch_diary import optim
    >>> params = {"w": torch.ones(2)}
    >>> opt = optim.apply_if_finite(optim.adam(0.1))
    >>> _, opt_state = opt.update({"w": torch.ones(2)}, opt.init(params), params)
    >>> torch_opt = torch.optim.Adam([torch.ones(2, requires_grad=True)], lr=0.1)
    >>> sd = export_optimizer_state(opt_state, params, torch_opt.state_dict()["param_groups"])
    >>> torch_opt.load_state_dict(sd)
    >>> torch_opt.state_dict()["state"][0]["step"]
    tensor(1.)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..optim.accumulate import AccumulateState
from ..optim.adam_family import AdamaxState, NAdamState, RAdamState
from ..optim.base import EmptyState
from ..optim.classic import AdadeltaState, ASGDState, RpropState
from ..optim.factored import AdafactorState, is_factored
from ..optim.guard import FiniteGuardState
from ..optim.inject import InjectHyperparamsState, set_hyperparams
from ..optim.masking import MultiTransformState
from ..optim.orthogonal import MuonState
from ..optim.schedules import ReduceLROnPlateauState
from ..optim.transforms import (
    ScaleByAdamState,
    ScaleByLearningRateState,
    ScaleByRmsState,
    ScaleByRssState,
    ScaleByScheduleState,
    TraceState,
)
from ..tree import tree_map
from .format import CheckpointError, is_namedtuple
from .torch_schedulers import is_plateau, with_plateau_counters

__all__ = [
    "TorchStateMap",
    "TorchWrapperMap",
    "export_optimizer_state",
    "import_optimizer_state",
    "register_torch_state",
    "register_torch_wrapper",
]


@dataclass(frozen=True)
class TorchStateMap:
    """How one optimiser-state NamedTuple maps to ``torch.optim``'s per-parameter state.

    Attributes:
        buffers: ``{field: torch key}`` for fields holding a tree of per-parameter
            tensors (a dict keyed like the params; ``None`` where a leaf has none).
        scalars: ``{field: torch key}`` for fields holding one tensor that torch keeps
            a copy of for every parameter (all copies must agree on import).
        torch_step: torch keeps a per-parameter ``step`` for this optimiser.
        lr: the field holding the learning rate (torch's ``param_group["lr"]``).
        is_step_count: this state's ``count`` is the number of steps taken, whatever
            the other stages' counts say.
        state_at_init: torch creates the per-parameter state at construction, before
            any step (Adagrad's ``sum``).
        count_means_started: ``count`` only says whether the buffers exist yet (SGD's
            momentum): on import it is at least 1 when they do, 0 when they do not.
        holds: ``(field, param) -> bool``: whether torch keeps the ``field`` buffer for
            that param, where the state holds a placeholder for the others (Adafactor's
            empty tensors); by default every tensor in a buffer tree is torch's.
    """

    buffers: Mapping[str, str] = field(default_factory=dict)
    scalars: Mapping[str, str] = field(default_factory=dict)
    torch_step: bool = False
    lr: str | None = None
    is_step_count: bool = False
    state_at_init: bool = False
    count_means_started: bool = False
    holds: Callable[[str, Tensor], bool] | None = None


class TorchWrapperMap(NamedTuple):
    """How to walk into a wrapper's state.

    Attributes:
        name: the wrapper's public name, used in messages (``"apply_if_finite"``).
        inners: ``state -> {key: inner state}``.
        rebuild: ``(state, {key: new inner state}) -> new state``.
        refuse_export: ``state -> reason or None``: why this state cannot be exported now.
        group_values: ``state -> {key: value}``: values this state holds that torch keeps
            in the ``param_groups`` of its parameters (``inject_hyperparams``' ``lr``,
            ``momentum``, ...); export writes them there, over its inner stages' ``lr``.
        from_group: ``(state, {key: value}) -> state``: the state with those values read
            from the torch param groups of its parameters (given the keys of
            ``group_values`` that the groups have).
    """

    name: str
    inners: Callable[[Any], Mapping[Hashable, Any]]
    rebuild: Callable[[Any, Mapping[Hashable, Any]], Any]
    refuse_export: Callable[[Any], str | None] = lambda state: None
    group_values: Callable[[Any], Mapping[str, Any]] | None = None
    from_group: Callable[[Any, Mapping[str, Any]], Any] | None = None


_STATES: dict[type, TorchStateMap] = {}
_WRAPPERS: dict[type, TorchWrapperMap] = {}


def register_torch_state(state_type: type, mapping: TorchStateMap) -> type:
    """Say how ``state_type`` (an optimiser state NamedTuple) maps to ``torch.optim``.

    Returns ``state_type``. Every field named in ``mapping`` must be a field of it.
    """
    fields = set(getattr(state_type, "_fields", ()))
    named = {*mapping.buffers, *mapping.scalars, *([mapping.lr] if mapping.lr else [])}
    if not (isinstance(state_type, type) and issubclass(state_type, tuple)) or not named <= fields:
        raise TypeError(
            f"{state_type!r} must be a NamedTuple with fields {sorted(named)}; "
            f"it has {sorted(fields)}"
        )
    _STATES[state_type] = mapping
    return state_type


def register_torch_wrapper(state_type: type, wrapper: TorchWrapperMap) -> type:
    """Say how to walk into the wrapper state ``state_type``; returns ``state_type``."""
    _WRAPPERS[state_type] = wrapper
    return state_type


register_torch_state(EmptyState, TorchStateMap())
register_torch_state(ScaleByScheduleState, TorchStateMap())
register_torch_state(ScaleByLearningRateState, TorchStateMap(lr="lr", is_step_count=True))
register_torch_state(
    TraceState, TorchStateMap({"trace": "momentum_buffer"}, count_means_started=True)
)
register_torch_state(
    ScaleByAdamState,
    TorchStateMap(
        {"mu": "exp_avg", "nu": "exp_avg_sq", "nu_max": "max_exp_avg_sq"}, torch_step=True
    ),
)
register_torch_state(
    ScaleByRmsState,
    TorchStateMap({"square_avg": "square_avg", "grad_avg": "grad_avg"}, torch_step=True),
)
register_torch_state(
    ScaleByRssState, TorchStateMap({"sum_of_squares": "sum"}, torch_step=True, state_at_init=True)
)
register_torch_state(
    NAdamState,
    TorchStateMap(
        {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
        {"mu_product": "mu_product"},
        torch_step=True,
    ),
)
register_torch_state(
    RAdamState, TorchStateMap({"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}, torch_step=True)
)
register_torch_state(
    AdamaxState, TorchStateMap({"exp_avg": "exp_avg", "exp_inf": "exp_inf"}, torch_step=True)
)
register_torch_state(
    AdadeltaState,
    TorchStateMap({"square_avg": "square_avg", "acc_delta": "acc_delta"}, torch_step=True),
)
# torch keeps ASGD's eta and mu per parameter; one optimiser's copies are always equal.
register_torch_state(
    ASGDState, TorchStateMap({"ax": "ax"}, {"eta": "eta", "mu": "mu"}, torch_step=True)
)
register_torch_state(
    RpropState, TorchStateMap({"prev": "prev", "step_size": "step_size"}, torch_step=True)
)
# Matrices keep row_var and col_var, the other leaves variance (an empty placeholder in
# the other trees).
register_torch_state(
    AdafactorState,
    TorchStateMap(
        {"row_var": "row_var", "col_var": "col_var", "variance": "variance"},
        torch_step=True,
        holds=lambda field_name, p: is_factored(p) == (field_name != "variance"),
    ),
)
# torch's Muon keeps no step: import takes step= (its count only feeds a schedule).
register_torch_state(MuonState, TorchStateMap({"momentum_buffer": "momentum_buffer"}))


def _pending_micro_steps(state: AccumulateState) -> str | None:
    pending = int(state.micro_step)
    if pending == 0:
        return None
    return (
        f"it holds the gradient sum of {pending} micro-steps, which torch.optim has no place "
        "for; export right after a real step (micro_step 0)"
    )


def _one_inner(name: str, **options: Any) -> TorchWrapperMap:
    """The map of a wrapper whose state keeps the wrapped state as its ``inner`` field."""
    return TorchWrapperMap(
        name, lambda s: {"inner": s.inner}, lambda s, new: s._replace(inner=new["inner"]), **options
    )


register_torch_wrapper(FiniteGuardState, _one_inner("apply_if_finite"))
register_torch_wrapper(
    AccumulateState, _one_inner("accumulate_gradients", refuse_export=_pending_micro_steps)
)
register_torch_wrapper(
    MultiTransformState,
    TorchWrapperMap(
        "multi_transform (or masked, freeze)",
        lambda s: s.inner_states,
        lambda s, new: MultiTransformState(dict(new)),
    ),
)


_GroupFn = Callable[[list[Any], str], tuple[list[Any], list[str]]]
_WrapperFn = Callable[[TorchWrapperMap, Any, list[str], str], Any]


def _injected_values(state: InjectHyperparamsState) -> dict[str, Any]:
    return {key: tree_map(float, value) for key, value in state.hyperparams.items()}


def _with_injected(state: InjectHyperparamsState, values: Mapping[str, Any]) -> Any:
    # torch keeps betas as a tuple; a state_dict read back from JSON may hold a list.
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return set_hyperparams(state, **values) if values else state


register_torch_wrapper(
    InjectHyperparamsState,
    _one_inner("inject_hyperparams", group_values=_injected_values, from_group=_with_injected),
)
# The plateau counters live in torch's scheduler, not its optimiser: see
# torch_schedulers.export_scheduler_state and import_optimizer_state(scheduler=...).
register_torch_wrapper(
    ReduceLROnPlateauState,
    TorchWrapperMap(
        "reduce_lr_on_plateau", lambda s: {"lr": s.lr}, lambda s, new: s._replace(lr=new["lr"])
    ),
)


def _map_groups(
    state: Any, fn: _GroupFn, path: str, *, exporting: bool, on_wrapper: _WrapperFn | None = None
) -> tuple[Any, list[str]]:
    """``state`` with every group of registered stages replaced by ``fn(stages, path)``
    (which returns the new stages and the params they cover), walking into registered
    wrappers (then ``on_wrapper(map, new wrapper state, params it covers, path)`` gives
    the wrapper's state); a state in neither registry is refused. Returns the new state
    and the params it covers."""
    chained = isinstance(state, tuple) and not is_namedtuple(state)
    items = list(state) if chained else [state]
    positions = [i for i, item in enumerate(items) if type(item) in _STATES]
    out = list(items)
    covered: list[str] = []
    if positions:
        group_path = path if not chained else f"{path}[{','.join(map(str, positions))}]"
        new_stages, covered = fn([items[i] for i in positions], group_path)
        for i, new in zip(positions, new_stages, strict=True):
            out[i] = new
    for i, item in enumerate(items):
        if type(item) in _STATES:
            continue
        where = f"{path}[{i}]" if chained else path
        if chained and isinstance(item, tuple) and not is_namedtuple(item):
            # a nested chain
            out[i], more = _map_groups(item, fn, where, exporting=exporting, on_wrapper=on_wrapper)
            covered += more
            continue
        wrapper = _WRAPPERS.get(type(item))
        if wrapper is None:
            raise CheckpointError(
                f"optimiser state {type(item).__name__} at {where} has no torch.optim "
                "equivalent; map it with checkpoint.torch_optim.register_torch_state (an "
                "optimiser state) or register_torch_wrapper (a wrapper)"
            )
        reason = wrapper.refuse_export(item) if exporting else None
        if reason is not None:
            raise CheckpointError(f"cannot export the {wrapper.name} state at {where}: {reason}")
        inners, inside = {}, []
        for key, inner in wrapper.inners(item).items():
            inners[key], more = _map_groups(
                inner, fn, f"{where}.{key}", exporting=exporting, on_wrapper=on_wrapper
            )
            inside += more
        out[i] = wrapper.rebuild(item, inners)
        if on_wrapper is not None:
            out[i] = on_wrapper(wrapper, out[i], inside, where)
        covered += inside
    return (tuple(out) if chained else out[0]), list(dict.fromkeys(covered))


def _count(stage: Any) -> Tensor | None:
    # Not getattr: every NamedTuple has a .count method. RMS and RSS states count only
    # when they hold the learning rate.
    return stage.count if "count" in stage._fields else None


def _steps_taken(stages: Sequence[Any]) -> int:
    for stage in stages:
        if _STATES[type(stage)].is_step_count:
            return int(stage.count)
    return max((int(c) for c in map(_count, stages) if c is not None), default=0)


def _buffer_trees(stage: Any, path: str, params: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    """``{field: {param name: buffer}}`` of the stage's per-parameter buffers that torch
    keeps: the fields that are present, each without the params its map says it does
    not hold (:attr:`TorchStateMap.holds`)."""
    mapping, out = _STATES[type(stage)], {}
    for field_name in mapping.buffers:
        tree = getattr(stage, field_name)
        if tree is None:
            continue
        if not isinstance(tree, Mapping) or not set(tree) <= set(params):
            raise CheckpointError(
                f"{path}.{field_name}: expected a dict keyed by the params' names, got a "
                f"{type(tree).__name__}; build the state with optimizer.init(params)"
            )
        out[field_name] = {
            n: leaf
            for n, leaf in tree.items()
            if mapping.holds is None or mapping.holds(field_name, params[n])
        }
    return out


def _members(stages: Sequence[Any], path: str, params: Mapping[str, Tensor]) -> list[str]:
    """The params this group of stages covers: those with a buffer anywhere in it; all
    of them when no stage keeps per-parameter buffers."""
    trees = [tree for s in stages for tree in _buffer_trees(s, path, params).values()]
    if not trees:
        return list(params)
    return [n for n in params if any(tree.get(n) is not None for tree in trees)]


def export_optimizer_state(
    opt_state: Any, params: Mapping[str, Tensor], param_groups: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Our optimiser state as a ``torch.optim`` ``state_dict`` (``optimizer.load_state_dict`` it).

    Supports every registered state (every named optimiser: ``optim.sgd``, ``adam``,
    ``adamw``, ``rmsprop``, ``adagrad``, ``nadam``, ``radam``, ``adamax``, ``adadelta``,
    ``asgd``, ``rprop``, ``adafactor``, ``muon``) and wrapper (``apply_if_finite``,
    ``accumulate_gradients``, ``multi_transform``, ``masked``, ``freeze``,
    ``inject_hyperparams``, ``reduce_lr_on_plateau``). A scheduler's position is
    :func:`.torch_schedulers.export_scheduler_state`'s.

    Args:
        opt_state: the optimiser state.
        params: the params dict; torch numbers parameters in this order (the order of
            ``named_parameters()``, which is what ``Model.init`` gives).
        param_groups: the ``param_groups`` of the torch optimiser that will load the state,
            i.e. ``torch_optimizer.state_dict()["param_groups"]`` (hyperparameters live there).

    Returns:
        ``{"state": {index: {...}}, "param_groups": [...]}`` with copied tensors; the
        groups are copies of ``param_groups`` with each learning-rate stage's ``lr`` and
        the injected hyperparameters (``lr``, ``betas``, ``momentum``, ...) of the
        parameters they hold.

    Raises:
        CheckpointError: the state has a stage torch has no equivalent for, a wrapper
            refuses (the message names it), the parameter counts differ, a group lacks
            an injected hyperparameter's key, or one group would get two values.
    """
    names = list(params)
    total = sum(len(group["params"]) for group in param_groups)
    if total != len(names):
        raise CheckpointError(
            f"param_groups hold {total} parameters but params has {len(names)}; build the torch "
            "optimiser on the same parameters"
        )
    index = {name: i for i, name in enumerate(names)}
    state: dict[int, dict[str, Tensor]] = {}
    groups = [dict(group) for group in param_groups]
    group_of = {names[i]: g for g, group in enumerate(groups) for i in group["params"]}
    written: dict[tuple[int, str], Any] = {}

    def put(name: str, key: str, value: Tensor, path: str) -> None:
        entry = state.setdefault(index[name], {})
        if key in entry and key != "step":
            raise CheckpointError(f"{path}: param {name!r} has two {key!r} buffers")
        entry[key] = value

    def write(
        members: list[str], values: Mapping[str, Any], path: str, *, over: bool, why: str = ""
    ) -> None:
        """Put ``values`` in the torch param groups holding ``members``; a wrapper's
        (``over``) replace its inner stages', two stages' must agree (``why`` says why
        they may not)."""
        for g in sorted({group_of[n] for n in members if n in group_of}):
            for key, value in values.items():
                if key not in groups[g]:
                    raise CheckpointError(
                        f"{path}: torch's param group {g} has no {key!r} for this state's "
                        f"value {value}; is it another torch optimiser's param_groups?"
                    )
                if not over and written.get((g, key), value) != value:
                    raise CheckpointError(
                        f"{path}: torch's param group {g} holds parameters of stages with "
                        f"different {key!r} ({written[g, key]} and {value}); "
                        + (why or "give them separate torch param groups")
                    )
                written[g, key] = groups[g][key] = value

    def export_group(stages: list[Any], path: str) -> tuple[list[Any], list[str]]:
        maps = [_STATES[type(s)] for s in stages]
        step = _steps_taken(stages)
        members = _members(stages, path, params)
        why = ""
        if not any(_buffer_trees(s, path, params) for s in stages):
            why = (
                "this group keeps no per-parameter tensors, so nothing says which "
                "parameters it stands for"
            )
        for stage, mapping in zip(stages, maps, strict=True):
            if mapping.lr is not None:  # what torch's scheduler (or loop) set
                lr = {"lr": float(getattr(stage, mapping.lr))}
                write(members, lr, path, over=False, why=why)
        # torch creates its per-parameter state on the first step (Adagrad: at construction).
        if step == 0 and not any(m.state_at_init for m in maps):
            return stages, members
        for name in members:
            for stage, mapping in zip(stages, maps, strict=True):
                if mapping.torch_step:
                    # torch keeps the step as a float32 tensor per parameter.
                    put(name, "step", torch.tensor(float(step), dtype=torch.float32), path)
                for field_name, tree in _buffer_trees(stage, path, params).items():
                    if tree.get(name) is not None:
                        put(name, mapping.buffers[field_name], tree[name].detach().clone(), path)
                for field_name, key in mapping.scalars.items():
                    put(name, key, getattr(stage, field_name).detach().clone(), path)
        return stages, members

    def export_wrapper(wrapper: TorchWrapperMap, item: Any, members: list[str], where: str) -> Any:
        if wrapper.group_values is not None:
            write(members, wrapper.group_values(item), where, over=True)
        return item

    _map_groups(opt_state, export_group, "opt_state", exporting=True, on_wrapper=export_wrapper)
    return {"state": state, "param_groups": groups}


def import_optimizer_state(
    state_dict: Mapping[str, Any],
    opt_state_like: Any,
    params: Mapping[str, Tensor],
    *,
    step: int | None = None,
    scheduler: Mapping[str, Any] | None = None,
) -> Any:
    """A ``torch.optim`` ``state_dict`` (and its scheduler's) as our optimiser state.

    Args:
        state_dict: ``torch_optimizer.state_dict()``.
        opt_state_like: ``optimizer.init(params)`` of the matching functorch-diary
            optimiser: it says which stages and wrappers the state has.
        params: the params dict, in the order torch numbered the parameters.
        step: the number of steps taken, for optimisers whose torch state has no step
            (SGD, Muon). Default: torch's ``step``, else the ``scheduler``'s
            ``last_epoch`` (a scheduler stepped once per optimiser step), else 1 if
            there are momentum buffers, else 0.
        scheduler: ``torch_scheduler.state_dict()``, if the run has one. A
            ``ReduceLROnPlateau``'s ``best``, ``num_bad_epochs`` and ``cooldown_counter``
            go into the :func:`~functorch_diary.optim.reduce_lr_on_plateau` stage (whose
            options must be the scheduler's); another scheduler gives the step count.
            The schedule itself is the optimiser's (a function of the step count).

    Returns:
        The optimiser state, with tensors on the template's devices and dtypes. A
        learning rate stage takes the ``lr`` of the torch param groups holding its
        parameters (what a scheduler set), and an
        :func:`~functorch_diary.optim.inject_hyperparams` state its hyperparameters
        (``lr``, ``momentum``, ``betas``, ...: what a loop or a momentum-cycling
        scheduler set).

    Raises:
        CheckpointError: the state does not match the params or the optimiser (e.g. it
            holds buffers this optimiser has no place for), a stage or wrapper has no
            torch equivalent, or the plateau scheduler's options differ from the stage's.
    """
    names = list(params)
    torch_state = state_dict.get("state", {})
    unknown = [key for key in torch_state if not (isinstance(key, int) and 0 <= key < len(names))]
    if unknown:
        raise CheckpointError(
            f"state_dict has parameter indices {unknown} outside 0..{len(names) - 1}"
        )
    group_of: dict[str, Mapping[str, Any]] = {}
    for group in state_dict.get("param_groups", []):
        for i in group.get("params", []):
            if isinstance(i, int) and 0 <= i < len(names):
                group_of[names[i]] = group
    index = {name: i for i, name in enumerate(names)}
    consumed: set[tuple[int, str]] = set()
    plateau = scheduler is not None and is_plateau(scheduler)
    scheduler_steps = None
    if scheduler is not None and not plateau:
        if "last_epoch" not in scheduler:
            raise CheckpointError(
                "the scheduler state_dict has no 'last_epoch' (a ChainedScheduler?); give "
                "the state_dict of one of its parts, or step="
            )
        scheduler_steps = int(scheduler["last_epoch"])

    def import_group(stages: list[Any], path: str) -> tuple[list[Any], list[str]]:
        maps = [_STATES[type(s)] for s in stages]
        members = _members(stages, path, params)
        rows = {name: torch_state.get(index[name], {}) for name in members}

        def take(key: str, like: Mapping[str, Any]) -> dict[str, Tensor] | None:
            """torch's ``key`` for every param that ``like`` (a template tree) covers."""
            covered = [n for n in members if like.get(n) is not None]
            present = [n for n in covered if rows[n].get(key) is not None]
            if not present:
                return None
            if len(present) != len(covered):
                missing = [n for n in covered if n not in present]
                raise CheckpointError(
                    f"state_dict has {key!r} for some parameters but not {missing} ({path})"
                )
            out = {}
            for name in covered:
                value, want, i = rows[name][key], like[name], index[name]
                if value.shape != want.shape:
                    raise CheckpointError(
                        f"state_dict['state'][{i}][{key!r}] (param {name!r}): expected shape "
                        f"{tuple(want.shape)}, got {tuple(value.shape)}"
                    )
                out[name] = value.detach().to(device=want.device, dtype=want.dtype).clone()
                consumed.add((i, key))
            return out

        steps = set()
        if any(m.torch_step for m in maps):
            for name in members:
                if "step" in rows[name]:
                    steps.add(float(rows[name]["step"]))
                    consumed.add((index[name], "step"))
        if len(steps) > 1:
            raise CheckpointError(
                f"parameters are at different steps {sorted(steps)}; "
                f"functorch-diary keeps one step count ({path})"
            )
        new_stages, started = [], False
        changes_of = []
        for stage, mapping in zip(stages, maps, strict=True):
            changes: dict[str, Any] = {}
            for field_name, tree in _buffer_trees(stage, path, params).items():
                got = take(mapping.buffers[field_name], tree)
                if got is not None:
                    whole = getattr(stage, field_name)  # with the leaves torch keeps none of
                    changes[field_name] = {n: got.get(n, leaf) for n, leaf in whole.items()}
                    started = True
            for field_name, key in mapping.scalars.items():
                like = getattr(stage, field_name)
                got = take(key, dict.fromkeys(members, like))
                if got is not None:
                    values = list(got.values())
                    if any(not torch.equal(v, values[0]) for v in values):
                        raise CheckpointError(f"state_dict's {key!r} differs between parameters")
                    changes[field_name] = values[0]
                    started = True
            changes_of.append(changes)
        taken = step
        if taken is None and steps:
            taken = int(steps.pop())
        if taken is None:
            taken = scheduler_steps if scheduler_steps is not None else int(started)
        lrs = {group_of.get(n, {}).get("lr") for n in members} - {None}
        for stage, mapping, changes in zip(stages, maps, changes_of, strict=True):
            count = _count(stage)
            if count is not None:
                value = (max(taken, 1) if started else 0) if mapping.count_means_started else taken
                changes["count"] = torch.full_like(count, value)
            if mapping.lr is not None and lrs:
                if len(lrs) > 1 and not any(_buffer_trees(s, path, params) for s in stages):
                    raise CheckpointError(
                        f"{path} keeps no per-parameter tensors, so nothing says which of "
                        f"torch's param groups (learning rates {sorted(lrs)}) it stands for; "
                        "import from a torch optimiser whose groups share one learning rate"
                    )
                if len(lrs) > 1:
                    raise CheckpointError(
                        f"the parameters of {path} are in torch param groups with different "
                        f"learning rates {sorted(lrs)}; use one functorch-diary optimiser per "
                        "group (optim.multi_transform)"
                    )
                changes[mapping.lr] = torch.full_like(getattr(stage, mapping.lr), next(iter(lrs)))
            new_stages.append(stage._replace(**changes))
        return new_stages, members

    def import_wrapper(wrapper: TorchWrapperMap, item: Any, members: list[str], where: str) -> Any:
        if wrapper.from_group is None or wrapper.group_values is None:
            return item
        values = {}
        for key in wrapper.group_values(item):
            found = [group_of[n][key] for n in members if key in group_of.get(n, {})]
            if any(value != found[0] for value in found):
                raise CheckpointError(
                    f"the parameters of {where} are in torch param groups with different "
                    f"{key!r} {sorted(set(map(str, found)))}; use one functorch-diary "
                    "optimiser per group (optim.multi_transform)"
                )
            if found:
                values[key] = found[0]
        return wrapper.from_group(item, values)

    result, _ = _map_groups(
        opt_state_like, import_group, "opt_state", exporting=False, on_wrapper=import_wrapper
    )
    if plateau:
        result = with_plateau_counters(result, scheduler)
    left = sorted(
        (i, key)
        for i, entry in torch_state.items()
        for key, value in entry.items()
        if value is not None and (i, key) not in consumed
    )
    if left:
        i, key = left[0]
        raise CheckpointError(
            f"state_dict['state'][{i}][{key!r}] (param {names[i]!r}) has no place in this "
            f"optimiser's state ({len(left)} such entries); is it another torch optimiser's "
            "state, or a leaf this optimiser freezes?"
        )
    return result
