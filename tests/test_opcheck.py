"""torch.library.opcheck on every torch.ops.moe_kernels op, forward and backward, on every backend that runs
here. The samples are the op calls the public API makes on the shared programs of tests/samples.py (recorded
at the dispatcher), so each op is checked with the arguments it really gets; a new op that no program reaches
fails test_every_op_has_samples."""
import pytest
import torch

import moe_kernels
from moe_kernels import _backend

from .samples import OPCHECK_PARAMS, PROGRAMS, materialise, record_op_calls, run_with_grads

BACKENDS = ["reference"] + (["native"] if _backend.NATIVE else []) + (
    ["triton"] if _backend._triton_usable("cpu") else [])
CASES = [(name, i) for name, params in OPCHECK_PARAMS.items() for i in range(len(params))]


def recorded_calls(name, i, backend, dtype=torch.float32):
    """{op overload: (args, kwargs)} of the first call of each op in one forward + backward of the program."""
    program = PROGRAMS[name]
    gen = torch.Generator().manual_seed(1000 + i)
    inputs = materialise(program.make(OPCHECK_PARAMS[name][i], gen), dtype)
    with moe_kernels.use_backend(backend), record_op_calls() as rec:
        outs, _, _ = run_with_grads(program, inputs, ())
        cotangents = [torch.randn(o.shape, dtype=torch.float64, generator=gen) for o in outs]
        run_with_grads(program, inputs, cotangents)
    calls = {}
    for op, args, kwargs in rec.calls:
        calls.setdefault(op, (args, kwargs))
    return calls


def _fresh(v, grad):
    """A detached copy of an argument: a leaf that requires grad where the recorded tensor did, if `grad`."""
    if isinstance(v, torch.Tensor):
        t = v.detach().clone()
        return t.requires_grad_(grad and v.requires_grad) if t.is_floating_point() else t
    if isinstance(v, (list, tuple)):
        return type(v)(_fresh(u, grad) for u in v)
    if isinstance(v, dict):
        return {k: _fresh(u, grad) for k, u in v.items()}
    return v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_opcheck(case, backend):
    name, i = case
    if backend == "triton" and not PROGRAMS[name].triton:
        pytest.skip(f"the triton backend does not implement {name}'s ops")
    calls = recorded_calls(name, i, backend)
    assert calls, f"{name} made no moe_kernels op call"
    with moe_kernels.use_backend(backend):
        for op, (args, kwargs) in calls.items():
            # the backward ops have no derivative of their own (no double backward): their inputs need none
            grad = not op._schema.name.endswith("_backward")
            torch.library.opcheck(op, _fresh(args, grad), _fresh(kwargs, grad))


# inference-only ops (the programs here run a backward), with the test that opchecks them on every backend
OPCHECKED_ELSEWHERE = {"moe_kernels::moe_mlp_quantized": "tests/ops/test_quantized.py::test_moe_mlp_quantized_opcheck"}


def test_every_op_has_samples():
    ns = torch.ops.moe_kernels
    ops = {f"moe_kernels::{n}" for n in dir(ns) if isinstance(getattr(ns, n, None), torch._ops.OpOverloadPacket)}
    reached = {op._schema.name for case in CASES for backend in BACKENDS for op in recorded_calls(*case, backend)}
    missing = ops - reached - set(OPCHECKED_ELSEWHERE)
    assert missing == set(), f"ops without opcheck samples: {sorted(missing)}"
