"""pytest-benchmark: the soft_moe cases of bench_soft_moe.py at their small sizes, every provider (see conftest.py).
16-bit passes carry an fp32 oracle: those providers are checked against it, with run_pass's earned tolerance."""
import pytest

from . import bench_soft_moe, common
from .conftest import DEVICE, built, check_and_time, ids, params

PARAMS = params(bench_soft_moe.cases(DEVICE, "quick"))


@pytest.mark.parametrize("param", PARAMS, ids=[ids(p) for p in PARAMS])
def test_soft_moe(benchmark, param):
    case, pass_name, name = param
    p = built(case, pass_name)
    prov = {q.name: q for q in p.providers}[name]
    if p.oracle is None or prov.dtype not in common._16BIT:
        check_and_time(benchmark, *param)
        return
    oracle = p.canon(p.oracle())
    ref = p.canon({q.name: q for q in p.providers}["reference"].fn())
    tol = max(common.TOLERANCE[prov.dtype], 2 * common.disagreement(ref, oracle))
    err = common.disagreement(p.canon(prov.fn()), oracle)
    assert err <= tol, f"{name} disagrees with the fp32 oracle: {err:.2e} (tolerance {tol:.1e})"
    benchmark.group = f"{case.name} {pass_name}"
    benchmark.extra_info.update(provider=name, kind=prov.kind, dtype=str(prov.dtype), flops=p.work.flops)
    benchmark(lambda: (prov.fn(), common.synchronize(DEVICE)))
