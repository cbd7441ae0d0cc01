"""Sharded (FSDP/ZeRO-3-style) training: params, state and optimiser state as ``DTensor`` s.

Data parallel keeps a full copy of params, gradients and optimiser state on every rank.
Here each leaf is a :class:`~torch.distributed.tensor.DTensor` on a one-dimensional
:class:`~torch.distributed.device_mesh.DeviceMesh`, split along dim 0 (``Shard(0)``), so
a rank holds about ``1/N`` of every large tensor. The step is the single-process step's
body (:func:`~functorch_diary.training.step.build_step`) with three hooks, all on
torch's own engine:

1. **gather for compute, param by param**: each op that uses a sharded param gets it
   whole, ``redistribute`` d to ``Replicate`` (an all-gather) just before the op; the
   gather is differentiable, and its backward is a reduce-scatter (``to_local`` declares
   the gradient ``Partial``). Autograd keeps only the shard for the backward pass and
   gathers the param again when the backward needs it (a saved-tensor hook: FSDP2's
   reshard after forward), so one param is whole at a time, not the whole model;
2. **gradients come back reduce-scattered** to the shards, averaged over the ranks;
3. **the optimiser updates only the local shard**: it runs on the local pieces of params,
   gradients and optimiser state, plain tensors, so every named optimiser, schedule and
   mask runs unchanged (they act element by element). The stages that look further are
   told they run on shards (:mod:`functorch_diary.optim.shards`):
   ``clip_by_global_norm`` takes the norm over every rank, ``apply_if_finite`` skips on
   every rank alike, and ``muon``/``adafactor`` refuse a split leaf (keep it whole with a
   ``Replicate()`` placement).

**Placement rule** (:func:`placements_for`): a floating leaf with at least one dimension,
at least as many rows as ranks and at least ``min_numel`` elements is ``Shard(0)`` (rows
split as ``torch.chunk`` does: the last rank may hold fewer); anything else (0-dim and
integer leaves, small biases, a leaf with fewer rows than ranks) is ``Replicate``, as
sharding it would cost a collective per step for nothing. ``placements={selector:
placement}`` overrides the rule for the leaves a :func:`functorch_diary.tree.select`
selector picks (the first selector that picks a leaf wins). An optimiser-state leaf whose
path ends with a param's key and has that param's shape (Adam's ``mu``, SGD's momentum)
takes the param's placement; counts and scalars are replicated.

**BatchNorm** (``sync_batch_norm=True``, the default): batch statistics are synchronised
over the ranks, as ``nn.SyncBatchNorm`` does: the mean and variance of the whole global
batch normalise every shard (two differentiable ``all_reduce`` s per BatchNorm layer), and
the running statistics are updated from them, so they are the same on every rank and the
step equals the single-process step on the whole batch, BatchNorm models included. Model
state is therefore ``Replicate``. ``sync_batch_norm=False`` uses per-shard statistics
(``DataParallel``'s behaviour) and averages the running statistics over the ranks, as
:func:`~functorch_diary.training.distributed.make_data_parallel_train_step` does.

Dropout masks differ per rank (the key is folded with the rank), as each shard holds
different samples.

Example (one process: a mesh of one rank, where every collective is a no-op):
    >>> import torch
    >>> import torch.distributed as dist
    >>> from torch import nn
    >>> from functorch_diary import Model, optim, init_train_state
    >>> from functorch_diary.training import sharded
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> model, opt = Model(lambda: nn.Linear(4, 2)), optim.adamw(0.1)
    >>> ts = sharded.shard_train_state(init_train_state(model, opt), sharded.make_mesh())
    >>> ts.params["weight"].placements
    (Replicate(),)
    >>> step = sharded.make_sharded_train_step(model, nn.functional.mse_loss, opt)
    >>> ts, metrics = step(ts, (torch.ones(8, 4), torch.zeros(8, 2)))
    >>> sorted(sharded.gather_train_state(ts).params)
    ['bias', 'weight']
    >>> dist.destroy_process_group()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import optree
import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard
from torch.distributed.tensor import empty as dtensor_empty
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .. import prng
from ..model.core import Model, State
from ..optim.base import GradientTransformation
from ..optim.shards import local_shards
from ..tree import (
    PyTree,
    Selector,
    select,
    tree_flatten_with_paths,
    tree_leaves,
    tree_map,
    tree_unflatten_like,
)
from .distributed import DistributedError, all_reduce_mean, collective_failure
from .step import (
    Batch,
    LossFn,
    LossSees,
    Objective,
    TrainState,
    apply_step,
    build_step,
    consuming,
    step_key,
)

__all__ = [
    "DEFAULT_MIN_NUMEL",
    "empty_train_state",
    "gather_train_state",
    "gather_tree",
    "local_bytes",
    "make_mesh",
    "make_sharded_train_step",
    "placements_for",
    "shard_train_state",
    "shard_tree",
    "sync_batch_norm",
]

#: Leaves with fewer elements are replicated by default: sharding a bias costs one
#: all-gather and one reduce-scatter per step to save a few hundred bytes.
DEFAULT_MIN_NUMEL = 1024


def make_mesh(device_type: str | None = None) -> DeviceMesh:
    """The one-dimensional mesh over every rank of the default process group.

    Args:
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL); default from the backend.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            "no process group: call training.distributed.init_from_env() (under torchrun) "
            "before make_mesh()"
        )
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def _default_placement(leaf: Tensor, ranks: int, min_numel: int) -> Placement:
    shardable = (
        leaf.is_floating_point()
        and leaf.dim() >= 1
        and leaf.shape[0] >= ranks
        and leaf.numel() >= min_numel
    )
    return Shard(0) if shardable else Replicate()


def placements_for(
    tree: PyTree,
    mesh: DeviceMesh | int,
    placements: Mapping[Selector, Placement] | None = None,
    *,
    min_numel: int = DEFAULT_MIN_NUMEL,
) -> PyTree:
    """The placement of every leaf of ``tree``: the rule in the module docstring, then the
    user's ``{selector: placement}`` (first match wins). ``mesh`` may be its size.

    Raises:
        ValueError: a selector matches no leaf, or a ``Shard(d)`` names a dimension the
            leaf lacks (the message names the leaf and its shape).

    Example:
        >>> import torch
        >>> from torch.distributed.tensor import Replicate
        >>> tree = {"fc.weight": torch.ones(64, 32), "fc.bias": torch.ones(64)}
        >>> placements_for(tree, 2)
        {'fc.weight': Shard(dim=0), 'fc.bias': Replicate()}
        >>> placements_for(tree, 2, {"fc.weight": Replicate()})["fc.weight"]
        Replicate()
    """
    ranks = mesh if isinstance(mesh, int) else mesh.size()
    chosen = tree_map(lambda leaf: _default_placement(leaf, ranks, min_numel), tree)
    masks = [(select(tree, spec), placement) for spec, placement in (placements or {}).items()]
    paths = [path for path, _ in tree_flatten_with_paths(tree)]
    out = []
    for index, (leaf, default) in enumerate(
        zip(tree_leaves(tree), tree_leaves(chosen), strict=True)
    ):
        placement = next((p for mask, p in masks if tree_leaves(mask)[index]), default)
        if isinstance(placement, Shard) and not (0 <= placement.dim < max(leaf.dim(), 1)):
            raise ValueError(
                f"leaf {paths[index]!r} of shape {tuple(leaf.shape)} cannot take "
                f"{placement}: it has {leaf.dim()} dimensions; use Replicate() for it"
            )
        out.append(placement)
    return tree_unflatten_like(tree, out)


def _place(leaf: Tensor, mesh: DeviceMesh, placement: Placement) -> DTensor:
    # Every rank holds the same full leaf (same seed, or loaded from one file), so each
    # cuts its own piece locally: no collective, no copy of the other ranks' pieces.
    if isinstance(placement, Shard):
        pieces = torch.chunk(leaf, mesh.size(), dim=placement.dim)
        rank = mesh.get_local_rank()
        local = pieces[rank] if rank < len(pieces) else leaf.narrow(placement.dim, 0, 0)
    else:
        local = leaf
    local = local.detach().clone().to(mesh.device_type)
    return DTensor.from_local(
        local, mesh, [placement], run_check=False, shape=leaf.shape, stride=leaf.stride()
    )


def shard_tree(tree: PyTree, mesh: DeviceMesh, placements: PyTree) -> PyTree:
    """``tree`` as DTensors with the given placements (a tree like ``tree``, e.g. from
    :func:`placements_for`). Each rank must pass the same full tree; none is modified."""
    return tree_map(lambda leaf, p: _place(leaf, mesh, p), tree, placements)


def gather_tree(tree: PyTree) -> PyTree:
    """Every DTensor leaf as the full tensor (an all-gather); other leaves as they are."""
    return tree_map(lambda x: x.full_tensor() if isinstance(x, DTensor) else x, tree)


def _opt_state_placements(opt_state: Any, params: Mapping[str, Tensor], param_places) -> Any:
    """A param's placement for each optimiser-state leaf that mirrors it, else Replicate."""
    keys = sorted(params, key=len, reverse=True)  # the longest key wins: "10.w" over "0.w"
    out = []
    for path, leaf in tree_flatten_with_paths(opt_state):
        owner = next(
            (k for k in keys if (path == k or path.endswith("." + k))
             and tuple(params[k].shape) == tuple(leaf.shape)),
            None,
        )  # fmt: skip
        out.append(param_places[owner] if owner is not None else Replicate())
    return tree_unflatten_like(opt_state, out)


def shard_train_state(
    ts: TrainState,
    mesh: DeviceMesh,
    placements: Mapping[Selector, Placement] | None = None,
    *,
    min_numel: int = DEFAULT_MIN_NUMEL,
) -> TrainState:
    """A single-process ``TrainState`` as DTensors on ``mesh`` (every rank passes the same).

    Params by :func:`placements_for`, optimiser-state leaves like the param they mirror,
    model state replicated; ``step`` and ``rng`` stay plain tensors (equal everywhere).
    """
    if not isinstance(ts.params, Mapping):
        raise TypeError(
            f"params must be a dict keyed like named_parameters(), got {type(ts.params)}"
        )
    param_places = placements_for(ts.params, mesh, placements, min_numel=min_numel)
    opt_places = _opt_state_placements(ts.opt_state, ts.params, param_places)
    replicate = tree_map(lambda _: Replicate(), ts.state)
    return TrainState(
        shard_tree(ts.params, mesh, param_places),
        shard_tree(ts.state, mesh, replicate),
        shard_tree(ts.opt_state, mesh, opt_places),
        ts.step.clone(),
        ts.rng.clone(),
    )


def empty_train_state(
    model: Model,
    optimizer: GradientTransformation,
    mesh: DeviceMesh,
    placements: Mapping[Selector, Placement] | None = None,
    *,
    dtype: torch.dtype | None = None,
    min_numel: int = DEFAULT_MIN_NUMEL,
) -> TrainState:
    """A sharded ``TrainState`` with the placements :func:`shard_train_state` gives, whose
    params and state are uninitialised: the ``like=`` of a distributed checkpoint load.

    Only the local shards are allocated (the whole model never is, on any rank), so a
    model too large for one rank can be resumed. ``dtype`` replaces the template's
    floating dtype, as ``init_train_state(dtype=)`` does.
    """

    def spec_dtype(spec: Any) -> torch.dtype:
        return dtype if dtype is not None and spec.dtype.is_floating_point else spec.dtype

    shapes = {
        name: torch.empty(spec.shape, dtype=spec_dtype(spec), device="meta")
        for name, spec in model.param_specs.items()
    }
    param_places = placements_for(shapes, mesh, placements, min_numel=min_numel)

    def empty(leaf: Tensor, placement: Placement) -> DTensor:
        return dtensor_empty(leaf.shape, dtype=leaf.dtype, device_mesh=mesh, placements=[placement])

    params = tree_map(empty, shapes, param_places)
    state = {
        name: empty(torch.empty(spec.shape, dtype=spec_dtype(spec), device="meta"), Replicate())
        for name, spec in model.state_specs.items()
    }
    # The optimiser's own scalars (counts, injected rates) come back as plain tensors:
    # replicate them, as shard_train_state does.
    opt_state = tree_map(
        lambda x: x if isinstance(x, DTensor) else _place(x, mesh, Replicate()),
        optimizer.init(params),
    )
    device = mesh.device_type
    return TrainState(
        params,
        state,
        opt_state,
        torch.zeros((), dtype=torch.int64, device=device),
        prng.key(0, device=device),
    )


def gather_train_state(ts: TrainState) -> TrainState:
    """The single-process ``TrainState`` of a sharded one (plain full tensors)."""
    return TrainState(*(gather_tree(part) for part in ts))


def local_bytes(tree: PyTree) -> int:
    """Bytes this rank holds for ``tree``: each DTensor's local shard, other tensors whole."""
    leaves = [x.to_local() if isinstance(x, DTensor) else x for x in tree_leaves(tree)]
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, Tensor))


def _to_local(tree: PyTree) -> PyTree:
    return tree_map(lambda x: x.to_local() if isinstance(x, DTensor) else x, tree)


def _like(local: PyTree, template: PyTree) -> PyTree:
    """The local pieces in ``local`` wrapped as DTensors placed like ``template``'s leaves."""

    def wrap(piece: Any, like: Any) -> Any:
        if not isinstance(like, DTensor):
            return piece
        return DTensor.from_local(
            piece, like.device_mesh, like.placements, run_check=False,
            shape=like.shape, stride=like.stride(),
        )  # fmt: skip

    return tree_map(wrap, local, template)


def _sum_over_ranks(local: Tensor, mesh: DeviceMesh) -> Tensor:
    """The sum over the ranks of ``local`` (an all-reduce), differentiable: a Partial
    DTensor made Replicate, whose backward all-reduces too (the gradient is declared
    Partial), so each rank's loss reaches every rank's inputs."""
    partial = DTensor.from_local(local, mesh, [Partial()], run_check=False)
    return partial.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])


class _SyncBatchNorm(TorchFunctionMode):
    """``F.batch_norm`` in training mode with the statistics of the global batch."""

    def __init__(self, mesh: DeviceMesh):
        super().__init__()
        self.mesh = mesh

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.batch_norm:
            return func(*args, **kwargs)
        names = ("input", "running_mean", "running_var", "weight", "bias", "training",
                 "momentum", "eps")  # fmt: skip
        call = {**dict(zip(names, args, strict=False)), **kwargs}
        if not call.get("training", False):
            return func(*args, **kwargs)
        return self._batch_norm(**call)

    def _batch_norm(self, input, running_mean=None, running_var=None, weight=None,
                    bias=None, training=True, momentum=0.1, eps=1e-5):  # fmt: skip
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.tensor(
            [input.numel() // input.shape[1]], dtype=input.dtype, device=input.device
        )
        # Two passes over the data (mean, then squared deviations), as torch's own kernel
        # does, rather than E[x^2] - E[x]^2, which cancels catastrophically.
        totals = _sum_over_ranks(torch.cat([input.sum(dims), count]), self.mesh)
        n = totals[-1]
        mean = totals[:-1] / n
        centred = input - mean.reshape(shape)
        var = _sum_over_ranks(centred.square().sum(dims), self.mesh) / n
        out = centred * torch.rsqrt(var + eps).reshape(shape)
        if weight is not None:
            out = out * weight.reshape(shape)
        if bias is not None:
            out = out + bias.reshape(shape)
        if running_mean is not None and momentum is not None:
            with torch.no_grad():  # in place, as F.batch_norm does (apply passes copies)
                running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                unbiased = var.detach() * (n / (n - 1))
                running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        return out


def sync_batch_norm(mesh: DeviceMesh) -> TorchFunctionMode:
    """A context in which every training-mode BatchNorm uses the statistics of the whole
    batch over the ranks of ``mesh`` (``nn.SyncBatchNorm``'s behaviour, for any model)."""
    return _SyncBatchNorm(mesh)


def _params_mesh(params: PyTree) -> DeviceMesh:
    for leaf in tree_leaves(params):
        if isinstance(leaf, DTensor):
            return leaf.device_mesh
    raise TypeError("the params hold no DTensor: shard the TrainState with shard_train_state()")


def _is_split(leaf: Any) -> bool:
    return (
        isinstance(leaf, DTensor)
        and leaf.device_mesh.size() > 1
        and any(not isinstance(p, Replicate) for p in leaf.placements)
    )


def _whole(param: DTensor) -> Tensor:
    """The whole param as a plain tensor (an all-gather), differentiable: its backward
    declares the gradient ``Partial``, so the gradient comes back reduce-scattered."""
    return param.redistribute(param.device_mesh, [Replicate()]).to_local(
        grad_placements=[Partial()]
    )


class _GatherOnUse(TorchFunctionMode):
    """FSDP2's per-layer gathering, for any model: each op that takes a sharded param gets
    it whole (an all-gather just before the op), and autograd keeps only the shard of it
    for the backward pass (a saved-tensor hook re-gathers it when the backward needs it,
    as FSDP reshards after forward). So one param is whole at a time, not all of them."""

    # What reads a DTensor's metadata or identity, not its values: no gather needed.
    _METADATA = frozenset(
        {Tensor.dim, Tensor.size, Tensor.numel, Tensor.is_floating_point, Tensor.is_complex,
         Tensor.stride, Tensor.element_size, Tensor.__hash__, Tensor.is_contiguous,
         Tensor.requires_grad_, Tensor.detach}
    )  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        # Storage of each param gathered for the op running now -> that param's shard;
        # only while the op runs, when no other tensor can own that storage.
        self._gathered: dict[int, DTensor] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self):
        self._hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._hooks.__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "__get__" or func in self._METADATA:
            return func(*args, **kwargs)
        leaves = optree.tree_leaves((args, kwargs))
        if not any(isinstance(x, DTensor) for x in leaves):
            return func(*args, **kwargs)

        def gather(x: Any) -> Any:
            if not isinstance(x, DTensor):
                return x
            whole = _whole(x)
            if _is_split(x) and whole.numel():
                self._gathered[whole.untyped_storage().data_ptr()] = x.detach()
            return whole

        args, kwargs = optree.tree_map(gather, (args, kwargs))
        try:
            return func(*args, **kwargs)
        finally:
            self._gathered.clear()

    def _pack(self, saved: Tensor) -> Any:
        if not self._gathered or isinstance(saved, DTensor) or saved.layout != torch.strided:
            return saved
        shard = self._gathered.get(saved.untyped_storage().data_ptr())
        if shard is None or saved.dtype != shard.dtype:
            return saved
        return shard, saved.size(), saved.stride(), saved.storage_offset()

    @staticmethod
    def _unpack(packed: Any) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        shard, size, stride, offset = packed
        with torch.no_grad():
            whole = shard.redistribute(shard.device_mesh, [Replicate()]).to_local()
        return whole.as_strided(size, stride, offset)


def _sharded_objective(sync: bool) -> Callable[[Objective], Objective]:
    """The differentiated function of the sharded step, from the single-process one."""

    def wrap(objective: Objective) -> Objective:
        def sharded(params, state, inputs, targets, key):
            mesh = _params_mesh(params)
            with contextlib.ExitStack() as stack:
                if sync and mesh.size() > 1:
                    stack.enter_context(_SyncBatchNorm(mesh))
                stack.enter_context(_GatherOnUse())  # innermost: gathers before sync BN
                loss, (new_state, metrics) = objective(
                    params, _to_local(state), inputs, targets, key
                )
            # Each rank's loss is the mean over its shard: the gradients' reduction sums
            # over the ranks, so 1/size of it gives the whole batch's mean. The "loss"
            # metric stays this rank's mean (it overrides the scaled one in build_step).
            return loss / mesh.size(), (new_state, {**metrics, "loss": loss})

        return sharded

    return wrap


def make_sharded_train_step(
    model: Model,
    loss_fn: LossFn,
    optimizer: GradientTransformation,
    *,
    sync_batch_norm: bool = True,
    loss_sees: LossSees = "outputs, targets",
    has_aux: bool = False,
    model_inputs: Callable[[Any], Any] | None = None,
    donate: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Tensor]]]:
    """``make_train_step`` over sharded params: ``step(ts, local_batch) -> (ts, metrics)``.

    ``ts`` comes from :func:`shard_train_state`; ``local_batch`` is this rank's shard of
    the global batch (:func:`~functorch_diary.training.distributed.shard`). The step is
    :func:`~functorch_diary.training.step.build_step`, the body of ``make_train_step``,
    with the sharded hooks, so ``loss_sees``, ``has_aux``, ``model_inputs`` and ``donate``
    mean what they mean there. A loss that sees the params sees them whole. The metrics
    (``"loss"`` and the loss's auxiliary ones, which must be floating) are the means over
    the ranks: with equal shards, the whole batch's. With equal shards the step is the
    single-process step on the whole batch. Runs eagerly (``torch.compile`` of a step with
    collectives in its backward is not supported here).

    Raises:
        DistributedError: a collective failed (a rank died or timed out); the message
            names this rank and the one that died.
        ValueError: an optimiser stage that needs a whole leaf (``muon``, ``adafactor``)
            meets a split one, or ``dp_aggregate`` is used (the message says what to do).
    """

    def key_of(ts: TrainState) -> Tensor:
        # Each shard holds other samples: its dropout masks differ.
        return prng.fold_in(step_key(ts), _params_mesh(ts.params).get_local_rank())

    def reduce(grads: PyTree, loss: Tensor, new_state: State):
        # The state policy without synchronised BatchNorm: per-shard statistics, averaged.
        floating = {k: v for k, v in new_state.items() if v.is_floating_point()}
        floating = all_reduce_mean(floating, _params_mesh(grads).get_group(),
                                   what="all-reduce of the state")  # fmt: skip
        return grads, loss, {k: floating.get(k, v) for k, v in new_state.items()}

    def apply(ts: TrainState, grads: PyTree, new_state: State, opt, donate: bool) -> TrainState:
        mesh = _params_mesh(ts.params)
        # Each gradient on its param's placement: a sharded param's is reduce-scattered
        # already (the backward of its gather), a replicated one's is Partial and is
        # all-reduced here.
        grads = tree_map(
            lambda g, p: g.redistribute(p.device_mesh, p.placements).to_local(), grads, ts.params
        )
        # The update runs on the local shards, plain tensors, then is re-wrapped.
        split = {path: str(p.placements[0]) for path, p in ts.params.items() if _is_split(p)}
        local = TrainState(*(_to_local(part) for part in ts))
        with local_shards(split, lambda t: _sum_over_ranks(t, mesh)):
            new_local = apply_step(local, grads, new_state, opt, donate)
        return TrainState(
            _like(new_local.params, ts.params),
            _like(new_local.state, ts.state),
            _like(new_local.opt_state, ts.opt_state),
            new_local.step,
            new_local.rng,
        )

    body = build_step(
        model,
        loss_fn,
        optimizer,
        key_of=key_of,
        reduce=None if sync_batch_norm else reduce,
        loss_sees=loss_sees,
        has_aux=has_aux,
        model_inputs=model_inputs,
        donate=donate,
        wrap_objective=_sharded_objective(sync_batch_norm),
        apply=apply,
    )

    def step(ts: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Tensor]]:
        mesh = _params_mesh(ts.params)
        try:
            new_ts, metrics = body(ts, batch)
            metrics = all_reduce_mean(metrics, mesh.get_group(), what="all-reduce of the metrics")
        except DistributedError:
            raise
        except Exception as exc:
            if not _is_collective_failure(exc):
                raise
            raise collective_failure("a collective of the sharded step", exc) from exc
        return new_ts, metrics

    return consuming(step) if donate else step


def _is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) is a lost peer or timeout from the c10d backend."""
    while exc is not None:
        if isinstance(exc, (dist.DistBackendError, dist.DistError)):
            return True
        text = str(exc).lower()
        if any(s in text for s in ("connection closed", "connection reset", "timed out",
                                   "broken pipe", "gloo", "nccl")):  # fmt: skip
            return True
        exc = exc.__cause__ or exc.__context__
    return False
