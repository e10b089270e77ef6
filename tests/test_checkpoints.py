"""Checkpoints of converted models round-trip both ways, for every layer of the zoo: a checkpoint of the original
loads into the converted model (same outputs), and the converted model saves a checkpoint the original class loads
(same outputs, the original's keys exactly), through torch.save and safetensors, nested in a model."""
import copy

import pytest
import torch
from torch import nn

import moe_kernels
from moe_kernels.nn.source_layout import source_layout

from .zoo import ZOO

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)     # float64, another summation order: ~1e-16 seen


def _save_load(state, fmt, path):
    if fmt == "torch":
        torch.save(state, path)
        return torch.load(path, weights_only=True)
    from safetensors.torch import load_file, save_file
    save_file(state, str(path))
    return load_file(str(path))


def _out(model, inputs):
    y = model(*inputs)
    return y[0] if isinstance(y, tuple) else y


class Wrapped(nn.Module):
    """The layer inside a model: a norm before it, its state under `block.`."""

    def __init__(self, layer, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.block = layer

    def forward(self, x, *rest):
        return self.block(self.norm(x), *rest)


def _randomized(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.4 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_checkpoints_round_trip(name, fmt, tmp_path):
    entry = ZOO[name]
    inputs = tuple(t.double() if torch.is_tensor(t) else {k: v.double() for k, v in t.items()}
                   for t in entry.inputs())
    dim = inputs[0].shape[-1]
    make = lambda: Wrapped(entry.build(), dim).double().eval()   # noqa: E731
    original = make()
    want = _out(original, inputs)
    state = _save_load(original.state_dict(), fmt, tmp_path / "original.ckpt")
    converted = moe_kernels.convert(_randomized(make()), strict=True)
    assert source_layout(converted.block) is not None, f"{type(converted.block).__name__} keeps its own layout"
    converted.load_state_dict(state, strict=True)
    torch.testing.assert_close(_out(converted, inputs), want, **TOL)
    saved = converted.state_dict()
    assert set(saved) == set(original.state_dict())
    fresh = _randomized(make())
    fresh.load_state_dict(_save_load(saved, fmt, tmp_path / "converted.ckpt"), strict=True)
    torch.testing.assert_close(_out(fresh, inputs), want, **TOL)


def test_a_converted_copy_trains_and_saves_what_it_learned(tmp_path):
    # a step of training on the converted model, saved, loaded into the original class: the same function
    entry = ZOO[sorted(n for n in ZOO if n.startswith("MixtralMoeLayer"))[0]]
    inputs = tuple(t.double() for t in entry.inputs())
    original = entry.build().double()
    converted = moe_kernels.convert(copy.deepcopy(original), strict=True)
    opt = torch.optim.SGD(converted.parameters(), lr=0.1)
    _out(converted, inputs).square().mean().backward()
    opt.step()
    torch.save(converted.state_dict(), tmp_path / "step.ckpt")
    original.load_state_dict(torch.load(tmp_path / "step.ckpt", weights_only=True), strict=True)
    torch.testing.assert_close(_out(original, inputs), _out(converted, inputs), **TOL)


def test_a_sharded_or_resized_layer_saves_its_own_layout():
    entry = ZOO[sorted(n for n in ZOO if n.startswith("MixtralMoeLayer"))[0]]
    converted = moe_kernels.convert(entry.build(), strict=True)
    E = converted.num_experts
    converted.experts.reindex_(list(range(E - 1)))
    assert "experts.gate_up_proj" in converted.state_dict()
