"""What replaces hooks: intermediate values and their gradients, returned by a call.

Seed 003 (section 2.1.6) reaches intermediate layers with ``register_forward_hook``
(values) and ``y.register_hook`` (gradients): callbacks that write into outside
variables, which no function transformation can see through. Here the model's
``torch.fx`` graph is rewritten instead:

- :func:`intermediates` returns a :class:`~functorch_diary.Model` whose ``apply``
  returns a dict of named intermediate outputs (and stops computing after the last one:
  VGG19's ``features.33`` never runs the classifier);
- :func:`intermediate_grads` returns the gradient of a loss w.r.t. named intermediates
  by the perturbation trick: the graph adds a zero tensor ``delta`` to each one, and
  ``d loss / d delta`` at ``delta = 0`` is ``d loss / d intermediate``.

Both keep ``Model.apply`` 's contract: the same ``params``/``state`` dicts as the
original model, the ``train`` flag, ``rng``, and the new state.

Names are torchvision's feature-extraction node names (:func:`node_names` lists them):
a module's path (``"features.1"``, VGG19's relu1_1) or a function call inside a module
(``"layer1.0.add"``); a module path that is not a leaf names its last node (``"conv"``).

Activations that a later layer would overwrite in place (torchvision's
``ReLU(inplace=True)``) are computed out of place here: seed 000 item 6 returns
``net_1_1``'s conv output, and the next slice's in-place ReLU silently rewrites it.

Example:
    >>> import torch
    >>> from functorch_diary import models
    >>> from functorch_diary.model import features
    >>> model = models.lenet()
    >>> params, state = model.init(seed=0)
    >>> taps = features.intermediates(model, {"conv.1": "act1", "fc.0": "fc1"})
    >>> values, _ = taps.apply(params, state, torch.randn(2, 1, 28, 28))
    >>> {name: tuple(v.shape) for name, v in values.items()}
    {'act1': (2, 6, 24, 24), 'fc1': (2, 120)}
"""

from __future__ import annotations

import linecache
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor, fx, nn
from torch.func import grad_and_value

from .. import prng
from ..training.step import LossFn
from ..tree import Params, tree_map
from .core import Model, State

__all__ = ["IntermediateGrads", "intermediate_grads", "intermediates", "node_names"]

Names = Sequence[str] | Mapping[str, str]

def _tracer() -> fx.Tracer:
    # torchvision is imported here, not with the package: importing it loads its model
    # zoo and, through torchvision.ops, torch._dynamo, torch._inductor and sympy (seconds
    # on top of `import torch`) that only a traced model needs.
    import torchvision
    from torchvision.models.feature_extraction import NodePathTracer

    # torchvision.ops modules and our keyed dropout are leaves: fx records one call for
    # each instead of tracing into Python that branches on tensor values.
    leaves = [
        prng.KeyedDropout,
        *(
            obj
            for obj in vars(torchvision.ops).values()
            if isinstance(obj, type) and issubclass(obj, nn.Module)
        ),
    ]
    return NodePathTracer(leaf_modules=leaves, autowrap_modules=(math, torchvision.ops))


def _trace(root: nn.Module, train: bool) -> tuple[fx.Graph, dict[fx.Node, str]]:
    tracer = _tracer()
    was_training = root.training
    try:
        graph = tracer.trace(root.train(train))
    except Exception as error:  # fx raises many types; all mean "not traceable"
        raise ValueError(
            f"features needs a model torch.fx can trace ({type(root).__name__} in "
            f"{'train' if train else 'eval'} mode failed: {error})"
        ) from error
    finally:
        root.train(was_training)
    return graph, dict(tracer.node_to_qualname)


def node_names(model: Model, *, train: bool = False) -> list[str]:
    """The names :func:`intermediates` accepts, in execution order.

    Example:
        >>> from functorch_diary import models
        >>> node_names(models.lenet())[:3]
        ['img', 'conv.0', 'conv.1']
    """
    _, qualnames = _trace(model.template, train)
    return list(qualnames.values())


def _as_aliases(names: Names) -> dict[str, str]:
    aliases = dict(names) if isinstance(names, Mapping) else {str(n): str(n) for n in names}
    if not aliases:
        raise ValueError("give at least one intermediate name (see features.node_names(model))")
    if len(set(aliases.values())) != len(aliases):
        raise ValueError(f"two intermediates would share an output name: {aliases}")
    return aliases


def _find(query: str, qualnames: dict[fx.Node, str], train: bool) -> fx.Node:
    """The node called ``query``, or the last node inside the module path ``query``."""
    pattern = re.compile(rf"^{re.escape(query)}(\.|$)")
    found = [node for node, name in qualnames.items() if pattern.match(name)]
    if not found:
        shown = ", ".join(list(qualnames.values())[:12])
        raise ValueError(
            f"no intermediate named {query!r} in {'train' if train else 'eval'} mode; names look "
            f"like: {shown}, ... (features.node_names(model) lists them all)"
        )
    return found[-1]


def _rewrite(root: nn.Module, graph: fx.Graph, nodes: dict[str, fx.Node], taps: bool) -> None:
    """Make ``graph`` return the chosen nodes; with ``taps``, also add ``taps[alias]`` to
    each and return ``(original output, values)``."""
    (output,) = [node for node in graph.nodes if node.op == "output"]
    if taps:
        placeholders = [node for node in graph.nodes if node.op == "placeholder"]
        with graph.inserting_after(placeholders[-1]):
            deltas = graph.placeholder("taps")
        for alias, node in nodes.items():
            with graph.inserting_after(node):
                delta = graph.call_function(operator.getitem, (deltas, alias))
            with graph.inserting_after(delta):
                tapped = graph.call_function(operator.add, (node, delta))
            # Every later use, the graph's output included, now sees node + delta.
            node.replace_all_uses_with(tapped, delete_user_cb=lambda user, t=tapped: user is not t)
    result = output.args[0]
    graph.erase_node(output)
    if taps:
        graph.output((result, dict(nodes)))
    else:
        graph.output(dict(nodes))
        # Nothing after the last intermediate is computed. The purity check of module
        # calls looks the modules up in the graph's owner.
        graph.owning_module = root
        graph.eliminate_dead_code()
        graph.owning_module = None
    graph.lint()


def _compile(graph: fx.Graph, label: str) -> Callable[..., Any]:
    code = graph.python_code(root_module="self")
    filename = f"<functorch_diary.model.features {label}>"
    # Registered with linecache so tracebacks through the generated forward show its source.
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)
    return namespace["forward"]


class _Extracted(nn.Module):
    """The root module's own parameters, buffers and children, adopted under the same
    names and in the same order, with a rewritten ``forward`` per mode."""

    def __init__(self, root: nn.Module, forwards: dict[bool, Callable[..., Any]]) -> None:
        super().__init__()
        self._forwards = forwards
        for name, param in root._parameters.items():
            self.register_parameter(name, param)
        for name, buffer in root._buffers.items():
            persistent = name not in root._non_persistent_buffers_set
            self.register_buffer(name, buffer, persistent=persistent)
        for name, child in root._modules.items():
            self.add_module(name, child)
        self.train(root.training)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._forwards[self.training](self, *args, **kwargs)


def _build(factory: Callable[[], nn.Module], aliases: dict[str, str], taps: bool) -> nn.Module:
    root = factory()
    for sub in root.modules():
        if isinstance(getattr(sub, "inplace", None), bool):
            sub.inplace = False  # an intermediate must not be overwritten by the next layer
    # Tensors the generated forward reads must be leaves Model.apply swaps in.
    leaves = {name for name, _ in root.named_parameters()} | {n for n, _ in root.named_buffers()}
    forwards = {}
    for train in (True, False):
        graph, qualnames = _trace(root, train)
        nodes = {alias: _find(query, qualnames, train) for query, alias in aliases.items()}
        for node in graph.nodes:
            if node.op == "get_attr" and node.target not in leaves:
                raise ValueError(
                    f"features cannot extract from a model whose forward reads "
                    f"{node.target!r}, a tensor that is neither a parameter nor a buffer"
                )
        _rewrite(root, graph, nodes, taps)
        forwards[train] = _compile(graph, f"{type(root).__name__} {'train' if train else 'eval'}")
    return _Extracted(root, forwards)


def intermediates(model: Model, names: Names) -> Model:
    """A :class:`Model` whose ``apply`` returns named intermediate outputs of ``model``.

    Args:
        model: any traceable :class:`Model` (every torchvision classifier is).
        names: node names (see :func:`node_names`), or a dict ``{node name: output
            name}`` to rename them (``{"features.1": "relu1_1"}``).

    Returns:
        A model with the same ``params``/``state`` keys, the same ``init``, and ``apply(
        params, state, x, train=..., rng=...) -> ({output name: tensor}, new_state)``.

    Raises:
        ValueError: a name is not in the graph (the message lists the names that are),
            or the model cannot be traced by ``torch.fx``.
    """
    return Model(partial(_build, model.factory, _as_aliases(names), False))


class IntermediateGrads(NamedTuple):
    """What :func:`intermediate_grads` returns.

    Attributes:
        grads: output name -> ``d loss / d intermediate`` (the intermediate's shape).
        values: output name -> the intermediate's value.
        loss: the loss.
        outputs: the model's outputs.
        state: the new state (BatchNorm statistics in training mode).
    """

    grads: dict[str, Tensor]
    values: dict[str, Tensor]
    loss: Tensor
    outputs: Any
    state: State


def _meta_like(value: Any) -> Any:
    return torch.empty(value.shape, dtype=value.dtype, device="meta")


def intermediate_grads(
    model: Model, loss_fn: LossFn, names: Names
) -> Callable[..., IntermediateGrads]:
    """Build ``f(params, state, inputs, targets, *, train=False, rng=None) ->
    IntermediateGrads``: the gradient of the loss w.r.t. named intermediates.

    This is what ``y.register_hook(save_grad)`` records in seed 003, returned instead of
    written into an outer variable, so it composes with ``vmap``, ``grad`` and
    ``torch.compile``.

    Args:
        model: the :class:`Model`.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        names: as for :func:`intermediates`.

    Example:
        >>> import torch
        >>> from functorch_diary import models
        >>> from functorch_diary.model import features
        >>> model = models.lenet()
        >>> params, state = model.init(seed=0)
        >>> f = features.intermediate_grads(model, torch.nn.functional.cross_entropy, ["conv"])
        >>> out = f(params, state, torch.randn(2, 1, 28, 28), torch.tensor([1, 2]))
        >>> out.grads["conv"].shape
        torch.Size([2, 16, 4, 4])
    """
    aliases = _as_aliases(names)
    factory = model.factory
    values_model = Model(partial(_build, factory, aliases, False))
    tapped = Model(partial(_build, factory, aliases, True))

    def f(
        params: Params,
        state: State,
        inputs: Any,
        targets: Any,
        *,
        train: bool = False,
        rng: int | Tensor | None = None,
    ) -> IntermediateGrads:
        # The zero perturbations need the intermediates' shapes: a pass on the meta
        # device computes them without touching memory or the numbers.
        meta_rng = _meta_like(rng) if isinstance(rng, Tensor) else rng
        shapes, _ = values_model.apply(
            tree_map(_meta_like, params),
            tree_map(_meta_like, state),
            tree_map(_meta_like, inputs),
            train=train,
            rng=meta_rng,
        )
        device = next(iter(params.values())).device
        zeros = {
            alias: torch.zeros(v.shape, dtype=v.dtype, device=device) for alias, v in shapes.items()
        }

        def loss_of(deltas: dict[str, Tensor]):
            (outputs, values), new_state = tapped.apply(
                params, state, inputs, train=train, rng=rng, taps=deltas
            )
            return loss_fn(outputs, targets), (values, outputs, new_state)

        grads, (loss, (values, outputs, new_state)) = grad_and_value(loss_of, has_aux=True)(zeros)
        return IntermediateGrads(grads, values, loss, outputs, new_state)

    return f
