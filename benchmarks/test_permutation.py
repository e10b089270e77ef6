"""pytest-benchmark: the permutation cases of bench_permutation.py at their small sizes, every provider (see conftest.py)."""
import pytest

from . import bench_permutation
from .conftest import DEVICE, check_and_time, ids, params

PARAMS = params(bench_permutation.cases(DEVICE, "quick"))


@pytest.mark.parametrize("param", PARAMS, ids=[ids(p) for p in PARAMS])
def test_permutation(benchmark, param):
    check_and_time(benchmark, *param)
