"""Shared test settings: hypothesis profile and one torch thread per xdist worker."""

import os

import torch
from hypothesis import settings

# With pytest-xdist each worker is a process; one intra-op thread each keeps 2 workers
# from fighting over 2 cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# The default profile draws the same examples on every run, so CI cannot go red on a draw
# no one has seen; `pytest --hypothesis-profile=explore` draws fresh ones (and reports a
# failing example's reproduction blob) to look for new counterexamples.
settings.register_profile("default", deadline=None, print_blob=True, derandomize=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile("default")
