"""``compile_cache=DIR``: a second process builds the same compiled step from the cache.

SLOW (~30-60 s on a loaded 2-core machine): the only test of the suite that runs
Inductor twice in fresh processes, since a cache hit only means something across
processes (in one process Dynamo keeps the compiled step in memory). A tiny MLP keeps
each compile to seconds. Hits are counted with torch's own counters:
``counters["inductor"]["fxgraph_cache_hit"]`` (Inductor's FX graph cache) and
``counters["aot_autograd"]["autograd_cache_hit"]`` (AOTAutograd's cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from functorch_diary.training.compile import ARTIFACTS_GLOB

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import json, sys
import torch
from torch import nn
from torch._dynamo.utils import counters
import functorch_diary as fd
from functorch_diary import optim

torch.set_num_threads(1)
model = fd.Model(lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
opt = optim.sgd(0.1, momentum=0.9)
step = fd.make_train_step(model, nn.functional.cross_entropy, opt, compile=True,
                          compile_cache=sys.argv[1])
ts = fd.init_train_state(model, opt, seed=0)
gen = torch.Generator().manual_seed(0)
batch = (torch.randn(16, 4, generator=gen), torch.randint(0, 2, (16,), generator=gen))
ts, metrics = step(ts, batch)
print(json.dumps({
    "fx_hit": counters["inductor"]["fxgraph_cache_hit"],
    "fx_miss": counters["inductor"]["fxgraph_cache_miss"],
    "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
    "aot_miss": counters["aot_autograd"]["autograd_cache_miss"],
    "loss": float(metrics["loss"]),
    "w": ts.params["0.weight"].flatten().tolist(),
}))
"""


def _build(cache: Path) -> dict:
    # A fresh process each time; its own cache dir only (nothing from the user's ~/.cache).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(cache)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_process_builds_the_step_from_the_cache(tmp_path):
    cold = _build(tmp_path)
    assert cold["fx_hit"] == 0 and cold["fx_miss"] >= 1, cold
    (artifacts,) = tmp_path.glob(ARTIFACTS_GLOB)  # the portable artifacts
    assert artifacts.stat().st_size > 0

    warm = _build(tmp_path)
    # Every graph of the step (forward+backward+update: one) came from the cache.
    assert warm["fx_miss"] == 0 and warm["fx_hit"] == cold["fx_miss"], warm
    assert warm["aot_hit"] >= 1 and warm["aot_miss"] == 0, warm
    # The same step: the same numbers to the bit.
    assert (warm["loss"], warm["w"]) == (cold["loss"], cold["w"])
