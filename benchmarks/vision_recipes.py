"""The vision recipes' full runs: ``train unet|deeplab|deeplab-bn|yolo`` at their defaults.

Run:  python benchmarks/vision_recipes.py [--recipes unet deeplab deeplab-bn yolo]

Each recipe is trained by ``python -m functorch_diary train NAME --no-progress`` in a
fresh process with one thread (``OMP_NUM_THREADS=1``), timed in wall-clock and in process
CPU seconds (user + sys): the machine may be shared, and CPU time is what the run itself
costs. The test split's metrics come from the run's last line, the per-epoch history
from its ``metrics.csv``, the settings from its best checkpoint.

Results go to benchmarks/results/vision_<recipe>.json and the run's prediction picture
to benchmarks/results/vision_<recipe>_predictions.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from functorch_diary.cli.recipes import RECIPES  # noqa: E402
from functorch_diary.cli.runs import find_checkpoint, restore  # noqa: E402


def _test_metrics(stdout: str) -> tuple[str, dict[str, float]]:
    """``test miou: 0.87 (500 held-out images; test loss 0.06, test x 0.9), ...`` as the
    headline metric's name and every metric."""
    line = [line for line in stdout.splitlines() if line.startswith("test ")][-1]
    headline, value, rest = re.match(
        r"test (\w+): ([\d.]+) \(\d+ held-out images; (.*)\), final", line
    ).groups()
    others = {k: float(v) for k, v in re.findall(r"test (\w+) ([-\d.e]+|nan)", rest)}
    return headline, {"loss": others.pop("loss"), headline: float(value), **others}


def run(name: str, out: Path) -> dict:
    """Train ``name`` at its defaults into ``out``; its record for the results file."""
    cmd = [sys.executable, "-m", "functorch_diary", "train", name, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [*cmd, "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    headline, test = _test_metrics(done.stdout)
    with open(out / "metrics.csv") as f:
        epochs = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    _, _, settings = restore("--resume", find_checkpoint("--resume", out), "cpu")
    record = {
        "recipe": name,
        "description": RECIPES[name].description,
        "command": f"OMP_NUM_THREADS=1 python -m functorch_diary train {name} "
        f"--out runs/{name} --no-progress",
        "settings": settings,
        "test": test,
        "headline": {headline: test[headline]},
        "epochs": epochs,
        "wall_seconds": round(wall, 2),
        "process_cpu_seconds": round(cpu, 2),
        "note": f"load average {load:.1f} at the start on a {os.cpu_count()}-core machine; "
        "the process CPU time (user + sys, one thread) is the machine-independent cost",
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    if (out / "predictions.png").exists():
        shutil.copy(out / "predictions.png", RESULTS / f"vision_{name}_predictions.png")
        record["pictures"] = f"vision_{name}_predictions.png"
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    vision = ["unet", "deeplab", "deeplab-bn", "yolo"]
    parser.add_argument("--recipes", nargs="+", default=vision, choices=vision)
    args = parser.parse_args()
    for name in args.recipes:
        with tempfile.TemporaryDirectory() as tmp:
            record = run(name, Path(tmp) / name)
        (RESULTS / f"vision_{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(
            f"{name}: {record['headline']}, {record['process_cpu_seconds']:.0f} CPU s, "
            f"{record['wall_seconds']:.0f} s wall"
        )


if __name__ == "__main__":
    main()
