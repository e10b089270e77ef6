"""pytest-benchmark tests of the suite's cases at their small (--quick) sizes: `pytest benchmarks --benchmark-only`.

Each test is one (case, pass, provider); it first checks the provider against the reference, then times it. Tests
of one (case, pass) share a benchmark group, so the table puts the providers side by side, and
`--benchmark-autosave` / `--benchmark-compare` compare runs. `make test` runs `pytest tests`, which never collects
this directory.
"""
import os

import torch

from . import common

DEVICE = os.environ.get("MOE_KERNELS_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
_PASSES: dict = {}


def built(case, pass_name):
    """The case's Pass (providers built once per case and pass, shared by its tests)."""
    key = (case.name, pass_name)
    if key not in _PASSES:
        torch.manual_seed(0)
        _PASSES[key] = case.build(DEVICE, DTYPE)(common.PASSES[pass_name])
    return _PASSES[key]


def params(cases) -> list:
    """(case, pass name, provider name) of every provider of every pass of `cases`, for parametrize."""
    return [(c, p, prov.name) for c in cases for p in c.passes for prov in built(c, p).providers]


def ids(param) -> str:
    case, pass_name, provider = param
    return f"{case.label}|{pass_name}|{provider}".replace(" ", "_")


def check_and_time(benchmark, case, pass_name, provider_name):
    p = built(case, pass_name)
    by = {prov.name: prov for prov in p.providers}
    prov = by[provider_name]
    ref = p.canon(by["reference"].fn())
    err = common.disagreement(p.canon(prov.fn()), ref)
    assert err <= common.TOLERANCE[prov.dtype], f"{provider_name} disagrees with the reference: {err:.2e}"
    benchmark.group = f"{case.name} {pass_name}"
    benchmark.extra_info.update(provider=provider_name, kind=prov.kind, dtype=str(prov.dtype), flops=p.work.flops)
    if DEVICE == "cuda":
        benchmark(lambda: (prov.fn(), torch.cuda.synchronize()))
    else:
        benchmark(prov.fn)
