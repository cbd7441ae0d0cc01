"""GAN training as pure functions: losses, the gradient penalty, critic and generator steps.

The imperative GAN loop (seed 002, after WonwoongCho's inpainting code) shares one graph
between the two losses and needs ``d_loss.backward(retain_graph=True)`` so the
generator's backward can still walk it; WGAN clips with ``p.data.clamp_`` (seed 000,
error 9). Here each network's update is its own pure function built on
``torch.func.grad_and_value``:

- the **critic step** maps ``(gan_state, real, z, alpha)`` to a new ``GANState``: the
  generator's output enters as a constant (no graph to keep, nothing to detach), the
  gradient penalty is a ``torch.func`` per-sample input gradient that the critic's own
  gradient differentiates through, and a projection (weight clipping) may follow;
- the **generator step** maps ``(gan_state, z)`` to a new ``GANState``, differentiating
  through a critic whose parameters it never touches.

Each step builds its graph, takes the gradient and drops the graph: there is no
``retain_graph``, no ``zero_grad``, no ``.data``, and nothing survives from one step
to the next but the ``GANState``. All random inputs (noise ``z``, interpolation
weights ``alpha``) are explicit arguments, so a run is reproducible from its inputs.

Both networks run in training mode in both steps, as in the usual imperative loop
(the critic's BatchNorm statistics and spectral-norm vectors move in the generator step
too); their states are threaded through every call in the imperative order
(critic: real then fake).

Example:
    >>> import torch
    >>> from functorch_diary import optim
    >>> from functorch_diary.training import gan
    >>> from functorch_diary.zoo.models.dcgan import dcgan_discriminator, dcgan_generator
    >>> g = dcgan_generator(latent_dim=4, width=2, image_size=8)
    >>> d = dcgan_discriminator(width=2, image_size=8, norm="none")
    >>> gs = gan.init_gan_state(g, d, optim.adam(1e-4, (0.5, 0.9)), optim.adam(1e-4, (0.5, 0.9)))
    >>> critic_step = gan.make_critic_step(g, d, gan.wasserstein_critic_loss,
    ...                                    optim.adam(1e-4, (0.5, 0.9)), penalty_weight=10.0)
    >>> real, z, alpha = torch.rand(3, 1, 8, 8), torch.randn(3, 4), torch.rand(3)
    >>> gs, metrics = critic_step(gs, real, z, alpha)
    >>> sorted(metrics), int(gs.critic.step)
    (['critic_loss', 'gradient_penalty'], 1)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap

from .. import prng
from ..model.core import Model
from ..optim.base import GradientTransformation
from ..tree import Params
from .compile import with_compile_policy
from .projections import Projection
from .step import (
    TrainState,
    apply_step,
    init_train_state,
    step_key,
    value_and_grad,
    values_out,
)

__all__ = [
    "GANState",
    "gradient_penalty",
    "hinge_critic_loss",
    "hinge_generator_loss",
    "init_gan_state",
    "make_critic_step",
    "make_gan_step",
    "make_generator_step",
    "wasserstein_critic_loss",
    "wasserstein_generator_loss",
]

Metrics = dict[str, Tensor]


# --- losses --------------------------------------------------------------------------------


def wasserstein_critic_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """WGAN critic loss ``E[D(fake)] - E[D(real)]`` (minimised; its negative estimates W1).

    Example:
        >>> import torch
        >>> wasserstein_critic_loss(torch.tensor([2.0, 4.0]), torch.tensor([1.0])).item()
        -2.0
    """
    return fake_scores.mean() - real_scores.mean()


def wasserstein_generator_loss(fake_scores: Tensor) -> Tensor:
    """WGAN generator loss ``-E[D(G(z))]``.

    Example:
        >>> import torch
        >>> wasserstein_generator_loss(torch.tensor([1.0, 3.0])).item()
        -2.0
    """
    return -fake_scores.mean()


def hinge_critic_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """SN-GAN's hinge loss for the discriminator: ``E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]``.

    Example:
        >>> import torch
        >>> hinge_critic_loss(torch.tensor([0.5, 2.0]), torch.tensor([-2.0, 0.0])).item()
        0.75
    """
    return F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean()


def hinge_generator_loss(fake_scores: Tensor) -> Tensor:
    """SN-GAN's generator loss with the hinge discriminator: ``-E[D(G(z))]``.

    Example:
        >>> import torch
        >>> hinge_generator_loss(torch.tensor([1.0, 3.0])).item()
        -2.0
    """
    return -fake_scores.mean()


def gradient_penalty(
    critic: Callable[[Tensor], Tensor],
    real: Tensor,
    fake: Tensor,
    alpha: Tensor,
    target: float = 1.0,
) -> Tensor:
    """WGAN-GP's penalty ``E[(||grad_x D(x_hat)||_2 - target)^2]`` on ``x_hat = a x + (1 - a) x~``.

    The input gradient of each interpolate is taken on its own (``vmap`` of ``grad``):
    the per-sample gradient the penalty is defined with. The result is differentiable,
    so the critic's ``grad`` goes through it (double backward) with no
    ``create_graph=True`` and no graph kept between calls.

    Args:
        critic: ``critic(x) -> scores``, one score per image of a batch ``x``; it sees
            batches of one image, so it must not couple samples (no BatchNorm, as the
            WGAN-GP paper prescribes).
        real, fake: batches of the same shape ``(N, ...)``.
        alpha: interpolation weights, shape ``(N,)`` or broadcastable to ``real``.
        target: the gradient norm aimed at (1 for WGAN-GP).

    Returns:
        The penalty, a scalar (multiply by the weight, e.g. 10).

    Example:
        >>> import torch
        >>> w = torch.tensor([3.0, 4.0])
        >>> real, fake = torch.ones(5, 2), torch.zeros(5, 2)
        >>> gradient_penalty(lambda x: x @ w, real, fake, torch.rand(5)).item()
        16.0
    """
    alpha = alpha.reshape(-1, *([1] * (real.dim() - 1))) if alpha.dim() == 1 else alpha
    interpolates = alpha * real + (1 - alpha) * fake

    def score(x: Tensor) -> Tensor:
        return critic(x.unsqueeze(0)).sum()

    grads = vmap(grad(score))(interpolates)
    return ((grads.flatten(1).norm(2, dim=1) - target) ** 2).mean()


# --- state and steps -----------------------------------------------------------------------


class GANState(NamedTuple):
    """Both networks' :class:`~functorch_diary.TrainState` s; a pytree."""

    generator: TrainState
    critic: TrainState


def init_gan_state(
    generator: Model,
    critic: Model,
    generator_optimizer: GradientTransformation,
    critic_optimizer: GradientTransformation,
    seed: int = 0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    critic_projection: Projection | None = None,
) -> GANState:
    """Fresh ``GANState``: the generator from ``seed``, the critic from ``seed + 1``.

    Args:
        generator, critic: the two models.
        generator_optimizer, critic_optimizer: their optimisers.
        seed: the generator's seed (the critic's is ``seed + 1``).
        device, dtype: where and in which floating dtype the tensors live.
        critic_projection: applied to the critic's initial params, e.g. WGAN's clipping,
            so they start in the box (the original WGAN clips before each critic update).
    """
    g = init_train_state(generator, generator_optimizer, seed, device=device, dtype=dtype)
    d = init_train_state(critic, critic_optimizer, seed + 1, device=device, dtype=dtype)
    if critic_projection is not None:
        d = d._replace(params=critic_projection(d.params))
        d = d._replace(opt_state=critic_optimizer.init(d.params))
    return GANState(g, d)


def make_critic_step(
    generator: Model,
    critic: Model,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    optimizer: GradientTransformation,
    *,
    penalty_weight: float = 0.0,
    projection: Projection | None = None,
    compile: bool | None = None,
    compile_mode: str | None = None,
    compile_backend: str | Callable = "inductor",
) -> Callable[..., tuple[GANState, Metrics]]:
    """Build ``critic_step(gan_state, real, z, alpha=None) -> (gan_state, metrics)``.

    One critic (discriminator) update: ``fake = G(z)``; ``loss_fn(D(real), D(fake))``
    (+ ``penalty_weight * gradient_penalty`` on interpolates with weights ``alpha``);
    the optimiser's update; then ``projection`` of the critic's params (WGAN's clipping).
    The generator's params are untouched; its BatchNorm statistics move (it ran in
    training mode, as ``G(z).detach()`` does imperatively).

    Args:
        generator, critic: the models.
        loss_fn: ``loss_fn(real_scores, fake_scores) -> scalar``, e.g.
            :func:`wasserstein_critic_loss` or :func:`hinge_critic_loss`.
        optimizer: the critic's optimiser (RMSprop for WGAN, Adam for WGAN-GP/SN-GAN).
        penalty_weight: WGAN-GP's lambda (10 in the paper); 0 for no penalty.
        projection: applied to the critic's params after the update.
        compile, compile_mode, compile_backend: as for
            :func:`~functorch_diary.make_train_step`.

    Returns:
        The step; ``metrics`` holds ``"critic_loss"`` (the whole objective) and, with a
        penalty, ``"gradient_penalty"``.
    """

    def step(
        gs: GANState, real: Tensor, z: Tensor, alpha: Tensor | None = None
    ) -> tuple[GANState, Metrics]:
        if penalty_weight and alpha is None:
            raise ValueError("a gradient penalty needs alpha: critic_step(gs, real, z, alpha)")
        g, d = gs
        key = step_key(d)
        fake, g_state = generator.apply(g.params, g.state, z, train=True, rng=prng.fold_in(key, 0))

        def objective(params: Params):
            real_scores, state = critic.apply(
                params, d.state, real, train=True, rng=prng.fold_in(key, 1)
            )
            fake_scores, state = critic.apply(
                params, state, fake, train=True, rng=prng.fold_in(key, 2)
            )
            loss = loss_fn(real_scores, fake_scores)
            metrics: Metrics = {}
            if penalty_weight:
                # The interpolates pass sees the state after the fake pass; its own state
                # changes are per sample (vmap) and dropped.
                def scores(x: Tensor) -> Tensor:
                    return critic.apply(params, state, x, train=True, rng=prng.fold_in(key, 3))[0]

                penalty = gradient_penalty(scores, real, fake, alpha)
                loss = loss + penalty_weight * penalty
                metrics["gradient_penalty"] = penalty
            return loss, (state, metrics)

        grads, (loss, (d_state, metrics)) = value_and_grad(objective, d.params)
        d = apply_step(d, grads, d_state, optimizer)
        if projection is not None:
            d = d._replace(params=projection(d.params))
        return GANState(g._replace(state=g_state), d), values_out({"critic_loss": loss, **metrics})

    return with_compile_policy(step, compile, compile_mode, compile_backend)


def make_generator_step(
    generator: Model,
    critic: Model,
    loss_fn: Callable[[Tensor], Tensor],
    optimizer: GradientTransformation,
    *,
    compile: bool | None = None,
    compile_mode: str | None = None,
    compile_backend: str | Callable = "inductor",
) -> Callable[..., tuple[GANState, Metrics]]:
    """Build ``generator_step(gan_state, z) -> (gan_state, metrics)``.

    One generator update on ``loss_fn(D(G(z)))``; the gradient flows through the critic
    to the generator's params only (the critic's params are inputs, not variables), so
    nothing is kept for, or taken from, the critic's update.

    Args:
        generator, critic: the models.
        loss_fn: ``loss_fn(fake_scores) -> scalar``, e.g. :func:`wasserstein_generator_loss`.
        optimizer: the generator's optimiser.
        compile, compile_mode, compile_backend: as for
            :func:`~functorch_diary.make_train_step`.

    Returns:
        The step; ``metrics`` holds ``"generator_loss"``.
    """

    def step(gs: GANState, z: Tensor) -> tuple[GANState, Metrics]:
        g, d = gs
        key = step_key(g)

        def objective(params: Params):
            fake, g_state = generator.apply(
                params, g.state, z, train=True, rng=prng.fold_in(key, 0)
            )
            scores, d_state = critic.apply(
                d.params, d.state, fake, train=True, rng=prng.fold_in(key, 1)
            )
            return loss_fn(scores), (g_state, d_state)

        grads, (loss, (g_state, d_state)) = value_and_grad(objective, g.params)
        g = apply_step(g, grads, g_state, optimizer)
        return GANState(g, d._replace(state=d_state)), values_out({"generator_loss": loss})

    return with_compile_policy(step, compile, compile_mode, compile_backend)


def make_gan_step(
    critic_step: Callable[..., tuple[GANState, Metrics]],
    generator_step: Callable[..., tuple[GANState, Metrics]],
    n_critic: int = 1,
    *,
    compile: bool | None = None,
    compile_mode: str | None = None,
    compile_backend: str | Callable = "inductor",
) -> Callable[..., tuple[GANState, Metrics]]:
    """Build ``gan_step(gan_state, reals, zs, alphas=None)``: ``n_critic`` critic steps, then one
    generator step, as one pure function (and one graph when compiled).

    Args:
        critic_step, generator_step: from :func:`make_critic_step` /
            :func:`make_generator_step` (build those with ``compile=False`` and compile here).
        n_critic: critic updates per generator update (5 for WGAN and WGAN-GP).
        compile, compile_mode, compile_backend: as for
            :func:`~functorch_diary.make_train_step`.

    Returns:
        The step. ``reals``: ``(n_critic, N, ...)`` real batches; ``zs``:
        ``(n_critic + 1, N, latent)`` noise, the last for the generator; ``alphas``:
        ``(n_critic, N)`` interpolation weights when the critic has a penalty. ``metrics``:
        the last critic step's and the generator step's.
    """
    if n_critic < 1:
        raise ValueError(f"n_critic must be at least 1, got {n_critic}")
    critic_step = getattr(critic_step, "__wrapped__", critic_step)
    generator_step = getattr(generator_step, "__wrapped__", generator_step)

    def step(gs: GANState, reals: Tensor, zs: Tensor, alphas: Tensor | None = None):
        if reals.shape[0] != n_critic or zs.shape[0] != n_critic + 1:
            raise ValueError(
                f"expected {n_critic} real batches and {n_critic + 1} noise batches (n_critic="
                f"{n_critic}), got reals {tuple(reals.shape)} and zs {tuple(zs.shape)}"
            )
        metrics: Metrics = {}
        for i in range(n_critic):
            gs, metrics = critic_step(gs, reals[i], zs[i], None if alphas is None else alphas[i])
        gs, g_metrics = generator_step(gs, zs[n_critic])
        return gs, {**metrics, **g_metrics}

    return with_compile_policy(step, compile, compile_mode, compile_backend)
