"""Neural style transfer (seed 000, Day 5) as a pure loss over VGG19 feature slices.

Seed 000 slices a pretrained ``vgg19`` into five ``nn.Sequential`` s (item 6), freezes
its parameters with ``requires_grad_(False)`` and marks the image ``requires_grad``
(item 7), and normalises with ImageNet's mean and std (item 10). Here:

- the network is only VGG19's ``features`` up to relu5_3 (``features.33``), as a
  :class:`~functorch_diary.Model` whose keys are torchvision's, so the torchvision
  file loads unchanged (the 400 MB classifier is never read: the file is memory-mapped);
- the slices are :func:`functorch_diary.model.features.intermediates` outputs (no hooks, no
  in-place ReLU rewriting an earlier slice's output);
- the loss is a pure function of the image; the VGG params are simply not an argument
  of the gradient, so nothing needs freezing;
- the image is optimised with the functional Adam (:func:`functorch_diary.optim.adam`)
  or with L-BFGS.

Example:
    >>> import torch
    >>> from functorch_diary.zoo import style
    >>> vgg = style.vgg19_features()
    >>> params, state = vgg.init(seed=0)
    >>> content, target = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    >>> loss = style.make_style_loss(vgg, params, state, content, target)
    >>> total, parts = loss(content)
    >>> sorted(parts)
    ['content', 'style']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import grad_and_value
from torchvision.models.vgg import cfgs, make_layers

from .. import optim
from ..checkpoint.format import CheckpointError
from ..checkpoint.torch_files import load_torch_file
from ..model import features
from ..model.core import Model, State
from ..tree import Params

__all__ = [
    "CONTENT_LAYERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "STYLE_LAYERS",
    "VGG19_LAYERS",
    "VGG19Features",
    "gram_matrix",
    "load_vgg19_features",
    "make_style_loss",
    "normalize",
    "transfer",
    "vgg19_features",
]

#: Seed 000 item 6's five slices, as torchvision ``vgg19`` node names.
VGG19_LAYERS = {
    "relu1_1": "features.1",
    "relu2_1": "features.6",
    "relu3_3": "features.15",
    "relu4_3": "features.24",
    "relu5_3": "features.33",
}
CONTENT_LAYERS = ("relu4_3",)
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_3", "relu4_3", "relu5_3")
#: Seed 000 item 10: torchvision's ImageNet normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DEPTH = 34  # features.0 .. features.33 (relu5_3); the rest of VGG19 is never needed


class VGG19Features(nn.Module):
    """torchvision's ``vgg19().features`` cut after relu5_3, under the attribute
    ``features`` so ``state_dict`` keys (``features.0.weight``...) are torchvision's.

    Layers are built by torchvision's own ``make_layers``; convolutions are
    initialised as ``torchvision.models.VGG`` does (Kaiming normal, fan out, zero bias).
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = make_layers(cfgs["E"], batch_norm=False)[:_DEPTH]
        for module in self.features:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(module.bias, 0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


def vgg19_features() -> Model:
    """The :class:`Model` of :class:`VGG19Features` (random init; see
    :func:`load_vgg19_features` for the pretrained weights)."""
    return Model(VGG19Features)


def _missing_weights(path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"VGG19 weights file {str(path)!r} not found. functorch-diary never downloads. On a "
        "machine with internet, save torchvision's vgg19 IMAGENET1K_V1 weights with\n"
        '  python -c "import torch, torchvision; torch.save(torchvision.models.vgg19('
        "weights='IMAGENET1K_V1').state_dict(), 'vgg19.pth')\"\n"
        "(or copy ~/.cache/torch/hub/checkpoints/vgg19-dcbb9e9d.pth) and pass its path."
    )


def load_vgg19_features(
    path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Model, Params, State]:
    """VGG19 features up to relu5_3 with weights from a torchvision ``vgg19`` file.

    The file is read with ``checkpoint.load_torch_file`` (no code runs) and, when it
    is in torch's zip format, memory-mapped, so only the ``features.*`` tensors are ever
    read; classifier keys are ignored. A file holding only ``features.*`` keys works too.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message says how to get it).
        CheckpointError: the file is not a ``torch.save`` file of a dict of tensors
            (garbage, truncated, or asking to run code); the message names it.
        TreeMismatchError: a needed key is missing or has the wrong shape.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing_weights(path)
    # Memory-mapping reads only the tensors we touch.
    state_dict = load_torch_file(path, mmap=True)
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{str(path)!r} does not hold a state_dict (a dict of tensors)")
    model = vgg19_features()
    wanted = set(model.param_specs) | set(model.state_specs)
    params, state = model.from_state_dict({k: v for k, v in state_dict.items() if k in wanted})
    params = {k: v.to(device=device, dtype=dtype) for k, v in params.items()}
    state = {k: v.to(device=device) for k, v in state.items()}
    return model, params, state


def normalize(images: Tensor) -> Tensor:
    """``(images - mean) / std`` per channel with ImageNet's statistics (seed 000 item 10);
    ``images`` are ``(N, 3, H, W)`` in ``[0, 1]``."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def gram_matrix(feature: Tensor) -> Tensor:
    """``(N, C, H, W) -> (N, C, C)``: channel correlations divided by ``C * H * W``.

    Example:
        >>> import torch
        >>> gram_matrix(torch.ones(1, 2, 3, 3))
        tensor([[[0.5000, 0.5000],
                 [0.5000, 0.5000]]])
    """
    n, c, h, w = feature.shape
    flat = feature.reshape(n, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


def make_style_loss(
    vgg: Model,
    params: Params,
    state: State,
    content: Tensor,
    style: Tensor,
    *,
    content_layers: Sequence[str] = CONTENT_LAYERS,
    style_layers: Sequence[str] = STYLE_LAYERS,
    content_weight: float = 1.0,
    style_weight: float = 1e6,
) -> Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]]:
    """The pure loss ``image -> (total, {"content": ..., "style": ...})``.

    ``content = mean over content layers of MSE(F(image), F(content))`` and ``style =
    sum over style layers of MSE(G(F(image)), G(F(style)))`` with ``G`` the
    :func:`gram_matrix`; ``total = content_weight * content + style_weight * style``.
    Images are in ``[0, 1]`` and normalised inside. The targets are computed once here.

    Args:
        vgg: :func:`vgg19_features` (or any model with the :data:`VGG19_LAYERS` nodes).
        params, state: its weights.
        content, style: ``(1, 3, H, W)`` images in ``[0, 1]``.
        content_layers, style_layers: names from :data:`VGG19_LAYERS`.
        content_weight, style_weight: the two weights.
    """
    unknown = sorted((set(content_layers) | set(style_layers)) - set(VGG19_LAYERS))
    if unknown:
        raise ValueError(f"unknown layers {unknown}; choose from {sorted(VGG19_LAYERS)}")
    wanted = [n for n in VGG19_LAYERS if n in set(content_layers) | set(style_layers)]
    extractor = features.intermediates(vgg, {VGG19_LAYERS[name]: name for name in wanted})

    def feats(image: Tensor) -> dict[str, Tensor]:
        return extractor.apply(params, state, normalize(image), train=False)[0]

    content_targets = {n: f.detach() for n, f in feats(content).items() if n in content_layers}
    style_targets = {
        n: gram_matrix(f).detach() for n, f in feats(style).items() if n in style_layers
    }

    def loss(image: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        found = feats(image)
        content_loss = sum(
            nn.functional.mse_loss(found[n], content_targets[n]) for n in content_layers
        ) / len(content_layers)
        style_loss = sum(
            nn.functional.mse_loss(gram_matrix(found[n]), style_targets[n]) for n in style_layers
        )
        total = content_weight * content_loss + style_weight * style_loss
        return total, {"content": content_loss, "style": style_loss}

    return loss


def transfer(
    loss: Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]],
    image: Tensor,
    *,
    steps: int = 300,
    lr: float = 0.02,
    method: str = "adam",
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> Tensor:
    """Optimise ``image`` (a new tensor is returned; ``image`` is not modified).

    Args:
        loss: from :func:`make_style_loss`.
        image: the starting image, usually the content image.
        steps: Adam steps, or L-BFGS iterations.
        lr: the learning rate (L-BFGS: its step length, 1.0 is usual).
        method: ``"adam"``: the functional Adam with the image clipped back to ``[0, 1]``
            after every step (a projection); ``"lbfgs"``: ``torch.optim.LBFGS`` (strong
            Wolfe line search) driving the same pure loss, clipped at the end.
        progress: called after each step with ``(step, {"loss", "content", "style"})``.

    Returns:
        The stylised image, in ``[0, 1]``.
    """
    if method == "adam":
        return _transfer_adam(loss, image, steps, lr, progress)
    if method == "lbfgs":
        return _transfer_lbfgs(loss, image, steps, lr, progress)
    raise ValueError(f"method must be 'adam' or 'lbfgs', got {method!r}")


def _report(progress, step: int, total: Tensor, parts: dict[str, Tensor]) -> None:
    if progress is not None:
        progress(step, {"loss": float(total), **{k: float(v) for k, v in parts.items()}})


def _transfer_adam(loss, image: Tensor, steps: int, lr: float, progress) -> Tensor:
    opt = optim.adam(lr)
    params = {"image": image.detach().clone()}
    opt_state = opt.init(params)
    loss_and_grad = grad_and_value(lambda p: loss(p["image"]), has_aux=True)
    for step in range(steps):
        grads, (total, parts) = loss_and_grad(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = {"image": optim.apply_updates(params, updates)["image"].clamp(0.0, 1.0)}
        _report(progress, step, total, parts)
    return params["image"]


def _transfer_lbfgs(loss, image: Tensor, steps: int, lr: float, progress) -> Tensor:
    # L-BFGS needs closures and line searches: torch.optim's, on a private leaf tensor.
    x = image.detach().clone().requires_grad_(True)
    lbfgs = torch.optim.LBFGS(
        [x], lr=lr, max_iter=1, history_size=20, line_search_fn="strong_wolfe"
    )
    seen: list = []  # the last closure call's loss and parts, for the progress report
    for step in range(steps):

        def closure() -> Tensor:
            lbfgs.zero_grad()
            total, parts = loss(x)
            total.backward()
            seen[:] = [total.detach(), {k: v.detach() for k, v in parts.items()}]
            return total

        lbfgs.step(closure)
        _report(progress, step, seen[0], seen[1])
    return x.detach().clamp(0.0, 1.0)
