"""MoE DenseKANets: the ``moe_*`` options and ``head_bottleneck`` of DenseKANet, the
``densekanet*_moebn`` models, and parity with torch-conv-kan's MoE DenseKANet / TinyDenseKANet."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from kanseg.layers import KANBottleneckConv, KANLinear, OptionError
from kanseg.layers.auxiliary import collect_auxiliary_losses
from kanseg.layers.moe import MoEKANConv
from kanseg.models import convert_torch_conv_kan, create_model, get_model_spec
from kanseg.models.densekanet import DENSE_LAYOUTS, DenseKANet
from conftest import import_reference_models
from test_moe import _randomise
from test_reskanet_moe import assert_trains_alike

SMALL = dict(growth_rate=4, num_init_features=8, bn_size=2, degree=1, moe_experts=3)
MOE_NAMES = [f"densekanet{layout}_moebn" for layout in DENSE_LAYOUTS]


@pytest.fixture(scope="module")
def tck_densekanet():
    """torch-conv-kan's ``models.densekanet``."""
    return import_reference_models("densekanet")[0]


def _mixtures(model: nn.Module) -> list[MoEKANConv]:
    return [m for m in model.modules() if isinstance(m, MoEKANConv)]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- our models
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("name", ["densekanet121_moebn", "densekanet_tiny_moebn"])
def test_moebn_variants_mix_only_the_dense_layers_3x3_convs(name, dims):
    """Each dense layer's 3x3 conv is a bottleneck conv whose inner conv is a mixture; the stem,
    the 1x1 convs and the head are not; each mixture reports its loss in training only."""
    model = create_model(name, spatial_dims=dims, in_channels=2, num_classes=3,
                         block_config=(2, 1, 1), **SMALL).train()
    layers = [layer for block in model.blocks for layer in block]
    assert all(isinstance(layer.conv2, KANBottleneckConv)
               and isinstance(layer.conv2.core, MoEKANConv) for layer in layers)
    assert len(_mixtures(model)) == len(layers) == 4
    assert not _mixtures(model.stem) and not _mixtures(model.classifier)
    assert not any(_mixtures(layer.conv1) for layer in layers)
    size = 32 if dims < 3 else 16
    assert model(torch.randn((2, 2) + (size,) * dims)).shape == (2, 3)
    losses = collect_auxiliary_losses(model, by_kind=True)
    assert_close(losses["load_balance"], sum(m.auxiliary_loss() for m in _mixtures(model)))
    model.eval()(torch.randn((1, 2) + (size,) * dims))
    assert not collect_auxiliary_losses(model)


@pytest.mark.parametrize("name", MOE_NAMES)
def test_moebn_variants_register_the_reference_defaults(name):
    """torch-conv-kan's ``densekagnet*moebn`` / ``tiny_densekagnet_moebn``: batch-normed
    bottleneck convs, 3x3 convs mixing 8 inner experts (top 2, noisy gating); the tiny one with
    its BottleNeckKAGN head."""
    defaults = get_model_spec(name).defaults
    growth, blocks = DENSE_LAYOUTS[name[len("densekanet"):-len("_moebn")]]
    assert (defaults["growth_rate"], defaults["block_config"]) == (growth, blocks)
    assert {key: defaults[key] for key in ("bottleneck_convs", "norm", "moe_experts",
                                           "moe_top_k", "moe_noisy_gating", "moe_inner")} == dict(
        bottleneck_convs=True, norm="batch", moe_experts=8, moe_top_k=2, moe_noisy_gating=True,
        moe_inner=True)
    assert defaults.get("head_bottleneck", False) == name.startswith("densekanet_tiny")


def test_moe_loss_and_task_loss_train_the_gates_and_experts():
    torch.manual_seed(0)
    model = create_model("densekanet_tiny_moebn", in_channels=1, num_classes=2,
                         block_config=(1, 1), **SMALL).train()
    logits = model(torch.randn(4, 1, 32, 32))
    aux = collect_auxiliary_losses(model, by_kind=True)["load_balance"]
    (logits.square().mean() + aux).backward()
    for mixture in _mixtures(model):
        assert mixture.w_gate.grad is not None and mixture.w_gate.grad.abs().sum() > 0
        assert any(e.basis_weight.grad is not None and e.basis_weight.grad.abs().sum() > 0
                   for e in mixture.experts)


def test_bottleneck_head_is_a_bottleneck_kan_linear_layer():
    model = create_model("densekanet_tiny_moebn", num_classes=4, block_config=(1, 1), **SMALL)
    head = model.classifier[1]
    assert isinstance(head, KANLinear) and isinstance(head.layer, KANBottleneckConv)
    assert not _mixtures(head) and head.layer.inner_proj.bias is not None
    model.reset_classifier(7)
    assert isinstance(model.classifier[1].layer, KANBottleneckConv)


@pytest.mark.parametrize("options, key", [
    (dict(moe_top_k=9), "moe_top_k"),
    (dict(bottleneck_convs=False), "moe_inner"),
    (dict(head_type="Linear"), "head_bottleneck"),
])
def test_bad_options_name_their_key(options, key):
    with pytest.raises(ValueError, match=key) as err, torch.device("meta"):
        create_model("densekanet_tiny_moebn", num_classes=2, **{**SMALL, **options})
    if isinstance(err.value, OptionError):
        assert err.value.key == key


# ----------------------------------------------------------------------------- parity
def _moe_reference(module, tiny: bool, noisy_gating: bool = True) -> nn.Module:
    """A small MoE DenseKANet (max-pool, 4 blocks) or TinyDenseKANet (BottleNeckKAGN head) of
    batch-normed grouped convs, randomised (gates apart)."""
    torch.manual_seed(0)
    options = dict(input_channels=3, num_classes=5, growth_rate=4, num_init_features=8,
                   bn_size=2, degree=2, groups=2, affine=True, norm_layer=nn.BatchNorm2d,
                   num_experts=3, k=2, noisy_gating=noisy_gating)
    if tiny:
        reference = module.TinyDenseKANet(module._MoEBottleNeckKAGNDenseBlock,
                                          block_config=(1, 2, 1), **options)
    else:
        reference = module.DenseKANet(module._MoEBottleNeckKAGNDenseBlock,
                                      block_config=(2, 1, 1, 1), dropout_linear=0.1, **options)
    _randomise(reference)
    return reference


def _outer_gates(reference: nn.Module) -> int:
    """Parameters of the outer ``w_gate`` / ``w_noise`` of the reference's MoE bottleneck convs,
    which its forward never uses (ours has none)."""
    return sum(m.w_gate.numel() + m.w_noise.numel() for m in reference.modules()
               if type(m).__name__.startswith("MoEBottleNeckKAGNConv"))


@pytest.mark.parametrize("tiny", [False, True], ids=["densekanet", "tiny"])
def test_moe_densekanets_convert_with_equal_outputs(tck_densekanet, tiny):
    reference = _moe_reference(tck_densekanet, tiny).eval()
    ours = convert_torch_conv_kan(reference)
    assert isinstance(ours, DenseKANet) and not ours.training
    config = ours.model_config
    assert (config["moe_experts"], config["moe_top_k"], config["moe_inner"]) == (3, 2, True)
    assert config.get("head_bottleneck", False) == tiny
    assert _n_params(ours) == _n_params(reference) - _outer_gates(reference)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert_close(ours(x), reference(x)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("noisy_gating", [False, True])
def test_moe_densekanet_training_loss_is_the_references(tck_densekanet, noisy_gating):
    """In training (same gating noise for the same seed) the logits and the summed auxiliary
    losses are those the reference returns (its summed load-balancing losses)."""
    reference = _moe_reference(tck_densekanet, tiny=True, noisy_gating=noisy_gating).train()
    ours = convert_torch_conv_kan(reference)
    assert ours.training
    assert_trains_alike(reference, ours, torch.randn(4, 3, 32, 32))


def test_tiny_bn_densekanet_with_its_bottleneck_head_converts(tck_densekanet):
    torch.manual_seed(0)
    reference = tck_densekanet.tiny_densekagnet_bn(3, 5, degree=1, growth_rate=4,
                                                   num_init_features=8)
    _randomise(reference)
    reference.eval()
    ours = convert_torch_conv_kan(reference)
    assert ours.model_config["head_bottleneck"] and "moe_experts" not in ours.model_config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("builder, name", [
    ("densekagnet121moebn", "densekanet121_moebn"), ("densekagnet161moebn", "densekanet161_moebn"),
    ("densekagnet169moebn", "densekanet169_moebn"), ("densekagnet201moebn", "densekanet201_moebn"),
    ("tiny_densekagnet_moebn", "densekanet_tiny_moebn")])
def test_named_moe_densekanets_have_the_reference_parameter_count(tck_densekanet, builder, name):
    """Counted on the meta device, less the reference's unused outer gate weights."""
    with torch.device("meta"):
        reference = getattr(tck_densekanet, builder)(3, 10)
        ours = create_model(name, num_classes=10)
    assert _n_params(ours) == _n_params(reference) - _outer_gates(reference)
