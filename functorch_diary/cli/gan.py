"""``python -m functorch_diary gan {wgan,wgan-gp,sngan}``: train a GAN on the bundled digits.

Three ways to keep a GAN's critic (discriminator) 1-Lipschitz, on real data that needs
no download: scikit-learn's 8x8 digits, upsampled to 28x28 (or 32x32) and scaled to
[-1, 1] for the generator's tanh.

- **WGAN** (Arjovsky et al., 2017): the critic estimates the Wasserstein-1 distance and
  its weights are clipped to a small box after every update.
- **WGAN-GP** (Gulrajani et al., 2017): no clipping; a gradient penalty pushes the
  critic's input-gradient norm towards 1 on points between real and fake images.
- **SN-GAN** (Miyato et al., 2018): every convolution of the critic is divided by its
  largest singular value (spectral normalisation); hinge loss.

Writes to ``--out``: ``samples.png`` (an 8x8 grid of samples from fixed noise, upscaled
so the digits are visible), ``metrics.csv`` (every metric, every step, streamed),
``metrics.png`` (the losses and, for WGAN-GP, the gradient penalty), TensorBoard event
files (``tensorboard/``, scalars ``step/<metric>``) and checkpoints of
both networks and the loop (``checkpoints/step_*.ckpt``, the project's safe format);
``--resume DIR`` continues a run from its latest checkpoint, bit for bit.

The defaults (``--help`` lists them) are the papers' recipes made fast enough to give
recognisable digits in about two minutes on two CPU cores (``benchmarks/gan_quality.py``
scores them with a digit classifier; ``docs/gans.md`` has the numbers): the papers train
for 10^5 generator steps, these for 10^3. WGAN uses RMSprop at 5e-4, ten times the
paper's 5e-5 (300 steps at 5e-5 gave grey noise); WGAN-GP uses the paper's
Adam betas (0, 0.9) at 5e-4 instead of 1e-4; SN-GAN keeps its Adam 2e-4 (0.5, 0.999),
one critic step per generator step, for 3000 steps.

Example (a tiny run; then the trained generator from its last checkpoint):
    >>> import tempfile
    >>> from pathlib import Path
    >>> from functorch_diary.cli import gan, main
    >>> out = Path(tempfile.mkdtemp())
    >>> main(["gan", "sngan", "--steps", "2", "--width", "2", "--batch-size", "4",
    ...       "--out", str(out), "--no-progress"])
    sngan: 1438 digits at 28x28, steps 1-2 of 1 critic + 1 generator update, ...
    step 2: critic loss ..., generator loss ...; wrote samples.png, ...
    0
    >>> gs, settings, generator = gan.load_run(gan.checkpoints(out)[-1])
    >>> images = gan.sample(generator, gs, 3, settings["latent_dim"])
    >>> int(gs.generator.step), settings["width"], tuple(images.shape)
    (2, 2, (3, 1, 28, 28))
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .. import checkpoint, optim
from ..data import load_digits
from ..model import reparam
from ..model.core import Model
from ..optim.base import GradientTransformation
from ..training import gan
from ..training.loggers import TensorBoard
from ..training.projections import Projection, clip_params
from ..zoo.models.dcgan import dcgan_discriminator, dcgan_generator
from .args import (
    device,
    non_negative_float,
    non_negative_int,
    output_dir,
    positive_int,
    unit_interval,
)
from .errors import CliError, failure


@dataclass(frozen=True)
class GANRecipe:
    """How one GAN variant is trained by default (the ``--help`` epilog lists them)."""

    name: str
    description: str
    critic_norm: str
    spectral_norm: bool
    optimizer_name: str
    lr: float
    betas: tuple[float, float]
    n_critic: int
    penalty_weight: float
    clip: float | None
    hinge: bool
    steps: int
    batch_size: int
    width: int

    def optimizer(self, lr: float) -> GradientTransformation:
        if self.optimizer_name == "rmsprop":
            return optim.rmsprop(lr)
        return optim.adam(lr, betas=self.betas)

    def summary(self) -> str:
        opt = "RMSprop" if self.optimizer_name == "rmsprop" else f"Adam betas={self.betas}"
        return (
            f"{self.name}: {self.description}; {opt} lr {self.lr:g}, n_critic {self.n_critic}, "
            f"{self.steps} steps of batch {self.batch_size}, width {self.width}"
        )


RECIPES = {
    r.name: r
    for r in (
        GANRecipe(
            name="wgan",
            description="Wasserstein critic with BatchNorm, weights clipped to [-0.01, 0.01]",
            critic_norm="batch",
            spectral_norm=False,
            optimizer_name="rmsprop",
            lr=5e-4,
            betas=(0.0, 0.0),
            n_critic=5,
            penalty_weight=0.0,
            clip=0.01,
            hinge=False,
            steps=1000,
            batch_size=32,
            width=16,
        ),
        GANRecipe(
            name="wgan-gp",
            description="Wasserstein critic without normalisation, gradient penalty 10",
            critic_norm="none",
            spectral_norm=False,
            optimizer_name="adam",
            lr=5e-4,
            betas=(0.0, 0.9),
            n_critic=5,
            penalty_weight=10.0,
            clip=None,
            hinge=False,
            steps=1000,
            batch_size=32,
            width=16,
        ),
        GANRecipe(
            name="sngan",
            description="spectrally normalised critic, hinge loss",
            critic_norm="none",
            spectral_norm=True,
            optimizer_name="adam",
            lr=2e-4,
            betas=(0.5, 0.999),
            n_critic=1,
            penalty_weight=0.0,
            clip=None,
            hinge=True,
            steps=3000,
            batch_size=32,
            width=16,
        ),
    )
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``gan`` command."""
    parser = subparsers.add_parser(
        "gan",
        help="train a WGAN, WGAN-GP or SN-GAN on the bundled digits",
        description="Train a GAN on scikit-learn's handwritten digits and write samples, "
        "metrics and checkpoints. Each variant keeps the critic 1-Lipschitz differently.",
        epilog="defaults per variant:\n  " + "\n  ".join(r.summary() for r in RECIPES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("variant", choices=sorted(RECIPES), help="which GAN")
    parser.add_argument("--steps", type=positive_int, help="generator steps in all")
    parser.add_argument("--batch-size", type=positive_int)
    parser.add_argument("--image-size", type=int, choices=(28, 32), help="default 28")
    parser.add_argument("--latent-dim", type=positive_int, help="default 64")
    parser.add_argument("--width", type=positive_int, help="feature maps of the networks")
    parser.add_argument("--lr", type=non_negative_float, help="both networks' learning rate")
    parser.add_argument("--n-critic", type=positive_int, help="critic steps per generator step")
    parser.add_argument(
        "--ema",
        type=unit_interval,
        metavar="DECAY",
        help="also keep an exponential moving average of the generator (torch's "
        "AveragedModel with get_ema_multi_avg_fn(DECAY), buffers included) and sample from it "
        "into samples_ema.png",
    )
    parser.add_argument("--seed", type=non_negative_int, help="default 0")
    parser.add_argument(
        "--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the step (default: on for CUDA, off on CPU)",
    )
    parser.add_argument("--out", type=output_dir, default=Path("gan_out"), help="output folder")
    parser.add_argument(
        "--checkpoint-every", type=positive_int, default=100, help="steps between checkpoints"
    )
    parser.add_argument("--keep", type=positive_int, default=2, help="checkpoints kept")
    parser.add_argument(
        "--resume", type=Path, metavar="DIR", help="continue the run in DIR (its --out)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


#: Settings a run is defined by; a resumed run takes them from its checkpoint.
_SETTINGS = ("batch_size", "image_size", "latent_dim", "width", "lr", "n_critic", "seed", "ema")
_FIXED = {"image_size": 28, "latent_dim": 64, "seed": 0, "ema": None}


def _settings(recipe: GANRecipe, args: argparse.Namespace, saved: dict | None) -> dict:
    """The run's settings: the checkpoint's when resuming, else the options or defaults."""
    given = {k: getattr(args, k) for k in ("steps", *_SETTINGS) if getattr(args, k) is not None}
    saved = saved if saved is None else {"ema": None, **saved}
    if saved is not None:
        for key, value in given.items():
            if key != "steps" and value != saved[key]:
                raise CliError(
                    f"--{key.replace('_', '-')} {value} differs from the resumed run's "
                    f"{saved[key]}; leave it out to continue that run"
                )
        return {**saved, "steps": given.get("steps", saved["steps"])}
    defaults = {
        "steps": recipe.steps,
        "batch_size": recipe.batch_size,
        "width": recipe.width,
        "lr": recipe.lr,
        "n_critic": recipe.n_critic,
        **_FIXED,
    }
    return {"variant": recipe.name, **defaults, **given}


def _models(recipe: GANRecipe, cfg: dict) -> tuple[Model, Model]:
    generator = dcgan_generator(cfg["latent_dim"], 1, cfg["width"], cfg["image_size"])
    critic: Model = dcgan_discriminator(1, cfg["width"], cfg["image_size"], recipe.critic_norm)
    if recipe.spectral_norm:
        critic = reparam.spectral_norm(critic, critic.paths_of(nn.Conv2d))
    return generator, critic


def build(
    recipe: GANRecipe, cfg: dict, device: str, compile: bool | None = None
) -> tuple[Model, gan.GANState, Callable[..., tuple[gan.GANState, dict[str, Tensor]]]]:
    """The generator, the fresh ``GANState`` and the pure GAN step of a run's settings.

    Returns ``(generator, gan_state, step)``; ``step(gan_state, reals, zs, alphas)`` as
    from :func:`functorch_diary.training.gan.make_gan_step`.
    """
    generator, critic = _models(recipe, cfg)
    projection: Projection | None = (
        clip_params(-recipe.clip, recipe.clip) if recipe.clip is not None else None
    )
    critic_loss = gan.hinge_critic_loss if recipe.hinge else gan.wasserstein_critic_loss
    generator_loss = gan.hinge_generator_loss if recipe.hinge else gan.wasserstein_generator_loss
    critic_opt, generator_opt = recipe.optimizer(cfg["lr"]), recipe.optimizer(cfg["lr"])
    gs = gan.init_gan_state(
        generator,
        critic,
        generator_opt,
        critic_opt,
        cfg["seed"],
        device=device,
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
        cfg["n_critic"],
        compile=compile,
    )
    return generator, gs, step


def sample(generator: Model, gs: gan.GANState, n: int, latent_dim: int, seed: int = 0) -> Tensor:
    """``n`` images from the generator in eval mode, from noise seeded by ``seed``; (-1, 1)."""
    return sample_from(generator, gs.generator.params, gs.generator.state, n, latent_dim, seed)


def sample_from(
    generator: Model, params: dict, state: dict, n: int, latent_dim: int, seed: int = 0
) -> Tensor:
    """``n`` images from ``generator`` with these params and state (the trained ones, or
    their moving average), in eval mode, from noise seeded by ``seed``; (-1, 1)."""
    device = next(iter(params.values())).device
    z = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))
    images, _ = generator.apply(params, state, z.to(device), train=False)
    return images.detach().cpu()


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoints a run wrote in ``folder``, oldest first."""
    return sorted((folder / "checkpoints").glob("step_*.ckpt"))


def _ema(cfg: dict, gs: gan.GANState) -> tuple[optim.Averager | None, Any]:
    """The ``--ema`` averager and its starting average (both ``None`` without ``--ema``)."""
    if cfg.get("ema") is None:
        return None, None
    averager = optim.averaged_model(
        multi_avg_fn=optim.ema_multi_avg_fn(cfg["ema"]), use_buffers=True
    )
    return averager, averager.init(gs.generator.params, gs.generator.state)


def load_run(path: Path) -> tuple[gan.GANState, dict, Model]:
    """``(gan_state, settings, generator)`` from a checkpoint written by this command."""
    return load_run_with_average(path)[:3]


def load_run_with_average(path: Path) -> tuple[gan.GANState, dict, Model, Any]:
    """:func:`load_run` plus the ``--ema`` average of the generator (``None`` without)."""
    cfg = {"ema": None, **checkpoint.read_metadata(path)["config"]}
    recipe = RECIPES[cfg["variant"]]
    generator, gs, _ = build(recipe, cfg, "cpu")
    like = {"gan_state": gs, "data_rng": torch.Generator().get_state(), "ema": _ema(cfg, gs)[1]}
    tree = checkpoint.load(path, like=like)
    return tree["gan_state"], cfg, generator, tree["ema"]


def _save_grid(samples: Tensor, path: Path, scale: int) -> None:
    from torchvision.utils import make_grid, save_image

    grid = make_grid(samples, nrow=8, normalize=True, value_range=(-1.0, 1.0), pad_value=1.0)
    # Nearest-neighbour upscaling: each pixel becomes a scale x scale block, nothing blurred.
    save_image(grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2), path)


def _save_plot(path: Path, names: list[str], history: list[list[float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(zip(*history, strict=True))
    losses = [n for n in names if n.endswith("_loss")]
    others = [n for n in names if not n.endswith("_loss")]
    fig, axes = plt.subplots(1, 1 + bool(others), figsize=(6 + 4 * bool(others), 3.5))
    axes = list(axes) if others else [axes]
    for ax, group in zip(axes, (losses, others), strict=False):
        for name in group:
            ax.plot(columns[0], columns[1 + names.index(name)], label=name.replace("_", " "))
        ax.set_xlabel("generator step")
        ax.legend()
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Train the chosen GAN and write samples, metrics and checkpoints; returns the exit code."""
    start = time.perf_counter()
    recipe = RECIPES[args.variant]
    out = args.resume if args.resume is not None else args.out
    saved, history = None, []
    if args.resume is not None:
        found = checkpoints(args.resume)
        if not found:
            raise CliError(f"--resume {args.resume}: no checkpoints/step_*.ckpt in it")
        with failure(f"reading {found[-1]}", "resume a folder the gan command wrote"):
            meta = checkpoint.read_metadata(found[-1])
            saved, history = meta["config"], meta["history"]
            variant = saved["variant"]
        if variant != recipe.name:
            raise CliError(f"--resume {args.resume} holds a {variant} run, not {recipe.name}")
    cfg = _settings(recipe, args, saved)
    images = load_digits(size=cfg["image_size"]).x_train.to(args.device) * 2 - 1
    generator, gs, step = build(recipe, cfg, args.device, args.compile)
    # All the loop's randomness from one generator on the CPU: the run is reproducible
    # from --seed, and its state is checkpointed so a resumed run draws what it would have.
    rand = torch.Generator().manual_seed(cfg["seed"])
    averager, ema = _ema(cfg, gs)
    if saved is not None:
        like = {"gan_state": gs, "data_rng": rand.get_state(), "ema": ema}
        tree = checkpoint.load(found[-1], like=like)
        gs, ema = tree["gan_state"], tree["ema"]
        rand.set_state(tree["data_rng"])
    first = len(history)
    n_critic, b, latent_dim = cfg["n_critic"], cfg["batch_size"], cfg["latent_dim"]
    names = ["critic_loss", "generator_loss"] + (["gradient_penalty"] * bool(recipe.penalty_weight))
    print(
        f"{recipe.name}: {len(images)} digits at {cfg['image_size']}x{cfg['image_size']}, "
        f"steps {first + 1}-{cfg['steps']} of {n_critic} critic + 1 generator update, "
        f"batch {b}, lr {cfg['lr']:g}, width {cfg['width']}, on {args.device}"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)

    def save_checkpoint() -> None:
        t = len(history)
        path = out / "checkpoints" / f"step_{t:08d}.ckpt"
        tree = {"gan_state": gs, "data_rng": rand.get_state(), "ema": ema}
        meta = {"config": cfg, "step": t, "metrics": names, "history": history}
        checkpoint.save(path, tree, metadata=meta)
        for old in checkpoints(out)[: -args.keep]:
            old.unlink()

    # TensorBoard drops the events past the resumed step, so no step shows twice.
    board = TensorBoard(out / "tensorboard", purge_step=first if first else None)
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", *names])
        writer.writerows(history)
        bar = tqdm(
            range(first, cfg["steps"]), disable=args.no_progress, desc=recipe.name, unit="step"
        )
        for t in bar:
            index = torch.randint(len(images), (n_critic, b), generator=rand)
            zs = torch.randn(n_critic + 1, b, latent_dim, generator=rand)
            alphas = torch.rand(n_critic, b, generator=rand)
            gs, metrics = step(
                gs, images[index.to(args.device)], zs.to(args.device), alphas.to(args.device)
            )
            if ema is not None:
                ema = averager.update(ema, gs.generator.params, gs.generator.state)
            row = [t, *(metrics[n].item() for n in names)]
            if not all(math.isfinite(v) for v in row):
                values = dict(zip(names, row[1:], strict=True))
                print(f"error: the metrics diverged at step {t}: {values}", file=sys.stderr)
                return 1
            history.append(row)
            writer.writerow(row)
            handle.flush()
            board.on_step(None, dict(zip(["step", *names], row, strict=True)))
            bar.set_postfix(
                {n.split("_")[0]: f"{v:.3f}" for n, v in zip(names, row[1:], strict=True)}
            )
            if (t + 1) % args.checkpoint_every == 0:
                save_checkpoint()
    board.on_end(None, [])
    if not checkpoints(out) or checkpoints(out)[-1].name != f"step_{len(history):08d}.ckpt":
        save_checkpoint()
    _save_grid(sample(generator, gs, 64, latent_dim), out / "samples.png", scale=3)
    if ema is not None:
        averaged = sample_from(generator, ema.params, ema.state, 64, latent_dim)
        _save_grid(averaged, out / "samples_ema.png", scale=3)
    if history:
        _save_plot(out / "metrics.png", names, history, f"{recipe.name} on the digits")
    last = ", ".join(
        f"{n.replace('_', ' ')} {v:.4f}" for n, v in zip(names, history[-1][1:], strict=True)
    )
    print(
        f"step {len(history)}: {last}; wrote samples.png, metrics.png, metrics.csv, "
        f"tensorboard/ and checkpoints/ to {out} in {time.perf_counter() - start:.1f} s"
    )
    return 0
