"""kanpeft methods on single KAN layers: init / merge equality, requires_grad, references."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

import kanpeft
from kanpeft.methods.tuner import AdapterLayer
from kanseg.layers import BASIS_REGISTRY, KANConv, create_kan_conv

FAMILIES = sorted(BASIS_REGISTRY)
POLYNOMIAL = [f for f in FAMILIES
              if create_kan_conv(f, 1, 2, 2, 1).basis.n_basis
              == (create_kan_conv(f, 1, 2, 2, 1).basis.degree or -2) + 1]
ADAPTER_TOKENS = {"basis": ("basis_delta", "extra_weight", "shape_delta"),
                  "scales": ("base_scale", "basis_scale", "degree_scale", "shift"),
                  "lora": ("lora_A", "lora_B")}


def make_layer(family: str, dims: int, bottleneck: bool, norm: str = "batch") -> nn.Module:
    """A small KAN layer with non-trivial norm affine parameters and running statistics."""
    torch.manual_seed(0)
    layer = create_kan_conv(family, dims, 4, 6, 3, padding=1, bottleneck=bottleneck, norm=norm,
                            dim_reduction=2.0, min_internal=3)
    for module in layer.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    for name, p in layer.named_parameters():
        if name.startswith("norm"):
            p.data.normal_(0.5, 0.3)
    return layer.eval()


def method_options(method: str, layer: nn.Module) -> dict:
    if method == "basis":
        degree = layer.basis.degree
        extendable = layer.basis.family != "kabn"  # Bernstein functions change with the degree
        return {"degrees": [0, degree], "extra_degrees": 2 if extendable else 0}
    return {}


def perturb_trainable(model: nn.Module) -> None:
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.1)


def check_method(method: str, family: str, dims: int, bottleneck: bool) -> None:
    layer = make_layer(family, dims, bottleneck)
    x = torch.randn(2, 4, *([5] * dims))
    with torch.no_grad():
        reference = layer(x)
    prepared = kanpeft.prepare(nn.Sequential(copy.deepcopy(layer)), method,
                               **method_options(method, layer)).eval()
    with torch.no_grad():
        assert (prepared(x) - reference).abs().max() <= 1e-5, "init equality"

    trainable = [n for n, p in prepared.named_parameters() if p.requires_grad]
    assert trainable, "no trainable parameter"
    for name in trainable:
        assert any(t in name for t in ADAPTER_TOKENS[method]), f"unexpected trainable {name}"
    frozen_adapter = [n for n, p in prepared.named_parameters()
                      if not p.requires_grad and any(t in n for t in ADAPTER_TOKENS[method])]
    assert not frozen_adapter

    perturb_trainable(prepared)
    with torch.no_grad():
        adapted = prepared(x)
    assert (adapted - reference).abs().max() > 1e-3, "the perturbed adapter changes nothing"
    merged = kanpeft.merge(prepared).eval()
    assert type(merged[0]) is type(layer)
    assert not any(isinstance(m, (AdapterLayer, LoraLayer)) for m in merged.modules())
    with torch.no_grad():
        assert (merged(x) - adapted).abs().max() <= 1e-4, "merge equality"


@pytest.mark.parametrize("bottleneck", [False, True], ids=["plain", "bottleneck"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["scales", "lora"])
def test_scales_and_lora_every_family(method, family, dims, bottleneck):
    check_method(method, family, dims, bottleneck)


@pytest.mark.parametrize("bottleneck", [False, True], ids=["plain", "bottleneck"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("family", POLYNOMIAL)
def test_basis_every_polynomial_family(family, dims, bottleneck):
    check_method("basis", family, dims, bottleneck)


def test_polynomial_families_found():
    assert {"kagn", "kaln", "kacn", "kajn", "kabn"} <= set(POLYNOMIAL)


def test_basis_matches_a_fresh_higher_degree_layer():
    """Independent reference: a new degree-5 Gram layer with the weights written by hand."""
    layer = make_layer("kagn", 2, False, norm="instance")
    prepared = kanpeft.prepare(layer, "basis", degrees=[1], extra_degrees=2)
    perturb_trainable(prepared)
    torch.manual_seed(3)
    ref = create_kan_conv("kagn", 2, 4, 6, 3, padding=1, degree=5, norm="instance")
    with torch.no_grad():
        ref.norm.load_state_dict(layer.norm.state_dict())
        ref.base_weight.copy_(layer.base_weight)
        w = torch.zeros(6, 4, 6, 3, 3)
        w[:, :, :4] = layer.basis_weight.view(6, 4, 4, 3, 3)
        w[:, :, 1] += prepared.basis_delta[:, :, 0]
        w[:, :, 4:] = prepared.extra_weight
        ref.basis_weight.copy_(w.flatten(1, 2))
        beta = torch.zeros(6)
        beta[:4] = layer.basis.beta_weights
        ref.basis.beta_weights.copy_(beta + prepared.shape_delta["beta_weights"])
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(prepared(x), ref(x), atol=1e-5, rtol=1e-4)
    merged = kanpeft.merge(prepared)
    assert merged.basis.degree == 5 and isinstance(merged, KANConv)


def test_scales_match_the_formula():
    """y = act(norm(conv(base_act(x), W_b s_b) + sum_d conv(P_d(x), W_d s_p s_d)) + shift)."""
    layer = make_layer("kagn", 2, False, norm="instance")
    prepared = kanpeft.prepare(layer, "scales")
    perturb_trainable(prepared)
    x = torch.randn(2, 4, 6, 6)
    n = layer.basis.n_basis
    w = layer.basis_weight.view(6, 4, n, 3, 3)
    polys = layer.basis(x)  # (B, C, n, H, W)
    y = F.conv2d(F.silu(x), layer.base_weight * prepared.base_scale.view(-1, 1, 1, 1), padding=1)
    for d in range(n):
        scale = (prepared.basis_scale * prepared.degree_scale[d]).view(-1, 1, 1, 1)
        y = y + F.conv2d(polys[:, :, d], w[:, :, d] * scale, padding=1)
    expected = F.silu(layer.norm(y) + prepared.shift.view(1, -1, 1, 1))
    torch.testing.assert_close(prepared(x), expected, atol=1e-5, rtol=1e-4)


def test_lora_matches_a_low_rank_weight_update():
    layer = make_layer("kaln", 2, False)
    prepared = kanpeft.prepare(nn.Sequential(copy.deepcopy(layer)), "lora", r=2, alpha=4.0).eval()
    perturb_trainable(prepared)
    lora = prepared.base_model.model[0]
    delta = lora.lora_B["default"].weight @ lora.lora_A["default"].weight * 2.0
    ref = copy.deepcopy(layer)
    with torch.no_grad():
        fused = delta.view(6, 4, layer.n_expanded, 3, 3)
        ref.base_weight += fused[:, :, 0]
        ref.basis_weight += fused[:, :, 1:].flatten(1, 2)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(prepared(x), ref(x), atol=1e-5, rtol=1e-4)


def test_gradients_flow_only_to_adapters_and_head():
    model = nn.Sequential(make_layer("kagn", 2, True), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 4, 5, 5))
    prepared = kanpeft.prepare(model, "scales", trainable_modules=["2"], train_norm=True)
    prepared.train()
    prepared(torch.randn(2, 4, 5, 5)).sum().backward()
    for name, p in prepared.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    names = {n for n, p in prepared.named_parameters() if p.requires_grad}
    assert {"2.weight", "2.bias", "0.base_layer.norm.weight", "0.shift"} <= names
    assert "0.base_layer.base_weight" not in names


def test_bad_options_are_named():
    layer = make_layer("kagn", 2, False)
    with pytest.raises(ValueError, match="bogus"):
        kanpeft.prepare(layer, "basis", bogus=1)
    with pytest.raises(ValueError, match="degrees"):
        kanpeft.prepare(copy.deepcopy(layer), "basis", degrees=[7])
    with pytest.raises(ValueError, match="method must be one of"):
        kanpeft.prepare(layer, "dora")
    with pytest.raises(ValueError, match="polynomial"):
        kanpeft.prepare(make_layer("fastkan", 2, False), "basis")
    with pytest.raises(ValueError, match="cannot take extra degrees"):
        kanpeft.prepare(make_layer("kabn", 2, False), "basis", extra_degrees=1)
    with pytest.raises(ValueError, match="affine norm"):
        kanpeft.prepare(make_layer("kagn", 2, False, norm="none"), "scales")
    with pytest.raises(ValueError, match="no module named 'head'"):
        kanpeft.prepare(nn.Sequential(make_layer("kagn", 2, False)), "scales",
                        trainable_modules=["head"])


def autograd_nodes(output: torch.Tensor) -> list:
    """The autograd nodes that produced ``output``."""
    nodes, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return nodes


@pytest.mark.parametrize("method, options", [("basis", {"degrees": [1], "extra_degrees": 1}),
                                             ("scales", {}), ("lora", {"r": 2})])
def test_adapters_run_the_layers_own_fused_forward(method, options):
    """The adapted layer's graph is the layer's ``ExpandConv`` (one fused conv over the
    expansion) and the all-ones convolution of P_0, not a second implementation with
    convolutions of its own."""
    layer = make_layer("kagn", 2, False, norm="instance").train()
    prepared = kanpeft.prepare(nn.Sequential(copy.deepcopy(layer)), method, **options)
    nodes = autograd_nodes(prepared(torch.randn(2, 4, 6, 6, requires_grad=True)))
    names = [type(node).__name__ for node in nodes]
    convs = [node for node in nodes if type(node).__name__ == "ConvolutionBackward0"]
    assert names.count("ExpandConvBackward") == 1, names
    assert len(convs) == 1 and convs[0]._saved_input.shape[:2] == (1, 1), names
