"""Shared test settings: hypothesis profile and one torch thread per xdist worker."""

import os

import torch
from hypothesis import settings

# With pytest-xdist each worker is a process; one intra-op thread each keeps 2 workers
# from fighting over 2 cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

settings.register_profile("default", deadline=None, print_blob=True)
settings.load_profile("default")
