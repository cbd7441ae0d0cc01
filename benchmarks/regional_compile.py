"""Regional compilation: does marking ResNet-18's residual blocks as one
``torch.compiler.nested_compile_region`` (compiled once, reused by every block) cut the
cold Inductor compile of the whole functional train step?

    python benchmarks/regional_compile.py whole      # the step as one graph (the default)
    python benchmarks/regional_compile.py regional   # the blocks as one reused region

Each run starts from an empty Inductor cache. Results: docs/benchmarks.md.
"""

import os
import sys
import tempfile
import time
import types

# Cold: a fresh, empty cache, set before torch reads it.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()

import torch
from torch.nn import functional as F

import functorch_diary as fd

regional = sys.argv[1] == "regional"


def build():
    net = fd.models.resnet18(num_classes=10, cifar_stem=True).factory()
    if regional:
        blocks = [m for m in net.modules() if type(m).__name__ == "BasicBlock"]
        cls = type(blocks[0])

        @torch.compiler.nested_compile_region
        def block_forward(self, x):  # one region, reused by every block of the same shape
            return cls.forward(self, x)

        for block in blocks:
            block.forward = types.MethodType(block_forward, block)
    return net


model = fd.Model(build)
opt = fd.optim.sgd(0.01, momentum=0.9)
ts = fd.init_train_state(model, opt, seed=0)
step = fd.make_train_step(model, F.cross_entropy, opt, compile=True)
x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
times = []
for _ in range(2):  # the first step compiles, the second is steady
    start = time.perf_counter()
    ts, metrics = step(ts, (x, y))
    times.append(time.perf_counter() - start)
print(
    f"{sys.argv[1]}: first step {times[0]:.1f} s, steady {times[1] * 1e3:.0f} ms, "
    f"loss {float(metrics['loss']):.4f}"
)
