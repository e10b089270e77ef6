"""pytest-benchmark: the expert_mlp cases of bench_expert_mlp.py at their small sizes, every provider (see conftest.py)."""
import pytest

from . import bench_expert_mlp
from .conftest import DEVICE, check_and_time, ids, params

PARAMS = params(bench_expert_mlp.cases(DEVICE, "quick"))


@pytest.mark.parametrize("param", PARAMS, ids=[ids(p) for p in PARAMS])
def test_expert_mlp(benchmark, param):
    check_and_time(benchmark, *param)
