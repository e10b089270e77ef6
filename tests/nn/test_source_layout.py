"""keep_source_layout: a module that saves and loads the state-dict layout of the layer it replaced."""
import pytest
import torch
from torch import nn

from moe_kernels.nn.source_layout import Piece, keep_source_layout, source_layout


class Stacked(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 6, 4))        # 3 experts, gate rows 0..2 then up rows 3..5
        self.v = nn.Parameter(torch.randn(2, 4, 3))        # 2 experts, stored transposed
        self.r = nn.Linear(4, 3, bias=False)


def pieces():
    """A renamed tensor, gate and up halves of each expert's slice, and (experts 0 and 1) transposed slices."""
    out = [Piece("gate.weight", "r.weight")]
    for e in range(3):
        out += [Piece(f"experts.{e}.w1", "w", e, (0, 3)), Piece(f"experts.{e}.w3", "w", e, (3, 6))]
        if e < 2:
            out.append(Piece(f"experts.{e}.t", "v", e, transpose=True))
    return out


def test_saves_the_source_keys_and_loads_them_back():
    m = keep_source_layout(Stacked(), pieces())
    state = m.state_dict()
    assert set(state) == {"gate.weight", *(f"experts.{e}.{n}" for e in range(3) for n in ("w1", "w3", "t")
                                           if (e, n) != (2, "t"))}
    assert torch.equal(state["experts.1.w3"], m.w[1, 3:6]) and torch.equal(state["experts.0.t"], m.v[0].t())
    assert state["experts.1.w3"].is_contiguous() and state["experts.1.w3"].untyped_storage().size() == 3 * 4 * 4
    other = keep_source_layout(Stacked(), pieces())
    other.load_state_dict(state, strict=True)
    assert torch.equal(other.w, m.w) and torch.equal(other.v, m.v) and torch.equal(other.r.weight, m.r.weight)


def test_takes_its_own_layout_too_and_nests():
    outer = nn.Sequential(nn.Linear(2, 2), keep_source_layout(Stacked(), pieces()))
    own = {"0.weight": torch.randn(2, 2), "0.bias": torch.randn(2), "1.w": torch.randn(3, 6, 4),
           "1.v": torch.randn(2, 4, 3), "1.r.weight": torch.randn(3, 4)}
    outer.load_state_dict(own, strict=True)
    assert torch.equal(outer[1].w, own["1.w"])
    assert "1.experts.0.w1" in outer.state_dict() and "1.w" not in outer.state_dict()


def test_a_mismatched_or_missing_piece_is_an_error():
    m = keep_source_layout(Stacked(), pieces())
    state = m.state_dict()
    state["experts.1.w1"] = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="size mismatch for experts.1.w1"):
        m.load_state_dict(state)
    state = m.state_dict()
    del state["experts.2.w3"]
    with pytest.raises(RuntimeError, match="missing experts.2.w3"):
        m.load_state_dict(state)


def test_layout_naming_an_unknown_tensor_is_refused():
    with pytest.raises(ValueError, match="does not have"):
        keep_source_layout(Stacked(), [Piece("a", "nope")])
    assert source_layout(Stacked()) is None


def test_a_resized_module_saves_its_own_layout():
    # experts added or sharded after conversion: the original's layout no longer describes the module
    m = keep_source_layout(Stacked(), pieces())
    m.w = nn.Parameter(torch.randn(2, 6, 4))          # one expert fewer
    assert set(m.state_dict()) == {"w", "v", "r.weight"}
    m.w = nn.Parameter(torch.randn(4, 6, 4))          # one more
    assert set(m.state_dict()) == {"w", "v", "r.weight"}
