"""``python -m functorch_diary gan {wgan,wgan-gp,sngan}``: train a GAN on the bundled digits.

Seed 000's Day 6 on real data that needs no download: scikit-learn's 8x8 digits,
upsampled to 28x28 (or 32x32) and scaled to [-1, 1] for the generator's tanh. Writes
to ``--out``: ``samples.png`` (an 8x8 grid of samples from fixed noise, through
torchvision's ``save_image``), ``losses.png`` (both losses per step) and ``losses.csv``.

============  ================  ==============  ========  ==============================
GAN           critic            optimiser       n_critic  critic constraint
============  ================  ==============  ========  ==============================
``wgan``      BatchNorm         RMSprop 5e-5    5         clip params to [-0.01, 0.01]
``wgan-gp``   no normalisation  Adam 1e-4       5         gradient penalty, lambda 10
                                (0.5, 0.9)
``sngan``     spectral norm     Adam 2e-4       1         spectral norm, hinge loss
                                (0.5, 0.999)
============  ================  ==============  ========  ==============================
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .. import optim
from ..data import load_digits
from ..model import reparam
from ..model.core import Model
from ..optim.base import GradientTransformation
from ..training import gan
from ..training.projections import Projection, clip_params
from ..zoo.models.dcgan import dcgan_discriminator, dcgan_generator


@dataclass(frozen=True)
class GANRecipe:
    """How one GAN variant is trained (the table in this module's docstring)."""

    name: str
    description: str
    critic_norm: str
    spectral_norm: bool
    lr: float
    n_critic: int
    penalty_weight: float
    clip: float | None
    hinge: bool

    def optimizer(self, lr: float) -> GradientTransformation:
        if self.name == "wgan":
            return optim.rmsprop(lr)
        betas = (0.5, 0.9) if self.name == "wgan-gp" else (0.5, 0.999)
        return optim.adam(lr, betas=betas)


RECIPES = {
    r.name: r
    for r in (
        GANRecipe("wgan", "weight clipping, RMSprop", "batch", False, 5e-5, 5, 0.0, 0.01, False),
        GANRecipe("wgan-gp", "gradient penalty, Adam", "none", False, 1e-4, 5, 10.0, None, False),
        GANRecipe("sngan", "spectral norm, hinge loss", "none", True, 2e-4, 1, 0.0, None, True),
    )
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``gan`` command."""
    parser = subparsers.add_parser(
        "gan",
        help="train WGAN, WGAN-GP or SN-GAN on the bundled digits",
        description="Train a GAN on scikit-learn's digits: "
        + "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values()),
    )
    parser.add_argument("variant", choices=sorted(RECIPES), help="which GAN")
    parser.add_argument("--steps", type=int, default=300, help="generator steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, choices=(28, 32), default=28)
    parser.add_argument("--latent-dim", type=int, default=64)
    parser.add_argument("--width", type=int, default=16, help="feature maps of the networks")
    parser.add_argument("--lr", type=float, default=None, help="default: the variant's")
    parser.add_argument("--n-critic", type=int, default=None, help="default: the variant's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the step (default: on for CUDA, off on CPU)",
    )
    parser.add_argument("--out", type=Path, default=Path("gan_out"), help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


def _models(recipe: GANRecipe, args: argparse.Namespace) -> tuple[Model, Model]:
    generator = dcgan_generator(args.latent_dim, 1, args.width, args.image_size)
    critic: Model = dcgan_discriminator(1, args.width, args.image_size, recipe.critic_norm)
    if recipe.spectral_norm:
        critic = reparam.spectral_norm(critic, critic.paths_of(nn.Conv2d))
    return generator, critic


def _save_plots(out: Path, history: list[tuple[int, float, float]], samples: Tensor, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import save_image

    save_image(samples, out / "samples.png", nrow=8, normalize=True, value_range=(-1.0, 1.0))
    steps, critic_losses, generator_losses = zip(*history, strict=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, critic_losses, label="critic")
    ax.plot(steps, generator_losses, label="generator")
    ax.set_xlabel("generator step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Train the chosen GAN and write samples and loss curves; returns the exit code."""
    recipe = RECIPES[args.variant]
    lr = args.lr if args.lr is not None else recipe.lr
    n_critic = args.n_critic if args.n_critic is not None else recipe.n_critic
    start = time.perf_counter()
    images = load_digits(size=args.image_size).x_train.to(args.device) * 2 - 1
    generator, critic = _models(recipe, args)
    projection: Projection | None = (
        clip_params(-recipe.clip, recipe.clip) if recipe.clip is not None else None
    )
    critic_loss = gan.hinge_critic_loss if recipe.hinge else gan.wasserstein_critic_loss
    generator_loss = gan.hinge_generator_loss if recipe.hinge else gan.wasserstein_generator_loss
    critic_opt, generator_opt = recipe.optimizer(lr), recipe.optimizer(lr)
    gs = gan.init_gan_state(
        generator,
        critic,
        generator_opt,
        critic_opt,
        args.seed,
        device=args.device,
        critic_projection=projection,
    )
    step = gan.make_gan_step(
        gan.make_critic_step(
            generator,
            critic,
            critic_loss,
            critic_opt,
            penalty_weight=recipe.penalty_weight,
            projection=projection,
            compile=False,
        ),
        gan.make_generator_step(generator, critic, generator_loss, generator_opt, compile=False),
        n_critic,
        compile=args.compile,
    )
    print(
        f"{recipe.name}: {len(images)} digits at {args.image_size}x{args.image_size}, "
        f"{args.steps} generator steps x {n_critic} critic steps, batch {args.batch_size}, "
        f"lr {lr}, on {args.device}"
    )
    # All randomness from one generator on the CPU: the run is reproducible from --seed.
    rand = torch.Generator().manual_seed(args.seed)
    b = args.batch_size
    history: list[tuple[int, float, float]] = []
    bar = tqdm(range(args.steps), disable=args.no_progress, desc=recipe.name, unit="step")
    for t in bar:
        index = torch.randint(len(images), (n_critic, b), generator=rand)
        zs = torch.randn(n_critic + 1, b, args.latent_dim, generator=rand)
        alphas = torch.rand(n_critic, b, generator=rand)
        gs, metrics = step(
            gs, images[index.to(args.device)], zs.to(args.device), alphas.to(args.device)
        )
        d_loss, g_loss = metrics["critic_loss"].item(), metrics["generator_loss"].item()
        if not (math.isfinite(d_loss) and math.isfinite(g_loss)):
            print(f"error: the losses diverged at step {t} (critic {d_loss}, generator {g_loss})")
            return 1
        history.append((t, d_loss, g_loss))
        bar.set_postfix(critic=f"{d_loss:.3f}", generator=f"{g_loss:.3f}")
    fixed_z = torch.randn(64, args.latent_dim, generator=torch.Generator().manual_seed(0))
    samples, _ = generator.apply(
        gs.generator.params, gs.generator.state, fixed_z.to(args.device), train=False
    )
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "losses.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "critic_loss", "generator_loss"])
        writer.writerows(history)
    _save_plots(args.out, history, samples.detach().cpu(), f"{recipe.name} on the digits")
    print(
        f"final critic loss {history[-1][1]:.4f}, generator loss {history[-1][2]:.4f}; "
        f"wrote {args.out / 'samples.png'}, {args.out / 'losses.png'}, "
        f"{args.out / 'losses.csv'} in {time.perf_counter() - start:.1f} s"
    )
    return 0
