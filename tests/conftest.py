"""Fixtures: fresh random inputs each run (the seed is printed, MOE_KERNELS_TEST_SEED replays it) and
backend parametrisation. Helper functions live in tests/helpers.py."""
import os
import random

import pytest
import torch

import moe_kernels
from moe_kernels import _backend


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A new seed for every test and run; printed so a failure can be replayed."""
    seed = int(os.environ.get("MOE_KERNELS_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    print(f"MOE_KERNELS_TEST_SEED={seed}")
    return seed


def cpu_backends():
    """The backends that can run CPU tensors here."""
    names = ["reference"]
    if _backend.NATIVE:
        names.append("native")
    return names


@pytest.fixture(params=cpu_backends())
def backend(request):
    """Runs the test under each CPU backend (ops a backend lacks fall back to reference)."""
    with moe_kernels.use_backend(request.param):
        yield request.param
