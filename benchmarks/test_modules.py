"""pytest-benchmark: the modules cases of bench_modules.py at their small sizes, every provider (see conftest.py)."""
import pytest

from . import bench_modules
from .conftest import DEVICE, check_and_time, ids, params

PARAMS = params(bench_modules.cases(DEVICE, "quick"))


@pytest.mark.parametrize("param", PARAMS, ids=[ids(p) for p in PARAMS])
def test_modules(benchmark, param):
    check_and_time(benchmark, *param)
