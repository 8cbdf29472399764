"""Mixture-of-experts KAN convs: gating, sparse dispatch, load-balancing loss, memory, models,
and parity with torch-conv-kan's MoE convs and MoE VGG checkpoints."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close

from kanseg.layers import KANBottleneckConv, KANConv, create_kan_conv
from kanseg.layers.auxiliary import collect_auxiliary_losses
from kanseg.layers.moe import MoEKANConv
from kanseg.models import convert_torch_conv_kan, create_model, load_torch_conv_kan
from kanseg.models.convert_moe import moe_state_to_ours, moe_state_to_theirs
from conftest import import_reference_models
from test_attention import _saved_bytes
from test_models_convert import tck  # noqa: F401 - the reference's kan_convs and kans



def _randomise(module: nn.Module) -> None:
    """Every parameter and running statistic off its initial value (experts apart, gates
    non-zero); wavelet scales stay positive."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("scale"):
                p.uniform_(0.5, 1.5)
            elif p.requires_grad:
                p.copy_(torch.randn_like(p) * (1.0 if "w_gate" in name else 0.3))
        for name, buf in module.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buf.normal_()


def _moe(dims: int = 2, experts: int = 4, top_k: int = 2, **options) -> nn.Module:
    torch.manual_seed(0)
    layer = create_kan_conv("kagn", dims, 4, 6, 3, padding=1, moe_experts=experts,
                            moe_top_k=top_k, **options)
    _randomise(layer)
    return layer


def _cv2(values: list[float]) -> float:
    """Squared coefficient of variation, written out (unbiased variance)."""
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return variance / (mean**2 + 1e-10)


def _top_k_gates(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Row by row: the k largest probabilities divided by their sum (+1e-6), zero elsewhere."""
    gates = torch.zeros_like(probs)
    for b, row in enumerate(probs.tolist()):
        chosen = sorted(range(len(row)), key=lambda e: -row[e])[:k]
        total = sum(row[e] for e in chosen)
        for e in chosen:
            gates[b, e] = row[e] / (total + 1e-6)
    return gates


# ----------------------------------------------------------------------------- gating
def test_gates_are_the_renormalised_top_k_of_the_softmax():
    layer = _moe().eval()
    x = torch.randn(5, 4, 6, 6)
    gates, load = layer.gate(x)
    expected = _top_k_gates(torch.softmax(x.mean(dim=(2, 3)) @ layer.w_gate, 1), 2)
    assert_close(gates, expected)
    assert_close(load, (expected > 0).sum(0).float())
    assert_close(layer.gate(x)[0], gates)  # eval mode is deterministic


def test_noisy_training_gates_and_load_follow_the_reference_formula():
    """Noise std softplus(pooled @ w_noise) + 0.01; load = sum over samples of
    Phi((clean - threshold) / std), the threshold being the (k+1)-th largest noisy probability
    for experts whose noisy logit exceeds it, the k-th otherwise (torch-conv-kan's choice)."""
    layer = _moe(experts=5).train()
    x = torch.randn(6, 4, 5, 5)
    torch.manual_seed(3)
    gates, load = layer.gate(x)
    torch.manual_seed(3)
    noise = torch.randn(6, 5)
    with torch.no_grad():
        pooled = x.mean(dim=(2, 3))
        clean = pooled @ layer.w_gate
        std = F.softplus(pooled @ layer.w_noise) + 0.01
        noisy = clean + noise * std
        probs = torch.softmax(noisy, 1)
    expected_load = [0.0] * 5
    for b in range(6):
        ranked = sorted(probs[b].tolist(), reverse=True)
        for e in range(5):
            threshold = ranked[2] if noisy[b, e] > ranked[2] else ranked[1]
            z = (clean[b, e].item() - threshold) / std[b, e].item()
            expected_load[e] += 0.5 * (1 + math.erf(z / math.sqrt(2)))
    assert_close(gates, _top_k_gates(probs, 2))
    assert_close(load, torch.tensor(expected_load))


def test_load_balancing_loss_is_cv_squared_of_importance_and_load():
    layer = _moe(moe_noisy_gating=False, moe_loss_coef=0.3).train()
    x = torch.randn(7, 4, 6, 6)
    layer(x)
    gates, _ = layer.gate(x)
    expected = 0.3 * (_cv2(gates.sum(0).tolist()) + _cv2((gates > 0).sum(0).float().tolist()))
    assert layer.auxiliary_loss().item() == pytest.approx(expected, rel=1e-5)
    layer.eval()
    layer(x)
    assert layer.auxiliary_loss() is None


# ----------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("train", [False, True])
def test_output_and_gradients_are_the_gated_sum_of_the_selected_experts(recompute, train):
    """Against a per-sample loop over the selected experts; each expert only sees its samples."""
    layer = _moe(moe_noisy_gating=False, recompute=recompute).train(train)
    x = torch.randn(5, 4, 6, 6, requires_grad=True)
    seen = []
    hooks = [e.register_forward_hook(lambda m, i, o, k=k: seen.append((k, i[0].shape[0])))
             for k, e in enumerate(layer.experts)]
    y = layer(x)
    for hook in hooks:
        hook.remove()
    gates = layer.gate(x)[0]  # with its graph: the gates depend on x too
    assert sorted(seen) == [(e, n) for e, n in enumerate((gates > 0).sum(0).tolist()) if n]
    expected = torch.cat([
        sum(gates[b, e] * layer.experts[e](x[b:b + 1]) for e in range(4) if gates[b, e] > 0)
        for b in range(5)])
    assert_close(y, expected)
    cotangent = torch.randn_like(y)
    params = [x, *layer.experts.parameters()]
    got = torch.autograd.grad(y, params, cotangent, allow_unused=True)
    want = torch.autograd.grad(expected, params, cotangent, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b)


def test_gradients_reach_the_gates_and_only_the_chosen_experts():
    layer = _moe(top_k=1).train()  # noisy gating; 2 samples reach at most 2 of 4 experts
    x = torch.randn(2, 4, 6, 6)
    torch.manual_seed(1)
    y = layer(x)
    (y.square().mean() + layer.auxiliary_loss()).backward()
    torch.manual_seed(1)
    chosen = set((layer.gate(x)[0] > 0).nonzero()[:, 1].tolist())
    assert layer.w_gate.grad.abs().sum() > 0 and layer.w_noise.grad.abs().sum() > 0
    assert 1 <= len(chosen) <= 2
    for e, expert in enumerate(layer.experts):
        grads = [p.grad for p in expert.parameters()]
        if e in chosen:
            assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None for g in grads)


def _saved_ratio(layer: nn.Module, x: torch.Tensor) -> float:
    """Bytes autograd keeps for backward (distinct storages, plus the input the per-expert
    checkpoints hold), over the input's bytes."""
    return _saved_bytes(layer, x) / (x.numel() * x.element_size())


def test_saved_for_backward_within_four_times_input():
    """A recompute-enabled KAGN mixture (top-2 of 4) keeps <= 4x its input for backward; without
    the per-expert recompute the same layer keeps more (what the measure would catch)."""
    torch.manual_seed(0)
    layer = create_kan_conv("kagn", 2, 16, 16, 3, padding=1, moe_experts=4, moe_top_k=2)
    with torch.no_grad():
        layer.w_gate.normal_()
    x = torch.randn(4, 16, 24, 24, requires_grad=True)
    assert _saved_ratio(layer.train(), x) <= 4.0
    layer.recompute = False
    assert _saved_ratio(layer, x) > 4.0


def test_recompute_keeps_gradients_and_running_statistics():
    """Batch-norm experts: recomputing an expert in backward neither changes the gradients nor
    updates the running statistics twice."""
    torch.manual_seed(0)
    layer = create_kan_conv("kagn", 2, 4, 4, 3, padding=1, norm="batch", moe_experts=3,
                            moe_top_k=2, moe_noisy_gating=False)
    with torch.no_grad():
        layer.w_gate.normal_()
    x = torch.randn(6, 4, 6, 6)
    results = []
    for recompute in (True, False):
        model = copy.deepcopy(layer).train()
        model.recompute = recompute
        model(x).square().sum().backward()
        results.append([p.grad for p in model.parameters()] + list(model.buffers()))
    for a, b in zip(*results):
        assert_close(a, b)


# ----------------------------------------------------------------------------- building
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("form", ["plain", "bottleneck", "inner"])
def test_builds_in_1d_2d_3d(dims, form):
    options = {"bottleneck": form != "plain", "moe_inner": form == "inner"}
    layer = create_kan_conv("kagn", dims, 8, 8, 3, padding=1, moe_experts=3, moe_top_k=2,
                            **options).train()
    mixture = layer.core if form == "inner" else layer
    assert isinstance(mixture, MoEKANConv) and mixture.num_experts == 3
    expert_type = {"plain": "KANConv", "bottleneck": "KANBottleneckConv", "inner": "KANConv"}
    assert type(mixture.experts[0]).__name__ == expert_type[form]
    y = layer(torch.randn((2, 8) + (5,) * dims))
    assert y.shape == (2, 8) + (5,) * dims
    assert mixture.auxiliary_loss().shape == ()


@pytest.mark.parametrize("family", ["kacn", "fastkan", "wavkan", "kan"])
def test_other_families_mix(family):
    layer = create_kan_conv(family, 2, 4, 4, 3, padding=1, moe_experts=2, moe_top_k=1)
    assert layer(torch.randn(3, 4, 5, 5)).shape == (3, 4, 5, 5)


@pytest.mark.parametrize("options, match", [
    ({"moe_experts": 2, "moe_top_k": 3}, "moe_top_k"),
    ({"moe_experts": -1}, "moe_experts"),
    ({"moe_experts": 2, "moe_inner": True}, "bottleneck=True"),
])
def test_bad_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        create_kan_conv("kagn", 2, 4, 4, 3, **options)


def test_trace_routes_each_input_as_eager():
    layer = _moe().eval()
    x1, x2 = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6) * 3
    assert not torch.equal(layer.gate(x1)[0] > 0, layer.gate(x2)[0] > 0)
    traced = torch.jit.trace(layer, x1, check_trace=False)
    assert_close(traced(x2), layer(x2))


def test_deepcopy_after_a_training_forward():
    layer = _moe().train()
    layer(torch.randn(2, 4, 6, 6))
    clone = copy.deepcopy(layer)
    assert clone.auxiliary_loss() is None and layer.auxiliary_loss() is not None


def _mixtures(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, MoEKANConv)]


def test_networks_take_moe_options():
    """``model.moe_*`` reach every KAN conv with a kernel > 1 (not the 1x1 ones; not VGG's
    first conv, as torch-conv-kan), and each mixture reports its loss."""
    net = create_model("ukanet", spatial_dims=2, in_channels=1, out_channels=2, width=4,
                       depth=2, moe_experts=2, moe_top_k=1).train()
    net(torch.randn(2, 1, 16, 16))
    names = _mixtures(net)
    experts = {id(e) for n in names for e in net.get_submodule(n).experts}
    one_by_one = [m for m in net.modules() if isinstance(m, KANConv) and m.kernel_size == (1, 1)]
    assert names and one_by_one and not any(id(m) in experts for m in one_by_one)
    losses = [net.get_submodule(n).auxiliary_loss() for n in names]
    assert_close(collect_auxiliary_losses(net, by_kind=True)["load_balance"], sum(losses))
    vgg = create_model("vgg_kan", in_channels=3, num_classes=4, vgg_type="VGG11",
                       moe_experts=2, bottleneck_convs=True, moe_inner=True)
    assert not _mixtures(vgg.features[0])
    assert all(isinstance(f.core, MoEKANConv) for f in vgg.features[1:]
               if isinstance(f, KANBottleneckConv))
    res = create_model("reskanet18", in_channels=3, num_classes=4, width=4, family="kaln",
                       moe_experts=2)
    assert _mixtures(res)


# ----------------------------------------------------------------------------- parity
@pytest.fixture(scope="module")
def tck_vggkan():
    """torch-conv-kan's ``models.vggkan`` (its MoE VGG builders)."""
    return import_reference_models("vggkan")[0]


MOE_FAMILIES = {"KAN": {}, "FastKAN": {}, "KALN": {"degree": 3, "groups": 2},
                "KACN": {"degree": 3, "groups": 2}, "KAGN": {"degree": 3, "groups": 2},
                "WavKAN": {}, "FullBottleneckKAGN": {"degree": 3, "groups": 2}}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(MOE_FAMILIES))
def test_reference_moe_convs_convert_with_equal_outputs_and_losses(tck, name, dims):
    torch.manual_seed(0)
    cls = getattr(tck[0], f"MoE{name}Conv{dims}DLayer")
    ref = cls(4, 6, num_experts=4, k=2, kernel_size=3, padding=1, **MOE_FAMILIES[name])
    _randomise(ref)
    ref.eval()
    ours = convert_torch_conv_kan(ref)
    assert isinstance(ours, MoEKANConv) and not ours.training
    x = torch.randn((5, 4) + (6,) * dims)
    y_ref, loss_ref = ref(x)
    assert_close(ours(x), y_ref, rtol=1e-4, atol=1e-4)
    assert_close(ours.load_balancing_loss(*ours.gate(x)), loss_ref.reshape(()))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("pregate", [False, True])
def test_reference_moe_bottleneck_kagn_converts(tck, dims, pregate):
    torch.manual_seed(0)
    cls = getattr(tck[0], f"MoEBottleNeckKAGNConv{dims}DLayer")
    ref = cls(8, 12, 3, degree=3, groups=2, padding=1, num_experts=3, k=2, pregate=pregate)
    _randomise(ref)
    ref.eval()
    ours = convert_torch_conv_kan(ref)
    assert isinstance(ours, KANBottleneckConv) and isinstance(ours.core, MoEKANConv)
    x = torch.randn((4, 8) + (6,) * dims)
    y_ref, loss_ref = ref(x)
    assert_close(ours(x), y_ref, rtol=1e-4, atol=1e-4)
    inner = ours.inner_proj(x)
    assert_close(ours.core.load_balancing_loss(*ours.core.gate(inner)), loss_ref.reshape(()))


def test_training_forward_matches_the_reference_for_the_same_noise(tck):
    """Noisy gating in training draws the same noise as torch-conv-kan: outputs and losses."""
    torch.manual_seed(0)
    ref = tck[0].MoEKAGNConv2DLayer(4, 6, num_experts=4, k=2, kernel_size=3, padding=1)
    _randomise(ref)
    ours = convert_torch_conv_kan(ref)
    assert ours.training
    x = torch.randn(6, 4, 6, 6)
    torch.manual_seed(5)
    y_ref, loss_ref = ref(x)
    torch.manual_seed(5)
    assert_close(ours(x), y_ref, rtol=1e-4, atol=1e-4)
    assert_close(ours.auxiliary_loss(), loss_ref.reshape(()))


@pytest.mark.parametrize("inner", [False, True])
def test_checkpoint_layout_maps_both_ways(tck, inner):
    """A reference MoE layer's state dict -> ours (what ``load_torch_conv_kan`` does for each
    MoE VGG layer) gives its outputs, and maps back to the same tensors."""
    torch.manual_seed(0)
    if inner:
        ref = tck[0].MoEBottleNeckKAGNConv2DLayer(8, 12, 3, degree=2, groups=2, padding=1,
                                                  num_experts=3, k=2, dim_reduction=8)
        ours = create_kan_conv("kagn", 2, 8, 12, 3, padding=1, groups=2, degree=2,
                               affine=False, bottleneck=True, dim_reduction=8, moe_experts=3,
                               moe_inner=True)
    else:
        ref = tck[0].MoEKAGNConv2DLayer(8, 12, num_experts=3, k=2, degree=2, groups=2)
        ours = create_kan_conv("kagn", 2, 8, 12, 3, padding=1, groups=2, degree=2,
                               affine=False, moe_experts=3)
    _randomise(ref)
    theirs = ref.eval().state_dict()
    ours.eval().load_state_dict(moe_state_to_ours(theirs, ours, 2))
    x = torch.randn(4, 8, 6, 6)
    assert_close(ours(x), ref(x)[0], rtol=1e-4, atol=1e-4)
    back = moe_state_to_theirs(ours.state_dict(), ours, 2)
    assert sorted(back) == sorted(theirs)
    for key, value in back.items():
        if not (inner and key.startswith("w_")):  # the outer gate, unused by the reference
            assert_close(value, theirs[key])


@pytest.mark.parametrize("builder", [pytest.param("moe_vggkagn", marks=pytest.mark.slow),
                                     "moe_vggkagn_bn"])
def test_reference_moe_vggs_load_and_convert(tck_vggkan, tmp_path, builder):
    """A torch-conv-kan MoE VGG saved as its checkpoint folder loads with
    ``load_torch_conv_kan``, and the instance converts: equal logits and summed
    load-balancing losses in eval mode. Every expert gets every sample (k = experts): the
    reference fails on an expert without samples (affine instance norm of an empty batch)."""
    config = {"input_channels": 3, "num_classes": 5, "groups": 2, "degree": 2,
              "vgg_type": "VGG11", "num_experts": 2, "k": 2, "affine": True}
    torch.manual_seed(0)
    ref = getattr(tck_vggkan, builder)(**config)
    _randomise(ref)
    ref.eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = load_torch_conv_kan(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    logits_ref, loss_ref = ref(x)
    assert_close(ours(x), logits_ref, rtol=1e-4, atol=1e-4)
    assert_close(convert_torch_conv_kan(ref)(x), logits_ref, rtol=1e-4, atol=1e-4)
    features, loss = x, 0.0
    for layer in ours.features:
        mixture = layer if isinstance(layer, MoEKANConv) else getattr(layer, "core", None)
        if isinstance(mixture, MoEKANConv):
            gate_input = features if mixture is layer else layer.inner_proj(features)
            loss = loss + mixture.load_balancing_loss(*mixture.gate(gate_input))
        features = layer(features)
    assert_close(loss, loss_ref.reshape(()))
