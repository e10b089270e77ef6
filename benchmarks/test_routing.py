"""pytest-benchmark: the routing cases of bench_routing.py at their small sizes, every provider (see conftest.py)."""
import pytest

from . import bench_routing
from .conftest import DEVICE, check_and_time, ids, params

PARAMS = params(bench_routing.cases(DEVICE, "quick"))


@pytest.mark.parametrize("param", PARAMS, ids=[ids(p) for p in PARAMS])
def test_routing(benchmark, param):
    check_and_time(benchmark, *param)
