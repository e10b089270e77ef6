"""SparseMoE.quantize / Experts.quantize: the routed experts' projections in FP8 or MXFP4 for inference. The layer
equals the same layer holding the dequantised weights (float64 exactly), its state dict holds the checkpoints'
buffers and loads back as it is (GPT-OSS's 4-D MXFP4 blocks too), and what it cannot do is refused by name."""
import copy

import pytest
import torch

from moe_kernels import SparseMoE
from tests.helpers import assert_close64

F64 = torch.float64


def _layer(**kw):
    torch.manual_seed(0)
    return SparseMoE(64, 96, 6, 2, **kw).double().eval()


def _dequantised_twin(q: SparseMoE) -> SparseMoE:
    """A float SparseMoE with q's router and the dequantised expert weights."""
    twin = SparseMoE(q.dim, q.experts.hidden_dim, q.num_experts, q.top_k).double().eval()
    state = {k: v for k, v in q.state_dict().items() if not k.startswith("experts.")}
    up, down = q.experts.projections()
    state.update({"experts.gate_up_proj": up.dequantize(F64), "experts.down_proj": down.dequantize(F64)})
    twin.load_state_dict(state)
    return twin


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_quantized_layer_equals_its_dequantised_twin(backend, fmt):
    q = _layer().quantize(fmt)
    x = torch.randn(2, 7, 64, dtype=F64)
    with torch.no_grad():
        assert_close64(q(x), _dequantised_twin(q)(x))


@pytest.mark.parametrize("fmt, keys", [("fp8", ["gate_up_proj", "gate_up_proj_scale_inv", "down_proj",
                                                "down_proj_scale_inv"]),
                                       ("mxfp4", ["gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks",
                                                  "down_proj_scales"])])
def test_state_dict_holds_the_checkpoint_buffers_and_loads_back(fmt, keys):
    q = _layer().quantize(fmt)
    state = q.state_dict()
    assert sorted(k[len("experts."):] for k in state if k.startswith("experts.")) == sorted(keys)
    dtype = torch.float8_e4m3fn if fmt == "fp8" else torch.uint8
    assert state[f"experts.{keys[0]}"].dtype == dtype
    fresh = SparseMoE(64, 96, 6, 2).double().eval().quantize(fmt)
    if fmt == "mxfp4":   # GPT-OSS stores the blocks [E, N, K/32, 16]
        state = dict(state)
        for k in ("experts.gate_up_proj_blocks", "experts.down_proj_blocks"):
            state[k] = state[k].reshape(*state[k].shape[:2], -1, 16)
    fresh.load_state_dict(state)
    x = torch.randn(5, 64, dtype=F64)
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))


def test_what_quantized_experts_refuse():
    q = _layer().quantize("fp8")
    with pytest.raises(ValueError, match="already quantized"):
        q.quantize("mxfp4")
    with pytest.raises(ValueError, match="quantized experts cannot be resized"):
        q.remove_experts([0])
    with pytest.raises(NotImplementedError, match="inference only"):
        q(torch.randn(3, 64, dtype=F64, requires_grad=True))
    with pytest.raises(ValueError, match="mxfp4 needs K a multiple of 32"):
        SparseMoE(64, 40, 4, 2).quantize("mxfp4")
    bad = SparseMoE(64, 96, 6, 2).quantize("fp8").state_dict()
    bad["experts.gate_up_proj_scale_inv"] = bad["experts.gate_up_proj_scale_inv"][:, :1]
    with pytest.raises(RuntimeError, match="size mismatch for experts.gate_up_proj_scale_inv"):
        SparseMoE(64, 96, 6, 2).quantize("fp8").load_state_dict(bad)


def test_shared_experts_stay_float():
    layer = _layer(num_shared_experts=1)
    q = copy.deepcopy(layer).quantize("fp8")
    assert q.shared_experts.gate_up_proj.dtype == F64
    x = torch.randn(4, 64, dtype=F64)
    twin = _dequantised_twin(_layer().quantize("fp8"))
    with torch.no_grad():
        routed = q(x) - q.shared_experts.mix(x, torch.ones(4, 1, dtype=F64))
        assert_close64(routed, twin(x))
