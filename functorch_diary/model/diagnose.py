"""Turn an error raised deep inside a layer into one that names the layer.

A UNet with one wrong ``in_channels`` fails with ``Given groups=1, weight of size
[64, 3, 3, 3], expected input[4, 64, 158, 158] to have 3 channels, but got 64 channels
instead``: torch says
what failed, not *where*. On that error path only, :func:`locate_layer_error` runs the
forward again on a copy of the template with forward hooks that keep the stack of
running submodules; the deepest one when the error comes back is the failing layer. It
reports the layer's path, its definition, the shapes it received and what to change.
The copy keeps the model's own template free of hooks, and nothing runs when there is
no error.

:func:`stack_batch` is ``torch.stack`` for a list of samples with mixed image sizes
(say 320x320 next to random 192x192 crops) reported as such, with the fixes that keep a
batch rectangular.

The same re-run notices layers *created inside* ``forward`` (the classic bug: their
weights are not parameters, so they are never trained and are not moved to the GPU):
:func:`layers_created_in_forward`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from functorch_diary import Model
    >>> from functorch_diary.model.diagnose import locate_layer_error
    >>> model = Model(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)))
    >>> params, state = model.init(seed=0)
    >>> x = torch.randn(1, 3, 8, 8)
    >>> try:
    ...     model.apply(params, state, x)
    ... except RuntimeError as exc:
    ...     error = exc if hasattr(exc, "path") else locate_layer_error(
    ...         model.template, {**params, **state}, (x,), {}, exc)
    >>> error.path
    '1'
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "LayerError",
    "check_has_forward",
    "layers_created_in_forward",
    "locate_layer_error",
    "stack_batch",
]


class LayerError(RuntimeError):
    """An error inside the layer at ``path`` (``""`` for the model's own forward).

    Attributes:
        path: the submodule's name, as in ``named_modules()``.
    """

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


def check_has_forward(module: nn.Module) -> None:
    """Raise a clear ``TypeError`` when ``module`` has no ``forward`` (``ModuleList``...).

    ``nn.ModuleList``/``nn.ModuleDict`` are containers, not
    networks: calling one raises ``NotImplementedError`` at the first batch. Checking the
    class when a ``Model`` is built reports it before any training starts.

    Example:
        >>> from torch import nn
        >>> check_has_forward(nn.Sequential(nn.Linear(2, 2)))
        >>> check_has_forward(nn.ModuleList([nn.Linear(2, 2)]))
        Traceback (most recent call last):
        ...
        TypeError: ModuleList has no forward(): ...
    """
    if type(module).forward is nn.Module.forward:
        name = type(module).__name__
        raise TypeError(
            f"{name} has no forward(): it stores layers but does not say how to chain them, "
            f"so it cannot be a model. Use nn.Sequential(*layers) to run them in order, or "
            f"write an nn.Module whose forward() calls the layers of the {name}"
        )


def _describe(values: Any) -> str:
    shown = []
    for value in values if isinstance(values, (tuple, list)) else (values,):
        if isinstance(value, Tensor):
            shown.append(
                f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')} on {value.device}"
            )
        else:
            shown.append(type(value).__name__)
    return ", ".join(shown) or "nothing"


class _Probe:
    """Re-runs a forward with hooks; records the running stack and created parameters."""

    def __init__(self, template: nn.Module) -> None:
        self.module = copy.deepcopy(template)
        self.names = {id(m): name for name, m in self.module.named_modules()}
        self.stack: list[tuple[str, nn.Module, tuple[Any, ...]]] = []
        self.last_done: tuple[str, Any] | None = None
        self.created: list[str] = []

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.stack.append((self.names[id(module)], module, args))

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        name, _, _ = self.stack.pop()
        self.last_done = (name, output)

    def _registered(self, module: nn.Module, name: str, param: Any) -> None:
        # Fires for parameters registered while forward runs: a layer built inside forward.
        owner = self.stack[-1][0] if self.stack else ""
        where = f"layer {owner!r}" if owner else "the model"
        self.created.append(f"{type(module).__name__}.{name} (built in the forward of {where})")

    def run(self, tensors: Mapping[str, Tensor], inputs: Sequence[Any], kwargs: Mapping[str, Any]):
        """The exception of the re-run, or ``None`` if it succeeded."""
        handles = [m.register_forward_pre_hook(self._pre) for m in self.module.modules()]
        handles += [m.register_forward_hook(self._post) for m in self.module.modules()]
        handles.append(
            torch.nn.modules.module.register_module_parameter_registration_hook(self._registered)
        )
        # Copies of the buffers and inputs: layers may write into them in place (BatchNorm's
        # statistics, ReLU(inplace=True)), and the re-run must leave the caller's untouched.
        buffers = {name for name, _ in self.module.named_buffers()}
        tensors = {k: v.clone() if k in buffers else v for k, v in tensors.items()}
        inputs = [x.clone() if isinstance(x, Tensor) else x for x in inputs]
        try:
            functional_call(self.module, tensors, tuple(inputs), dict(kwargs), strict=False)
        except Exception as exc:
            return exc
        finally:
            for handle in handles:
                handle.remove()
        return None


def _hint(message: str, module: nn.Module, created: list[str]) -> str:
    channels = re.search(r"to have (\d+) channels, but got (\d+) channels", message)
    if channels:
        want, got = channels.groups()
        return (
            f"this layer was built for {want} input channels but receives {got}: build it "
            f"with in_channels={got}, or fix the layer before it to output {want}"
        )
    matmul = re.search(
        r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)", message
    )
    if matmul and isinstance(module, nn.Linear):
        got = matmul.group(2)
        return (
            f"this layer was built with in_features={module.in_features} but receives "
            f"{got} features: build it with in_features={got}, or check the input image "
            "size (the flattened size depends on it)"
        )
    if created:
        return (
            "layers created inside forward() are not parameters: they are drawn at random "
            "on every call, never trained, and never moved to the params' device. Create "
            "them in __init__"
        )
    if "device" in message or "Input type" in message:
        return (
            "a tensor used by this layer is not on the params' device: create tensors "
            "inside forward() with device=x.device, and layers in __init__"
        )
    return "check this layer's constructor arguments against the input it receives"


def locate_layer_error(
    template: nn.Module,
    tensors: Mapping[str, Tensor],
    inputs: Sequence[Any],
    kwargs: Mapping[str, Any],
    error: BaseException,
) -> LayerError | None:
    """A :class:`LayerError` naming the layer where ``error`` happens, or ``None``.

    Call it from an ``except`` around ``functional_call``; it re-runs the forward once on
    a hooked copy of ``template`` (the model's template is not touched). ``None`` when the
    re-run does not raise the same kind of error (e.g. the error came from elsewhere).

    Args:
        template: the module ``functional_call`` ran (in the mode it ran in).
        tensors: the params and buffers it ran with.
        inputs, kwargs: the inputs it ran on.
        error: the exception it raised.

    Returns:
        A :class:`LayerError` whose message names the layer path, its definition, the
        shapes it received, torch's own message and what to change.
    """
    probe = _Probe(template)
    again = probe.run(tensors, inputs, kwargs)
    if again is None or type(again) is not type(error) or not probe.stack:
        return None
    path, module, args = probe.stack[-1]
    original = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    where = f"layer {path!r} ({module!r})" if path else f"the forward of {type(module).__name__}"
    lines = [f"{where} failed on input {_describe(args)}: {original}"]
    if not path and probe.last_done is not None:
        done, output = probe.last_done
        lines.append(f"the last layer to finish was {done!r}, which returned {_describe(output)}")
    if probe.created:
        lines.append(f"parameters created during forward: {', '.join(probe.created)}")
    lines.append(f"what to do: {_hint(str(error), module, probe.created)}")
    return LayerError("\n".join(lines), path)


def layers_created_in_forward(
    template: nn.Module, tensors: Mapping[str, Tensor], *inputs: Any, **kwargs: Any
) -> list[str]:
    """Parameters that the forward of ``template`` creates while it runs (should be none).

    The classic bug of an ``nn.Conv2d`` built inside ``forward``. Its weights are not in
    ``params``: they are re-drawn on every call, never trained, and stay on the CPU when
    the params are on the GPU. Run this once on an example batch to be sure.

    Args:
        template: e.g. ``model.template``.
        tensors: ``{**params, **state}``.
        *inputs, **kwargs: an example batch.

    Returns:
        ``"Conv2d.weight (built in the forward of layer 'block')"``-style descriptions.

    Example:
        >>> from torch import nn
        >>> from functorch_diary import Model
        >>> class Bad(nn.Module):
        ...     def forward(self, x):
        ...         return nn.Linear(2, 2)(x)
        >>> model = Model(Bad)
        >>> layers_created_in_forward(model.template, {}, torch.ones(1, 2))
        ['Linear.weight (built in the forward of the model)',
         'Linear.bias (built in the forward of the model)']
    """
    probe = _Probe(template)
    error = probe.run(tensors, inputs, kwargs)
    if error is not None and not probe.created:
        raise error
    return probe.created


def stack_batch(samples: Sequence[Tensor]) -> Tensor:
    """``torch.stack(samples)``, with a clear error when the samples' shapes differ.

    Offline augmentation can mix 320x320 images with randomly cropped 192x192 ones;
    such a batch cannot be one tensor.

    Raises:
        ValueError: naming the first sample whose shape differs from sample 0's, both
            shapes, and what to do.

    Example:
        >>> import torch
        >>> stack_batch([torch.zeros(3, 4, 4), torch.zeros(3, 4, 4)]).shape
        torch.Size([2, 3, 4, 4])
        >>> stack_batch([torch.zeros(3, 320, 320), torch.zeros(3, 192, 192)])
        Traceback (most recent call last):
        ...
        ValueError: sample 1 has shape (3, 192, 192) but sample 0 has (3, 320, 320): ...
    """
    if not samples:
        raise ValueError("stack_batch got no samples")
    first = tuple(samples[0].shape)
    for index, sample in enumerate(samples):
        if tuple(sample.shape) != first:
            raise ValueError(
                f"sample {index} has shape {tuple(sample.shape)} but sample 0 has {first}: a "
                "batch is one tensor, so every sample needs the same size. Crop or resize each "
                "sample to one size when the batch is drawn (online augmentation), or pad to the "
                "largest size with an ignore_index label for segmentation targets"
            )
    return torch.stack(list(samples))
