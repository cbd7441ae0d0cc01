"""GAN losses, the gradient penalty and GAN steps against the imperative nn.Module versions."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad
from torch.nn.utils import parametrizations

from functorch_diary import extract, optim
from functorch_diary.model import reparam
from functorch_diary.testing import assert_trees_close
from functorch_diary.training import gan
from functorch_diary.training.projections import clip_params
from functorch_diary.tree import tree_clone
from functorch_diary.zoo.models.dcgan import (
    DCGANDiscriminator,
    DCGANGenerator,
    dcgan_discriminator,
    dcgan_generator,
)

LATENT, WIDTH, SIZE, BATCH = 4, 3, 8, 4


def _reference_penalty(critic: nn.Module, real, fake, alpha):
    """The usual imperative WGAN-GP penalty, with autograd.grad(create_graph=True)."""
    a = alpha.view(-1, 1, 1, 1)
    interpolates = (a * real + (1 - a) * fake).requires_grad_(True)
    scores = critic(interpolates)
    (grads,) = torch.autograd.grad(scores, interpolates, torch.ones_like(scores), create_graph=True)
    return ((grads.view(grads.size(0), -1).norm(2, dim=1) - 1) ** 2).mean()


def test_losses_are_the_textbook_formulas():
    real, fake = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([-3.0, 0.5])
    assert gan.wasserstein_critic_loss(real, fake).item() == pytest.approx(-1.25 - 0.5)
    assert gan.wasserstein_generator_loss(fake).item() == pytest.approx(1.25)
    # relu(1 - real) = [0.5, 0, 2] -> 2.5 / 3; relu(1 + fake) = [0, 1.5] -> 0.75
    assert gan.hinge_critic_loss(real, fake).item() == pytest.approx(2.5 / 3 + 0.75)
    assert gan.hinge_generator_loss(fake).item() == pytest.approx(1.25)


def test_gradient_penalty_matches_autograd_create_graph_in_value_and_critic_gradient():
    torch.manual_seed(0)
    critic_module = DCGANDiscriminator(width=WIDTH, image_size=SIZE, norm="none").double()
    model = dcgan_discriminator(width=WIDTH, image_size=SIZE, norm="none")
    params, state = extract(critic_module)
    gen = torch.Generator().manual_seed(1)
    real = torch.rand(5, 1, SIZE, SIZE, dtype=torch.float64, generator=gen)
    fake = torch.rand(5, 1, SIZE, SIZE, dtype=torch.float64, generator=gen)
    alpha = torch.rand(5, dtype=torch.float64, generator=gen)

    expected = _reference_penalty(critic_module, real, fake, alpha)
    named = dict(critic_module.named_parameters())
    grads = torch.autograd.grad(expected, list(named.values()), allow_unused=True)
    # The last bias shifts every score equally: the penalty does not depend on it.
    expected_grads = {
        name: torch.zeros_like(p) if g is None else g
        for (name, p), g in zip(named.items(), grads, strict=True)
    }

    def penalty(params):
        return gan.gradient_penalty(
            lambda x: model.apply(params, state, x, train=True)[0], real, fake, alpha
        )

    assert_trees_close(penalty(params), expected.detach(), rtol=1e-6, atol=1e-12)
    assert_trees_close(grad(penalty)(params), expected_grads, rtol=1e-6, atol=1e-12)


def _twins(seed: int, critic_norm: str, spectral: bool):
    """Functional models and their nn.Module twins, same seeds (G: seed, D: seed + 1)."""
    g_model = dcgan_generator(LATENT, 1, WIDTH, SIZE)
    d_model = dcgan_discriminator(1, WIDTH, SIZE, critic_norm)
    torch.manual_seed(seed)
    g_net = DCGANGenerator(LATENT, 1, WIDTH, SIZE)
    torch.manual_seed(seed + 1)
    d_net = DCGANDiscriminator(1, WIDTH, SIZE, critic_norm)
    if spectral:
        paths = d_model.paths_of(nn.Conv2d)
        d_model = reparam.spectral_norm(d_model, paths)
        for path in paths:
            parametrizations.spectral_norm(d_net.get_submodule(path.rpartition(".")[0]))
    return g_model, d_model, g_net.double(), d_net.double()


def _inputs(steps: int, n_critic: int):
    gen = torch.Generator().manual_seed(123)
    f64 = torch.float64
    reals = 2 * torch.rand(steps, n_critic, BATCH, 1, SIZE, SIZE, dtype=f64, generator=gen) - 1
    zs = torch.randn(steps, n_critic + 1, BATCH, LATENT, dtype=f64, generator=gen)
    alphas = torch.rand(steps, n_critic, BATCH, dtype=f64, generator=gen)
    return reals, zs, alphas


def _imperative_gan(
    g_net,
    d_net,
    g_opt,
    d_opt,
    d_loss_fn,
    g_loss_fn,
    reals,
    zs,
    alphas,
    penalty_weight=0.0,
    clip=None,
):
    """The diaries' loop: zero_grad / backward / step, D then G, ``p.data.clamp_``."""
    for t in range(reals.shape[0]):
        n_critic = reals.shape[1]
        for i in range(n_critic):
            fake = g_net(zs[t, i]).detach()
            d_opt.zero_grad()
            loss = d_loss_fn(d_net(reals[t, i]), d_net(fake))
            if penalty_weight:
                loss = loss + penalty_weight * _reference_penalty(
                    d_net, reals[t, i], fake, alphas[t, i]
                )
            loss.backward()
            d_opt.step()
            if clip is not None:
                for p in d_net.parameters():
                    p.data.clamp_(-clip, clip)
        g_opt.zero_grad()
        g_loss_fn(d_net(g_net(zs[t, n_critic]))).backward()
        g_opt.step()


def _run_functional(
    g_model,
    d_model,
    g_opt,
    d_opt,
    critic_step,
    generator_step,
    n_critic,
    reals,
    zs,
    alphas,
    projection=None,
):
    gs = gan.init_gan_state(
        g_model, d_model, g_opt, d_opt, seed=0, dtype=torch.float64, critic_projection=projection
    )
    step = gan.make_gan_step(critic_step, generator_step, n_critic, compile=False)
    for t in range(reals.shape[0]):
        gs, metrics = step(gs, reals[t], zs[t], alphas[t])
        assert all(bool(torch.isfinite(v)) for v in metrics.values())
    return gs


def _assert_same(gs, g_net, d_net):
    # float64; Adam's division by sqrt(v) grows last-bit differences over the steps.
    tol = {"rtol": 1e-7, "atol": 1e-9}
    assert_trees_close((gs.generator.params, gs.generator.state), extract(g_net), **tol)
    assert_trees_close((gs.critic.params, gs.critic.state), extract(d_net), **tol)


def test_wgan_gp_ten_steps_match_the_imperative_loop():
    n_critic, steps = 1, 10
    g_model, d_model, g_net, d_net = _twins(0, "none", spectral=False)
    reals, zs, alphas = _inputs(steps, n_critic)
    opt = optim.adam(1e-3, betas=(0.5, 0.9))
    critic_step = gan.make_critic_step(
        g_model, d_model, gan.wasserstein_critic_loss, opt, penalty_weight=10.0, compile=False
    )
    generator_step = gan.make_generator_step(
        g_model, d_model, gan.wasserstein_generator_loss, opt, compile=False
    )
    gs = _run_functional(
        g_model, d_model, opt, opt, critic_step, generator_step, n_critic, reals, zs, alphas
    )
    _imperative_gan(
        g_net,
        d_net,
        torch.optim.Adam(g_net.parameters(), 1e-3, betas=(0.5, 0.9)),
        torch.optim.Adam(d_net.parameters(), 1e-3, betas=(0.5, 0.9)),
        gan.wasserstein_critic_loss,
        gan.wasserstein_generator_loss,
        reals,
        zs,
        alphas,
        penalty_weight=10.0,
    )
    _assert_same(gs, g_net, d_net)


def test_sngan_ten_steps_match_the_imperative_loop():
    # Spectral norm and BatchNorm in the critic: u, v and running statistics are threaded
    # through D(real), D(fake) and the generator step's D(G(z)), as torch updates them.
    n_critic, steps = 1, 10
    g_model, d_model, g_net, d_net = _twins(0, "batch", spectral=True)
    reals, zs, alphas = _inputs(steps, n_critic)
    opt = optim.adam(2e-3, betas=(0.5, 0.999))
    critic_step = gan.make_critic_step(g_model, d_model, gan.hinge_critic_loss, opt, compile=False)
    generator_step = gan.make_generator_step(
        g_model, d_model, gan.hinge_generator_loss, opt, compile=False
    )
    gs = _run_functional(
        g_model, d_model, opt, opt, critic_step, generator_step, n_critic, reals, zs, alphas
    )
    _imperative_gan(
        g_net,
        d_net,
        torch.optim.Adam(g_net.parameters(), 2e-3, betas=(0.5, 0.999)),
        torch.optim.Adam(d_net.parameters(), 2e-3, betas=(0.5, 0.999)),
        gan.hinge_critic_loss,
        gan.hinge_generator_loss,
        reals,
        zs,
        alphas,
    )
    _assert_same(gs, g_net, d_net)


def test_wgan_with_rmsprop_and_clipping_matches_the_imperative_loop():
    n_critic, steps, c = 3, 5, 0.05
    g_model, d_model, g_net, d_net = _twins(0, "batch", spectral=False)
    reals, zs, alphas = _inputs(steps, n_critic)
    opt = optim.rmsprop(5e-3)
    clip = clip_params(-c, c)
    critic_step = gan.make_critic_step(
        g_model, d_model, gan.wasserstein_critic_loss, opt, projection=clip, compile=False
    )
    generator_step = gan.make_generator_step(
        g_model, d_model, gan.wasserstein_generator_loss, opt, compile=False
    )
    gs = _run_functional(
        g_model,
        d_model,
        opt,
        opt,
        critic_step,
        generator_step,
        n_critic,
        reals,
        zs,
        alphas,
        projection=clip,
    )
    for p in d_net.parameters():  # the original WGAN clips before the first critic update
        p.data.clamp_(-c, c)
    _imperative_gan(
        g_net,
        d_net,
        torch.optim.RMSprop(g_net.parameters(), 5e-3),
        torch.optim.RMSprop(d_net.parameters(), 5e-3),
        gan.wasserstein_critic_loss,
        gan.wasserstein_generator_loss,
        reals,
        zs,
        alphas,
        clip=c,
    )
    _assert_same(gs, g_net, d_net)
    assert all(bool(p.abs().max() <= c) for p in gs.critic.params.values())


def test_steps_are_pure():
    g_model, d_model, _, _ = _twins(0, "batch", spectral=True)
    opt = optim.adam(1e-3)
    gs = gan.init_gan_state(g_model, d_model, opt, opt)
    before = tree_clone(gs)
    critic_step = gan.make_critic_step(g_model, d_model, gan.hinge_critic_loss, opt, compile=False)
    generator_step = gan.make_generator_step(
        g_model, d_model, gan.hinge_generator_loss, opt, compile=False
    )
    new, _ = critic_step(gs, torch.rand(2, 1, SIZE, SIZE), torch.randn(2, LATENT))
    new, _ = generator_step(new, torch.randn(2, LATENT))
    assert_trees_close(gs, before)
    assert int(new.critic.step) == 1 and int(new.generator.step) == 1


def test_bad_calls_say_what_is_wrong():
    g_model, d_model, _, _ = _twins(0, "none", spectral=False)
    opt = optim.adam(1e-3)
    gs = gan.init_gan_state(g_model, d_model, opt, opt)
    critic_step = gan.make_critic_step(
        g_model, d_model, gan.wasserstein_critic_loss, opt, penalty_weight=10.0, compile=False
    )
    with pytest.raises(ValueError, match="needs alpha"):
        critic_step(gs, torch.rand(2, 1, SIZE, SIZE), torch.randn(2, LATENT))
    step = gan.make_gan_step(
        critic_step,
        gan.make_generator_step(g_model, d_model, gan.wasserstein_generator_loss, opt),
        n_critic=2,
    )
    with pytest.raises(ValueError, match="2 real batches and 3 noise batches"):
        step(gs, torch.rand(1, 2, 1, SIZE, SIZE), torch.randn(3, 2, LATENT), torch.rand(1, 2))
    with pytest.raises(ValueError, match="n_critic"):
        gan.make_gan_step(critic_step, critic_step, n_critic=0)
