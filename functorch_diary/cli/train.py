"""``functorch-diary train NAME``: train a recipe, validate each epoch, report test accuracy.

With ``--out DIR`` the run streams ``metrics.csv`` (one row per epoch; ``steps.csv``
too with ``--log-every``), TensorBoard event files in ``tensorboard/`` and saves
``checkpoints/epoch-NNNNNN.ckpt`` every ``--checkpoint-every`` epochs and at the end,
keeping the last ``--keep`` and the best by validation metric; ``metrics.png`` plots the
losses and the validation accuracy at the end, and a segmentation or detection recipe
draws its final state's predictions on the first test images in ``predictions.png``.
``--resume DIR`` continues from the latest checkpoint with the run's own settings, bit
for bit as if never interrupted.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from ..training.callbacks import Checkpoint, EarlyStopping
from ..training.fit import fit
from ..training.loggers import CsvLogger, TensorBoard, plot_history
from .args import device, non_negative_float, non_negative_int, output_dir, positive_int
from .errors import CliError, failure
from .recipes import RECIPES, Recipe
from .runs import SETTINGS, checkpoint_folder, find_checkpoint, restore, write_predictions


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a classifier (LeNet, MLP, logistic regression, ResNet-18, VGG16, DenseNet)",
        description="Train a recipe: "
        + "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values()),
    )
    parser.add_argument(
        "recipe", nargs="?", choices=sorted(RECIPES), help="what to train (optional with --resume)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="read the dataset's standard files from here: MNIST IDX for the digit recipes "
        "(default: scikit-learn's bundled digits), CIFAR-10 python batches (required) for "
        "resnet, vgg and densenet",
    )
    parser.add_argument("--epochs", type=positive_int, default=None, help="default: the recipe's")
    parser.add_argument(
        "--batch-size", type=positive_int, default=None, help="default: the recipe's"
    )
    parser.add_argument(
        "--lr", type=non_negative_float, default=None, help="default: the recipe's (0 allowed)"
    )
    parser.add_argument("--seed", type=non_negative_int, default=None, help="default: 0")
    parser.add_argument(
        "--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the step (default: on for CUDA, off on CPU)",
    )
    parser.add_argument(
        "--out",
        type=output_dir,
        default=None,
        help="write metrics, TensorBoard events, checkpoints and a plot here "
        "(default with --resume: the resumed folder)",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="DIR",
        help="continue the run in DIR (a --out folder, or one checkpoint file) from its "
        "latest checkpoint, with its settings",
    )
    parser.add_argument(
        "--checkpoint-every", type=positive_int, default=1, metavar="N", help="default: 1"
    )
    parser.add_argument(
        "--keep",
        type=non_negative_int,
        default=3,
        metavar="K",
        help="keep the last K checkpoints and the best (0: keep all; default 3)",
    )
    parser.add_argument(
        "--patience",
        type=non_negative_int,
        default=0,
        help="stop when the validation metric has not improved for this many epochs (0: off)",
    )
    parser.add_argument(
        "--log-every",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="also log the training loss every N steps (0: per epoch only)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


def _load(recipe: Recipe, data_dir: Path | None):
    where = "the bundled data" if data_dir is None else f"--data-dir {data_dir}"
    with failure(
        f"reading {where}",
        "the file is damaged or not in the dataset's format: copy or unpack it again",
    ):
        return recipe.load_data(data_dir)


def _settings(args: argparse.Namespace, recipe: Recipe) -> dict[str, Any]:
    # 0 is a value: only an option that was not given at all takes the recipe's default.
    given = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
             "seed": args.seed}  # fmt: skip
    defaults = {"epochs": recipe.epochs, "batch_size": recipe.batch_size, "lr": recipe.lr,
                "seed": 0}  # fmt: skip
    return {k: defaults[k] if v is None else v for k, v in given.items()}


def _resume(args: argparse.Namespace):
    """The recipe, state, settings and history of ``--resume``; refuses changed settings."""
    path = find_checkpoint("--resume", args.resume)
    recipe, ts, metadata = restore("--resume", path, args.device)
    if args.recipe not in (None, recipe.name):
        raise CliError(f"--resume {path} is a {recipe.name} run, not {args.recipe}; "
                       "drop the recipe name or start a new run")  # fmt: skip
    for key in SETTINGS:
        given = getattr(args, key, None)
        if given is not None and given != metadata[key]:
            raise CliError(f"--{key.replace('_', '-')} {given} differs from the resumed run's "
                           f"{metadata[key]}: a resumed run keeps its settings to continue bit "
                           "for bit; start a new run (--out elsewhere) to change them")  # fmt: skip
    saved_dir = metadata.get("data_dir")
    if args.data_dir is None and saved_dir is not None:
        args.data_dir = Path(saved_dir)
    return recipe, ts, {k: metadata[k] for k in SETTINGS}, metadata["history"], path


def _callbacks(args, recipe: Recipe, settings, history, resumed: bool) -> list:
    if args.out is None:
        return [EarlyStopping(f"val_{recipe.monitor}", mode=recipe.mode, patience=args.patience)
                ] if args.patience else []  # fmt: skip
    data_dir = None if args.data_dir is None else str(args.data_dir.resolve())
    metadata = {"recipe": recipe.name, **settings, "data_dir": data_dir}
    callbacks: list = [
        Checkpoint(checkpoint_folder(args.out), every=args.checkpoint_every,
                   keep_last=args.keep, monitor=f"val_{recipe.monitor}", mode=recipe.mode,
                   metadata=metadata),
        CsvLogger(args.out / "metrics.csv", args.out / "steps.csv" if args.log_every else None,
                  history=history),
        TensorBoard(args.out / "tensorboard",
                    purge_step=int(history[-1]["step"]) + 1 if resumed and history else None),
    ]  # fmt: skip
    if args.patience:
        callbacks.append(
            EarlyStopping(f"val_{recipe.monitor}", mode=recipe.mode, patience=args.patience)
        )
    return callbacks


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.resume is not None:
        recipe, ts, settings, history, path = _resume(args)
        if args.out is None:
            args.out = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        print(f"resuming {path} at epoch {len(history)}")
    elif args.recipe is None:
        raise CliError("name a recipe to train (e.g. train lenet), or pass --resume DIR")
    else:
        recipe, ts, history = RECIPES[args.recipe], None, []
        settings = _settings(args, recipe)
    if args.out is not None:
        with failure(f"creating --out {args.out}", "pick a folder you can write to", OSError):
            args.out.mkdir(parents=True, exist_ok=True)
    split = _load(recipe, args.data_dir)
    n_train = len(split.x_train) - round(len(split.x_train) * recipe.validation)
    batch_size = settings["batch_size"]
    if batch_size > n_train:
        raise CliError(
            f"--batch-size {batch_size} is larger than the {n_train} training images: no step "
            f"would run; pass --batch-size {n_train} or less"
        )
    settings.setdefault("total_steps", settings["epochs"] * (n_train // batch_size))
    print(
        f"{recipe.name}: {n_train} training, {len(split.x_train) - n_train} validation and "
        f"{len(split.x_test)} test images, {settings['epochs']} epochs of batch {batch_size}, "
        f"lr {settings['lr']}, on {args.device}"
    )
    result = fit(
        recipe.build_model(),
        recipe.make_optimizer(settings["lr"], settings["total_steps"]),
        split,
        loss_fn=recipe.loss_fn,
        evaluate=recipe.evaluate,
        validation=recipe.validation,
        epochs=settings["epochs"],
        batch_size=batch_size,
        seed=settings["seed"],
        device=args.device,
        compile=args.compile,
        augment=recipe.augment,
        progress=not args.no_progress,
        train_state=ts,
        history=history,
        callbacks=_callbacks(args, recipe, settings, history, ts is not None),
        log_every=args.log_every,
    )
    if result.stopped:
        print(f"stopped early after epoch {len(result.history)}: {result.stopped}")
    if args.out is not None and result.history:
        plot_history(result.history, args.out / "metrics.png")
        written = "metrics.csv, metrics.png, tensorboard/, checkpoints/"
        if recipe.draw is not None and len(split.x_test):
            write_predictions(recipe, result.train_state, split.x_test, split.y_test,
                              args.out / "predictions.png", "--out")  # fmt: skip
            written += ", predictions.png"
        print(f"wrote {args.out}: {written}")
    final = result.history[-1] if result.history else {"train_loss": float("nan")}
    # The recipe's monitored metric first (accuracy, mIoU, mAP...), then the others.
    first = recipe.monitor
    others = ", ".join(f"test {k} {v:.4f}" for k, v in result.test.items() if k != first)
    print(
        f"test {first}: {result.test.get(first, float('nan')):.4f} "
        f"({len(split.x_test)} held-out images; {others}), "
        f"final train loss {final['train_loss']:.4f}, {time.perf_counter() - start:.1f} s"
    )
    return 0
