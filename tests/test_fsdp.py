"""FSDP2 (`fully_shard`) and DTensor expert weights on moe_kernels, on 2 gloo processes started here
(tests/processes.py: one start-up for every scenario, each scenario its own test, the ranks' tracebacks in its failure).

- fully_shard on each decoder layer and the root of a tiny transformers Mixtral: a training step (forward on each
  rank's own tokens, loss, backward, SGD) on "moe_kernels" against the same on "eager": the loss, the gathered
  gradients and the gathered updated parameters within the earned float32 tolerance (tests/helpers, as
  tests/integrations/test_transformers_families.py earns it: twice eager's float32 error against a float64 eager run,
  plus the reordering of a sum). What the experts forward is handed under FSDP2 is recorded and checked: plain
  parameters, all E experts (FSDP2 unshards a 1-D mesh's DTensors for the forward).
- FSDP2 on a 2-D (dp, ep) mesh with the experts distributed Shard(0) over ep: the forward is handed DTensors, which
  run as expert parallelism; equal to the unsharded model.
- Expert weights distributed with distribute_tensor over a 2-rank mesh, Replicate() and Shard(0), every rank holding
  the same tokens: transformers' experts on moe_kernels (Mixtral; MuseSpark's post-expert norm, Replicate() only)
  and the modules that run the fused ops (SparseMoE with capacity, a shared expert, DenseMoE, SoftMoE with and
  without dropout, the fused DBRX and SwitchTransformers blocks), forward and backward in float64 equal to the same
  module with plain weights; the gradients on the DTensor parameters keep their placements and gather to the plain
  run's; the fused ops run on the local experts only.
- Refusals: placements other than those (TP shards of the hidden dim, Partial), weights of mixed kinds, E not
  divisible by the mesh, DTensor tokens, Shard(0) with a post-expert norm: a ValueError naming the module, the
  parameter and its placements, raised before any expert kernel runs.
"""
import contextlib
import copy

import pytest
import torch

import moe_kernels
from moe_kernels import DenseMoE, SoftMoE, SparseMoE
from moe_kernels.nn import Experts
from tests.helpers import F64, assert_close64, assert_earned_max, float64_everywhere, reordered_sum_atol
from tests.processes import check_scenario, run_scenarios

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
except ImportError:     # a torch without torch.distributed: run_scenarios skips the tests
    pass

pytestmark = pytest.mark.slow     # processes started here

W = 2
TIMEOUT_S = 180
D, H, E, K, VOCAB = 32, 64, 4, 2, 64        # the tiny Mixtral: hidden 32, intermediate 64, 4 experts, top-2
LR = 0.5


# --- what every rank runs ------------------------------------------------------------------------------------------
def _mixtral(implementation, dtype=torch.float32):
    """A tiny 2-layer Mixtral with the weights of this run's seed (the same on every rank and for every
    implementation), drawn as tests/integrations/test_transformers.py draws them: norm weights near 1, the others
    N(0, 0.2^2), router logits of std ~1."""
    transformers = pytest.importorskip("transformers")
    from moe_kernels.integrations.transformers import register

    register()
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=H, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
                                        num_experts_per_tok=K, max_position_embeddings=64,
                                        experts_implementation=implementation)
    g = torch.Generator().manual_seed(torch.initial_seed())
    model = transformers.MixtralForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return model.to(dtype)


def _tokens(rank=None, shape=(2, 8)):
    """Token ids of this run: each rank's own (rank given), or the same on every rank."""
    g = torch.Generator().manual_seed(torch.initial_seed() + 1 + (rank if rank is not None else 1000))
    return torch.randint(0, VOCAB, shape, generator=g)


def _loss(model, ids):
    """The next-token cross entropy in the logits' dtype (transformers' own loss computes in float32)."""
    logits = model(ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def _experts_modules(model):
    return [layer.mlp.experts for layer in model.model.layers]


def _record_weights_seen(model):
    """What each experts module is handed in its forward: [(type of gate_up_proj, its placements, its shape)]."""
    seen = []
    for m in _experts_modules(model):
        m.register_forward_pre_hook(lambda mod, args: seen.append(
            (type(mod.gate_up_proj).__name__, tuple(getattr(mod.gate_up_proj, "placements", ())),
             tuple(mod.gate_up_proj.shape))))
    return seen


def _training_step(model, ids, mesh):
    """fully_shard on each decoder layer and the root, then loss, backward and an SGD step -> (loss, the gathered
    gradients, the gathered updated parameters)."""
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    f64 = next(model.parameters()).dtype == F64
    with float64_everywhere() if f64 else contextlib.nullcontext():   # eager's float32 upcasts too: the oracle
        loss = model(ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    opt.step()
    return loss.detach(), grads, {n: p.detach().full_tensor() for n, p in model.named_parameters()}


def scenario_fully_shard_training_step(rank, W, group):
    """One training step under fully_shard: moe_kernels against eager, float32, within the earned tolerance."""
    mesh = init_device_mesh("cpu", (W,))
    ids = _tokens(rank)                                       # each rank's own batch
    fused = _mixtral("moe_kernels")
    seen = _record_weights_seen(fused)
    calls = _expert_ops()
    with calls:
        got = _training_step(fused, ids, mesh)
    eager = _training_step(_mixtral("eager"), ids, mesh)
    ref = _training_step(_mixtral("eager", F64), ids, mesh)
    # FSDP2 on a 1-D mesh hands the experts forward plain, whole parameters: the fused op on all E experts
    assert seen == [("Parameter", (), (E, 2 * H, D))] * 2, seen
    assert calls.experts == [E, E], calls.experts
    n = D + 2 * H
    for what, a, b, c in [("loss", got[0], ref[0], eager[0])] + [
            (f"{kind} {name}", a[name], b[name], c[name])
            for kind, i in (("grad", 1), ("updated", 2)) for a, b, c in [(got[i], ref[i], eager[i])] for name in b]:
        assert a.dtype == torch.float32 and b.dtype == F64, what
        assert_earned_max(a, b, c, atol=reordered_sum_atol(b, torch.float32, n), name=what)


def scenario_fully_shard_2d_mesh_expert_parallel(rank, W, group):
    """FSDP2 over dp of a (dp=1, ep=W) mesh, the experts Shard(0) over ep: the forward is handed DTensors on ep and
    runs them as expert parallelism; loss and every gathered gradient equal the plain model's (float64)."""
    mesh = init_device_mesh("cpu", (1, W), mesh_dim_names=("dp", "ep"))
    ids = _tokens()                                           # the ep ranks share a batch
    plain = _mixtral("moe_kernels", F64)
    model = copy.deepcopy(plain)
    want = _loss(plain, ids)
    want.backward()
    _distribute(model, mesh["ep"], [Shard(0)])
    seen = _record_weights_seen(model)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    calls = _expert_ops()
    with calls:
        loss = _loss(model, ids)
        loss.backward()
    assert seen == [("DTensor", (Shard(0),), (E, 2 * H, D))] * 2, seen
    assert calls.experts == [E // W] * 2, calls.experts
    assert_close64(loss.detach(), want.detach(), "loss")
    want_grads = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        assert_close64(p.grad.full_tensor(), want_grads[name].grad, f"grad of {name}")


# --- DTensor expert weights ----------------------------------------------------------------------------------------
class _expert_ops(contextlib.AbstractContextManager):
    """Within: `experts` lists how many experts each call of a fused op taking expert weights ran (ops.moe_mlp,
    ops.dense_moe, ops.grouped_mm, looked up on moe_kernels.ops as their callers do); forbid=True: such a call fails
    the test instead."""
    WEIGHT = {"moe_mlp": 3, "dense_moe": 2, "grouped_mm": 1}    # the position of the expert weight argument

    def __init__(self, forbid=False):
        self.experts, self.forbid, self.real = [], forbid, {}

    def __enter__(self):
        for op, i in self.WEIGHT.items():
            real = self.real[op] = getattr(moe_kernels.ops, op)

            def spy(*args, _op=op, _i=i, _real=real, **kwargs):
                if self.forbid:
                    raise AssertionError(f"ops.{_op} ran before the refusal")
                self.experts.append(args[_i].shape[0])
                return _real(*args, **kwargs)

            setattr(moe_kernels.ops, op, spy)
        return self

    def __exit__(self, *exc):
        for op, real in self.real.items():
            setattr(moe_kernels.ops, op, real)


def _distribute(module, mesh, placements, names=("gate_up_proj", "down_proj", "gate_up_bias", "down_bias"),
                where=None):
    """The expert weights (`names`) of every experts bank of `module` (transformers experts, moe_kernels Experts)
    become DTensor parameters with `placements`; `where` picks the banks (default: those holding gate_up_proj)."""
    for m in list(module.modules()) if where is None else where:
        if where is None and "gate_up_proj" not in m._parameters:
            continue
        for name in names:
            t = getattr(m, name, None)
            if isinstance(t, torch.nn.Parameter):
                setattr(m, name, torch.nn.Parameter(distribute_tensor(t.detach(), mesh, placements),
                                                    requires_grad=t.requires_grad))
    return module


def _compare_grads(module, plain, placements):
    """Every parameter's gradient equals the plain run's; DTensor gradients keep the parameter's placements."""
    want = dict(plain.named_parameters())
    dtensors = 0
    for name, p in module.named_parameters():
        g = p.grad
        assert g is not None, f"no gradient reached {name}"
        if isinstance(p, DTensor):
            dtensors += 1
            assert isinstance(g, DTensor) and tuple(g.placements) == tuple(placements), (name, g)
            g = g.full_tensor()
        assert_close64(g, want[name].grad, f"grad of {name}")
    assert dtensors, "no DTensor parameter"


def _check_module(module, x, placements, mesh, local_experts, forward=None, **distribute):
    """module (float64) with its expert weights distributed against itself with plain weights, on the same x on
    every rank: output, x's gradient, every parameter's gradient; the fused ops ran on `local_experts` experts."""
    forward = forward or (lambda m, x: m(x))
    plain = copy.deepcopy(module)
    xp = x.clone().requires_grad_(x.is_floating_point())
    want = forward(plain, xp)
    cot = torch.randn(want.shape, dtype=want.dtype, generator=torch.Generator().manual_seed(torch.initial_seed()))
    (want * cot).sum().backward()
    _distribute(module, mesh, placements, **distribute)
    xd = x.clone().requires_grad_(x.is_floating_point())
    with _expert_ops() as calls:
        got = forward(module, xd)
        (got * cot).sum().backward()
    if local_experts is not None:    # None: the path runs the grouped GEMMs from inside ops (not counted here)
        assert calls.experts and set(calls.experts) == {local_experts}, calls.experts
    assert_close64(got.detach(), want.detach(), "output")
    if x.is_floating_point():
        assert_close64(xd.grad, xp.grad, "grad of the input")
    _compare_grads(module, plain, placements)


def _placements(name):
    return {"replicate": [Replicate()], "shard0": [Shard(0)]}[name]


def _transformers_experts(rank, W, kind):
    mesh, placements = init_device_mesh("cpu", (W,)), _placements(kind)
    model = _mixtral("moe_kernels", F64)
    _check_module(model, _tokens(), placements, mesh, E if kind == "replicate" else E // W,
                  forward=lambda m, ids: m(ids).logits, names=("gate_up_proj", "down_proj"),
                  where=_experts_modules(model))


def scenario_transformers_experts_replicate(rank, W, group):
    """transformers' Mixtral experts on moe_kernels, weights Replicate() over 2 ranks."""
    _transformers_experts(rank, W, "replicate")


def scenario_transformers_experts_shard0(rank, W, group):
    """transformers' Mixtral experts on moe_kernels, weights Shard(0) over 2 ranks (2 local experts each)."""
    _transformers_experts(rank, W, "shard0")


def scenario_transformers_post_expert_norm(rank, W, group):
    """An experts module with a post-expert norm (MuseSpark): Replicate() runs, Shard(0) is refused with the reason
    (the norm's replicated parameters would get only the local experts' share of their gradient)."""
    try:
        transformers = pytest.importorskip("transformers")
        from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts
    except ImportError:
        pytest.skip("no MuseSpark in this transformers")
    from moe_kernels.integrations.transformers import register

    register()
    config = transformers.MuseSparkTextConfig(num_local_experts=E, moe_hidden_size=D, moe_intermediate_size=24,
                                              experts_implementation="moe_kernels")
    experts = MuseSparkExperts(config).to(F64)
    experts.config = config
    with torch.no_grad():
        for name, p in experts.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    ids, w = torch.stack([torch.randperm(E)[:K] for _ in range(9)]), torch.rand(9, K, dtype=F64)
    mesh = init_device_mesh("cpu", (W,))
    sharded = _distribute(copy.deepcopy(experts), mesh, [Shard(0)])
    with _expert_ops(forbid=True), pytest.raises(ValueError, match=r"MuseSparkExperts: gate_up_proj is a DTensor "
                                                 r"with placements \(Shard\(dim=0\),\).*Shard\(0\) does not run "
                                                 r"here: its post-expert norm's parameters are replicated"):
        sharded(torch.randn(9, D, dtype=F64), ids, w)
    _check_module(experts, torch.randn(9, D, dtype=F64), _placements("replicate"), mesh, None,
                  forward=lambda m, x: m(x, ids, w))


def _nn_modules(rank, W, kind):
    mesh, placements = init_device_mesh("cpu", (W,)), _placements(kind)
    local = 2 * W if kind == "replicate" else 2
    x = torch.randn(13, D, dtype=F64)
    sparse = SparseMoE(D, 24, 2 * W, 2, bias=True, capacity_factor=0.75, aux_loss_coef=0.0, dtype=F64)
    with torch.no_grad():
        sparse.router.weight.mul_(3.0)                      # uneven routing: the capacity drops pairs
    _check_module(sparse, x, placements, mesh, local, where=[sparse.experts])
    assert sparse.expert_stats()["dropped"] > 0
    # a shared expert (one expert: Replicate() only) mixes through ops.dense_moe
    shared = SparseMoE(D, 24, 2 * W, 2, num_shared_experts=1, dtype=F64).shared_experts
    _check_module(shared, x, _placements("replicate"), mesh, 1, forward=lambda m, x: m.mix(x, torch.sigmoid(x[:, :1])))
    dense = DenseMoE(D, 24, 2 * W, bias=True, dtype=F64)
    _check_module(dense, x, placements, mesh, local)
    xs = x[:8].view(1, 8, D)
    _check_module(SoftMoE(D, seq_len=8, num_experts=2 * W, dtype=F64), xs, placements, mesh, local)
    # dropout in training: grouped GEMMs over the slot rows sorted by expert; p this small drops nothing (the draws
    # are uniform in [0, 1), none below 1e-15 in a run), so it equals the module without dropout up to 1 / (1 - p)
    soft = SoftMoE(D, seq_len=8, num_experts=2 * W, dropout=1e-15, dtype=F64)
    _check_module(soft.train(), xs, placements, mesh, local)
    # the fused transformers blocks: DBRX's FFN (ops.moe_mlp), SwitchTransformers' MLP with dropout (grouped GEMMs)
    from moe_kernels.integrations.transformers_blocks import FusedDbrxFFN, FusedSwitchSparseMLP

    experts = Experts(D, 24, 2 * W, dtype=F64)
    dbrx = FusedDbrxFFN(torch.nn.Linear(D, 2 * W, dtype=F64), experts, top_k=2, normalize_p=1)
    _check_module(dbrx, x, placements, mesh, local)          # DBRX routes the [T, D] it is given
    experts = Experts(D, 24, 2 * W, gated=False, bias=True, activation="relu", dtype=F64)
    switch = FusedSwitchSparseMLP(_ArgmaxRouter(2 * W), experts, 1e-15)
    _check_module(switch.train(), xs, placements, mesh, local)


class _ArgmaxRouter(torch.nn.Module):
    """A SwitchTransformers-style router: (one-hot mask of the argmax expert, its probability [..., 1], the probs)."""

    def __init__(self, num_experts):
        super().__init__()
        self.linear = torch.nn.Linear(D, num_experts, dtype=F64)

    def forward(self, h):
        probs = self.linear(h).softmax(-1)
        top = probs.max(-1)
        return torch.nn.functional.one_hot(top.indices, probs.shape[-1]), top.values.unsqueeze(-1), probs


def scenario_nn_modules_replicate(rank, W, group):
    """SparseMoE (capacity, a shared expert), DenseMoE, SoftMoE (with and without dropout), the fused DBRX and
    SwitchTransformers blocks (with dropout), weights Replicate()."""
    _nn_modules(rank, W, "replicate")


def scenario_nn_modules_shard0(rank, W, group):
    """The same modules with their routed experts Shard(0) over 2 ranks."""
    _nn_modules(rank, W, "shard0")


def scenario_refusals(rank, W, group):
    """Unsupported placements, mixed weights, E not divisible by the mesh, DTensor tokens: ValueErrors naming the
    module, the parameter and its placements, before any expert kernel runs."""
    mesh = init_device_mesh("cpu", (W,))

    def refused(module, *args, match):
        with _expert_ops(forbid=True), pytest.raises(ValueError, match=match) as info:
            module(*args)
        return str(info.value)

    model = _mixtral("moe_kernels")
    ids = _tokens()
    experts = _experts_modules(model)[0]
    # tensor parallelism of the hidden dim (gate/up rows, down columns): not supported
    _distribute(model, mesh, [Shard(1)], names=("gate_up_proj",), where=[experts])
    _distribute(model, mesh, [Shard(2)], names=("down_proj",), where=[experts])
    msg = refused(model, ids, match=r"MixtralExperts: gate_up_proj is a DTensor with placements \(Shard\(dim=1\),\)")
    assert "supported: Replicate() on every mesh dim, or Shard(0)" in msg, msg
    # weights of mixed kinds
    model = _mixtral("moe_kernels")
    _distribute(model, mesh, [Shard(0)], names=("gate_up_proj",), where=[_experts_modules(model)[0]])
    refused(model, ids, match=r"MixtralExperts: down_proj is a plain tensor, but gate_up_proj is a DTensor "
                              r"with placements \(Shard\(dim=0\),\)")
    # Partial weights
    sparse = SparseMoE(D, 24, 2 * W, 2, dtype=torch.float32)
    for name in ("gate_up_proj", "down_proj"):
        t = getattr(sparse.experts, name)
        setattr(sparse.experts, name, torch.nn.Parameter(DTensor.from_local(t.detach(), mesh, [Partial()])))
    x = torch.randn(5, D)
    refused(sparse, x, match=r"SparseMoE.experts: gate_up_proj is a DTensor with placements \(Partial\(sum\),\)")
    # E not divisible by the mesh dim's size
    odd = _distribute(SparseMoE(D, 24, 2 * W + 1, 2), mesh, [Shard(0)])
    refused(odd, x, match=rf"SparseMoE.experts: gate_up_proj is a DTensor with placements \(Shard\(dim=0\),\).*"
                          rf"num_experts={2 * W + 1} must be divisible by the process group's size {W}")
    # DTensor tokens
    ok = _distribute(SparseMoE(D, 24, 2 * W, 2), mesh, [Shard(0)])
    routing = ok.route(x)
    refused(lambda x: ok._routed_experts(x, routing.experts, routing.weights, None),
            distribute_tensor(x, mesh, [Replicate()]), match="SparseMoE.experts: x is a DTensor")


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in list(globals().items()) if name.startswith("scenario_")}


@pytest.fixture(scope="module")
def results():
    return run_scenarios(SCENARIOS, W, TIMEOUT_S)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_fsdp_and_dtensor(results, scenario):
    check_scenario(results, scenario, W)
