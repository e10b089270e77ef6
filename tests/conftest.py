"""Fixtures: fresh random inputs each run (the seed is printed, MOE_KERNELS_TEST_SEED replays it) and
backend parametrisation. Helper functions live in tests/helpers.py."""
import os
import random

import pytest
import torch

# Triton kernels run on CPU tensors in the interpreter; the switch is read when the kernels are defined,
# so it is set before moe_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import moe_kernels  # noqa: E402
from moe_kernels import _backend  # noqa: E402


# MOE_KERNELS_TEST_DEVICE=cuda runs the whole suite's tensors on the GPU (benchmarks/gpu_session.sh): the
# kernels the interpreter checks on CPU then compile and run on the real chip.
TEST_DEVICE = os.environ.get("MOE_KERNELS_TEST_DEVICE")


@pytest.fixture(autouse=True)
def test_device():
    if TEST_DEVICE:
        torch.set_default_device(TEST_DEVICE)
    yield
    if TEST_DEVICE:
        torch.set_default_device(None)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A new seed for every test and run; printed so a failure can be replayed."""
    seed = int(os.environ.get("MOE_KERNELS_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    print(f"MOE_KERNELS_TEST_SEED={seed}")
    return seed


def cpu_backends():
    """The backends that can run CPU tensors here; MOE_KERNELS_TEST_CPU_BACKENDS=native (comma-separated names)
    keeps only those (the sanitizer and poisoned runs test the native ops, not the reference again)."""
    names = ["reference"]
    if _backend.NATIVE:
        names.append("native")
    keep = os.environ.get("MOE_KERNELS_TEST_CPU_BACKENDS")
    if keep:
        wanted = [n.strip() for n in keep.split(",") if n.strip()]
        missing = [n for n in wanted if n not in names]
        if missing:
            raise pytest.UsageError(f"MOE_KERNELS_TEST_CPU_BACKENDS names {missing}, not among {names} here")
        names = wanted
    return names


@pytest.fixture(params=cpu_backends())
def backend(request):
    """Runs the test under each CPU backend (ops a backend lacks fall back to reference)."""
    with moe_kernels.use_backend(request.param):
        yield request.param
