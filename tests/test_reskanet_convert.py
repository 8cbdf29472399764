"""ResKANet's layout options (``width_per_group``, ``replace_stride_with_dilation``,
``stem_options`` / ``pointwise_options``, ``hidden_dim``) and the torch-conv-kan ResKANets and
MoEResKANets that convert and load through them: bottleneck widths, dilated stages, hidden
layers and the ``reskagnetbn_moe_*`` models."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from kanseg.layers import KANBottleneckConv, KANConv
from kanseg.layers.moe import MoEKANConv
from kanseg.models import ResKANet, convert_torch_conv_kan, create_model, load_torch_conv_kan
from conftest import import_reference_models
from test_moe import _randomise
from test_reskanet_moe import assert_trains_alike


@pytest.fixture(scope="module")
def tck_reskanet():
    """torch-conv-kan's ``models.reskanet``."""
    return import_reference_models("reskanet")[0]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- our options
@pytest.mark.parametrize("style", ["kanseg", "torch_conv_kan"])
def test_dilated_stages_keep_their_resolution(style):
    model = create_model("reskanet50", in_channels=3, num_classes=0, width=4, style=style,
                         replace_stride_with_dilation=(False, True, True)).eval()
    assert model.feature_strides == [2, 4, 8, 8, 8]
    features = model.forward_features(torch.randn(1, 3, 64, 64))
    assert [64 // f.shape[-1] for f in features] == model.feature_strides
    last_3x3 = model.stages[3][1].body[1]
    assert last_3x3.dilation == (4, 4) and model.stages[3][0].body[1].dilation == (2, 2)


@pytest.mark.parametrize("style,inner", [("kanseg", 8), ("torch_conv_kan", 16)])
def test_width_per_group_sets_the_bottleneck_inner_width(style, inner):
    """torchvision's ``int(planes * width_per_group / 64)`` (times groups in the reference
    style, whose 3x3 conv alone is grouped)."""
    model = create_model("reskanet50", in_channels=3, num_classes=0, width=16, style=style,
                         width_per_group=32, groups=2)
    assert model.stages[0][0].body[0].out_channels == inner


def test_role_options_replace_the_network_options():
    """The stem and the 1x1 convs (shortcuts included) take their own family / norm; the
    3x3 convs and the hidden conv keep the network's."""
    model = create_model("reskanet18", in_channels=3, num_classes=4, width=4, family="kagn",
                         norm="batch", degree=2, style="torch_conv_kan", hidden_dim=6,
                         stem_options={"norm": "instance"},
                         pointwise_options={"family": "kaln", "norm": "instance"}).eval()
    block = model.stages[1][0]

    def describe(conv: KANConv) -> tuple[str, str]:
        return conv.basis.family, type(conv.norm).__name__

    assert describe(model.stem) == ("kagn", "InstanceNorm2d")
    assert describe(block.body[0]) == ("kagn", "BatchNorm2d")
    assert describe(block.body[1]) == describe(block.shortcut) == ("kaln", "InstanceNorm2d")
    assert describe(model.hidden) == ("kagn", "BatchNorm2d")
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)
    assert model.head[1].in_features == 6


# ----------------------------------------------------------------------------- parity
def _eval_parity(reference: nn.Module, ours: nn.Module, moe: bool, size: int = 32) -> float:
    """Max abs difference of eval outputs on random images (asserted within 1e-4)."""
    x = torch.randn(4, reference.input_channels, size, size)
    with torch.no_grad():
        expected = reference(x)
        expected = expected[0] if moe else expected
        got = ours(x)
    assert_close(got, expected, rtol=1e-4, atol=1e-4)
    return (got - expected).abs().max().item()


PLAIN_CASES: dict[str, tuple[str, list[int], dict[str, Any]]] = {  # block, layers, options
    "bottleneck-width": ("KAGNBottleneck", [1, 1, 1, 1],
                         dict(width_per_group=32, groups=2, affine=True)),
    "bottleneck-wide-dilated": ("KALNBottleneck", [1, 2, 2, 1],
                                dict(width_per_group=96, replace_stride_with_dilation=
                                     [False, True, True])),
    "bottleneck-bn-dilated": ("BottleneckKAGNBottleneck", [1, 1, 2, 2],
                              dict(replace_stride_with_dilation=[True, False, True],
                                   norm_layer=nn.BatchNorm2d, groups=2)),
    "basic-dilated-hidden": ("KAGNBasicBlock", [1, 1, 1, 1],  # a no-op hidden_layer_dim
                             dict(replace_stride_with_dilation=[False, False, True],
                                  hidden_layer_dim=7)),
}


def _plain_reference(module, case: str) -> nn.Module:
    block, layers, options = PLAIN_CASES[case]
    torch.manual_seed(0)
    reference = module.ResKANet(getattr(module, block), layers, input_channels=3,
                                num_classes=5, degree=2, **options)
    _randomise(reference)
    return reference.eval()


@pytest.mark.parametrize("case", sorted(PLAIN_CASES))
def test_reskanet_layout_options_convert_with_equal_outputs(tck_reskanet, case):
    reference = _plain_reference(tck_reskanet, case)
    ours = convert_torch_conv_kan(reference)
    assert isinstance(ours, ResKANet) and ours.hidden is None
    assert _n_params(ours) == _n_params(reference)
    _eval_parity(reference, ours, moe=False)


MOE_CASES: dict[str, tuple[str, list[int], dict[str, Any]]] = {  # block, layers, options
    "kaln-hidden": ("MoEKALNBasicBlock", [1, 2, 1, 1],
                    dict(hidden_layer_dim=12, norm_layer=nn.BatchNorm2d, affine=True)),
    "kaln-bottleneck-dilated": ("MoEKALNBottleneck", [1, 1, 2, 1],
                                dict(width_per_group=32, groups=2,
                                     replace_stride_with_dilation=[False, True, False])),
    "kagn-bn": ("MoEBottleneckKAGNBasicBlock", [1, 2, 1, 1], dict(affine=True, groups=2)),
    "kagn-bn-hidden": ("MoEBottleneckKAGNBasicBlock", [1, 1, 1, 1],
                       dict(hidden_layer_dim=10, use_first_maxpool=False)),
}


def _moe_reference(module, case: str) -> nn.Module:
    block, layers, options = MOE_CASES[case]
    options = {"use_first_maxpool": True, **options}
    torch.manual_seed(0)
    reference = module.MoEResKANet(
        getattr(module, block), layers, input_channels=3, num_classes=5, degree=2,
        fcnv_kernel_size=3, fcnv_stride=1, fcnv_padding=1, num_experts=3, k=2, **options)
    _randomise(reference)
    return reference.eval()


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_moe_reskanet_layouts_convert_with_equal_outputs(tck_reskanet, case):
    reference = _moe_reference(tck_reskanet, case)
    ours = convert_torch_conv_kan(reference)
    config = ours.model_config
    assert config["name"].startswith("moe_reskanet") and config["moe_experts"] == 3
    assert (ours.hidden is not None) == ("hidden_layer_dim" in MOE_CASES[case][2])
    mixtures = [m for m in ours.modules() if isinstance(m, MoEKANConv)]
    assert len(mixtures) == sum(MOE_CASES[case][1])
    # the reference's MoE bottleneck convs keep an outer gate their forward never uses
    unused = sum(m.w_gate.numel() + m.w_noise.numel() for m in reference.modules()
                 if hasattr(m, "inner_dim") and hasattr(m, "w_gate"))
    assert _n_params(ours) == _n_params(reference) - unused
    _eval_parity(reference, ours, moe=True)


def test_reskagnetbn_moe_models_convert_and_train_alike(tck_reskanet):
    """``reskagnetbn_moe_18x32p`` as built by torch-conv-kan: batch-normed MoE bottleneck KAGN
    3x3 convs, instance-normed KALN 1x1 convs and shortcuts, an instance-normed bottleneck KAGN
    stem; eval outputs match, and in training (same noise) the logits and the summed
    load-balancing losses do."""
    torch.manual_seed(0)
    reference = tck_reskanet.reskagnetbn_moe_18x32p(3, 5, degree=2, num_experts=3, affine=True)
    _randomise(reference)
    ours = convert_torch_conv_kan(reference.eval())
    config = ours.model_config
    assert config["moe_inner"] and config["family"] == "kagn" and config["norm"] == "batch"
    assert config["stem_options"] == {"norm": "instance"}
    assert config["pointwise_options"] == {"family": "kaln", "norm": "instance",
                                           "bottleneck_convs": False}
    assert isinstance(ours.stages[0][0].body[0], KANBottleneckConv)
    _eval_parity(reference, ours, moe=True, size=16)
    assert_trains_alike(reference.train(), ours.train(), torch.randn(4, 3, 16, 16))


# ----------------------------------------------------------------------------- checkpoints
def _config(reference: nn.Module, block_options: dict[str, Any], moe: bool) -> dict[str, Any]:
    """The constructor keyword arguments a checkpoint's config.json would hold."""
    config = {key: value for key, value in block_options.items() if key != "norm_layer"}
    config.update(fcnv_stride=reference.conv1.stride, use_first_maxpool=reference.use_first_maxpool)
    if moe:
        config.update(num_experts=3, k=2)
    return config


@pytest.mark.parametrize("case", sorted(PLAIN_CASES) + [f"moe-{c}" for c in sorted(MOE_CASES)])
def test_reskanet_layout_state_dicts_load(tck_reskanet, tmp_path, case):
    moe = case.startswith("moe-")
    if moe:
        reference = _moe_reference(tck_reskanet, case[4:])
        options = MOE_CASES[case[4:]][2]
    else:
        reference = _plain_reference(tck_reskanet, case)
        options = PLAIN_CASES[case][2]
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    ours = load_torch_conv_kan(tmp_path / "weights.pt", config=_config(reference, options, moe))
    _eval_parity(reference, ours, moe)


def test_kaln_reskanets_with_their_instance_normed_stem_convert(tck_reskanet):
    """torch-conv-kan's KALN ResKANets give ``norm_layer`` (batch norm by default) to their
    blocks but not to their stem, which keeps instance norm: ``stem_options``. Compared in
    float64: with randomised weights the logits reach ~1e5, where float32 rounding alone
    exceeds 1e-4."""
    torch.manual_seed(0)
    reference = tck_reskanet.reskalnet_18x32p(3, 5, degree=2)
    _randomise(reference)
    ours = convert_torch_conv_kan(reference.eval())
    assert ours.model_config["norm"] == "batch"
    assert ours.model_config["stem_options"] == {"norm": "instance"}
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close(ours.double()(x), reference.double()(x), rtol=1e-4, atol=1e-4)
