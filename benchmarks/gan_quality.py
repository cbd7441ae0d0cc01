"""Do the ``gan`` command's defaults draw digits? A digit classifier scores their samples.

Run:  python benchmarks/gan_quality.py [--variants wgan wgan-gp sngan] [--gan-args "..."]

1. A small CNN is trained on the GAN's training split of the bundled digits
   (``load_digits(28).x_train``); its accuracy and confidence are measured on the test
   split, which no GAN ever sees.
2. Each variant is trained by ``python -m functorch_diary gan VARIANT`` with its default
   settings (plus ``--gan-args``), timed in wall-clock and in process CPU seconds: the
   machine may be shared, and CPU time is what the run itself costs.
3. 512 samples of the trained generator (noise seed 1, not the grid's) are classified:
   the mean top-class probability (target >= 0.8) and how many of the 10 classes are
   the top class of at least 10 samples, about 2% (target >= 8). The untrained
   generator is scored too: what the classifier says about noise.

Results go to a table on stdout, to benchmarks/results/gan_quality.json and to
benchmarks/results/gan_quality_<variant>.png (each run's sample grid).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from functorch_diary import Model, optim
from functorch_diary.cli import gan as gan_cli
from functorch_diary.cli import main as cli_main
from functorch_diary.data import load_digits
from functorch_diary.training.step import init_train_state, make_train_step

N_SAMPLES, MIN_COUNT = 512, 10
RESULTS = Path(__file__).parent / "results"

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--variants", nargs="+", default=sorted(gan_cli.RECIPES))
parser.add_argument("--gan-args", default="", help="extra options for every gan run")
parser.add_argument("--results", type=Path, default=RESULTS / "gan_quality.json")
args = parser.parse_args()
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))

# --- 1. the classifier ----------------------------------------------------------------------
# Two conv blocks with ReLU: trains to ~98% on the digits in seconds (the sigmoid LeNet
# needs many more epochs). Inputs in [-1, 1], as the generators produce them.
split = load_digits(size=28)
x_train, x_test = split.x_train * 2 - 1, split.x_test * 2 - 1
classifier = Model(
    lambda: nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )
)  # fmt: skip
adam = optim.adam(1e-3)
ts = init_train_state(classifier, adam, seed=0)
train_step = make_train_step(classifier, F.cross_entropy, adam)
order = torch.Generator().manual_seed(0)
for _epoch in range(10):
    for index in torch.randperm(len(x_train), generator=order).split(64):
        ts, _ = train_step(ts, (x_train[index], split.y_train[index]))


def classify(images: torch.Tensor) -> torch.Tensor:
    """Class probabilities, (N, 10)."""
    logits, _ = classifier.apply(ts.params, ts.state, images, train=False)
    return logits.softmax(1)


def score(images: torch.Tensor) -> dict:
    probs = classify(images)
    top, label = probs.max(1)
    counts = torch.bincount(label, minlength=10)
    return {
        "mean_top_probability": round(top.mean().item(), 4),
        "classes_present": int((counts >= MIN_COUNT).sum()),
        "class_counts": counts.tolist(),
    }


test_probs = classify(x_test)
reference = {
    "test_accuracy": round((test_probs.argmax(1) == split.y_test).float().mean().item(), 4),
    **score(x_test),
}
print(f"classifier on the {len(x_test)} held-out test digits: {reference}")

# --- 2./3. each GAN at its defaults, then its samples -----------------------------------------
rows = {}
args.results.parent.mkdir(parents=True, exist_ok=True)
runs = Path(tempfile.mkdtemp(prefix="gan_quality_"))
for variant in args.variants:
    out = runs / variant
    argv = ["gan", variant, "--out", str(out), "--no-progress", *shlex.split(args.gan_args)]
    wall, cpu = time.perf_counter(), time.process_time()
    assert cli_main(argv) == 0, f"gan {variant} failed"
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    first_and_last = gan_cli.checkpoints(out)
    gs, cfg, generator = gan_cli.load_run(first_and_last[-1])
    _, fresh, _ = gan_cli.build(gan_cli.RECIPES[variant], cfg, "cpu")
    rows[variant] = {
        "settings": cfg,
        "wall_s": round(wall, 1),
        "process_cpu_s": round(cpu, 1),
        **score(gan_cli.sample(generator, gs, N_SAMPLES, cfg["latent_dim"], seed=1)),
        "untrained": score(gan_cli.sample(generator, fresh, N_SAMPLES, cfg["latent_dim"], seed=1)),
    }
    shutil.copy(out / "samples.png", args.results.parent / f"gan_quality_{variant}.png")
    print(variant, json.dumps(rows[variant]))

print(f"\n{'GAN':<8} {'wall s':>7} {'CPU s':>7} {'top prob':>9} {'classes':>8}  untrained")
for variant, r in rows.items():
    u = r["untrained"]
    print(
        f"{variant:<8} {r['wall_s']:>7} {r['process_cpu_s']:>7} {r['mean_top_probability']:>9}"
        f" {r['classes_present']:>8}  {u['mean_top_probability']} / {u['classes_present']}"
    )
args.results.write_text(
    json.dumps(
        {
            "command": "python benchmarks/gan_quality.py"
            + (f" --gan-args {shlex.quote(args.gan_args)}" if args.gan_args else ""),
            "machine": {
                "platform": platform.platform(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "load_average": os.getloadavg(),
            },
            "samples": N_SAMPLES,
            "class_present_if_top_of_at_least": MIN_COUNT,
            "classifier_on_test_digits": reference,
            "gans": rows,
        },
        indent=2,
    )
    + "\n"
)
print(f"wrote {args.results}")
