"""pytest-benchmark: the soft_moe cases of bench_soft_moe.py at their small sizes, every provider (see conftest.py)."""
import pytest

from . import bench_soft_moe
from .conftest import DEVICE, check_and_time, ids, params

PARAMS = params(bench_soft_moe.cases(DEVICE, "quick"))


@pytest.mark.parametrize("param", PARAMS, ids=[ids(p) for p in PARAMS])
def test_soft_moe(benchmark, param):
    check_and_time(benchmark, *param)
