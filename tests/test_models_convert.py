"""convert_torch_conv_kan: torch-conv-kan layer instances -> ours, equal outputs in eval mode."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from kanseg.layers import KANBottleneckConv, KANConv, KANLinear, OptionError
from kanseg.models import VGGKAN, convert_torch_conv_kan, create_model
from kanseg.models.u2kanet import U2KANet
from kanseg.layers.attention import KANSelfAttention
from conftest import import_reference, import_reference_models

CONV_CLASSES = {"kagn": ("kagn_conv", "KAGNConv{}DLayer"), "kaln": ("kaln_conv", "KALNConv{}DLayer"),
                "kajn": ("kajn_conv", "KAJNConv{}DLayer"), "kacn": ("kacn_conv", "KACNConv{}DLayer"),
                "kagn bottleneck": ("kagn_bottleneck_conv", "BottleNeckKAGNConv{}DLayer")}
NORMS = {1: (nn.InstanceNorm1d, nn.BatchNorm1d), 2: (nn.InstanceNorm2d, nn.BatchNorm2d),
         3: (nn.InstanceNorm3d, nn.BatchNorm3d)}


@pytest.fixture(scope="module")
def tck():
    """The reference packages ``kan_convs`` and ``kans``, imported from ../shared."""
    return import_reference("kan_convs", "kans")


def _randomise(module: nn.Module) -> None:
    """Move every parameter and running statistic off its initial value."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.data = p.data.contiguous()  # ReLU-KAN's phases are expanded views
            if "phase" in name:  # bump positions: keep them near their grid
                p.add_(0.05 * torch.randn_like(p))
            elif p.requires_grad:  # not FastKAN's fixed RBF grid
                p.copy_(torch.randn_like(p) * 0.3)
        for name, buf in module.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buf.normal_()


@pytest.mark.parametrize("norm_index", [0, 1], ids=["instance", "batch"])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("family", sorted(CONV_CLASSES))
def test_conv_layers_convert_with_equal_outputs(tck, family, dims, norm_index):
    module_name, cls_name = CONV_CLASSES[family]
    cls = getattr(getattr(tck[0], module_name), cls_name.format(dims))
    norm_class = NORMS[dims][norm_index]
    torch.manual_seed(0)
    ref = cls(4, 6, 3, degree=3, groups=2, padding=2, stride=2, dilation=2,
              norm_layer=norm_class, affine=True)
    _randomise(ref)
    ref.eval()
    ours = convert_torch_conv_kan(ref)
    assert isinstance(ours, (KANConv, KANBottleneckConv)) and not ours.training
    x = torch.randn((2, 4) + (7,) * dims)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


LINEAR_CASES = {  # class, constructor arguments (6 input features)
    "GRAMLayer": ("GRAMLayer", (6, 4)), "KALNLayer": ("KALNLayer", (6, 4)),
    "ChebyKANLayer": ("ChebyKANLayer", (6, 4, 3)), "JacobiKANLayer": ("JacobiKANLayer", (6, 4, 3)),
    "KANLayer": ("KANLayer", (6, 4)), "ReLUKANLayer": ("ReLUKANLayer", (6, 2, 2, 4)),
    "FastKANLayer": ("FastKANLayer", (6, 4, -1.5, 2.5, 6)),
    "FastKANLayer-no-base": ("FastKANLayer", (6, 4, -2.0, 2.0, 8, False)),
    "BottleNeckGRAMLayer": ("BottleNeckGRAMLayer", (6, 4)),  # inner width 4
    "BottleNeckGRAMLayer-wide": ("BottleNeckGRAMLayer", (6, 20, 3, nn.SiLU, 2, 4)),  # inner 10
    "GRAMLayer-gelu": ("GRAMLayer", (6, 4, 2, nn.GELU)),  # mlp_kagn's activation
    "BottleNeckGRAMLayer-relu": ("BottleNeckGRAMLayer", (6, 4, 2, nn.ReLU)),
    "KALNLayer-gelu": ("KALNLayer", (6, 4, 3, nn.GELU)),  # mlp_kaln's
}


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_linear_layers_convert_with_equal_outputs(tck, case):
    cls_name, args = LINEAR_CASES[case]
    torch.manual_seed(0)
    ref = getattr(tck[1], cls_name)(*args)
    _randomise(ref)
    ref.eval()
    ours = convert_torch_conv_kan(ref)
    assert isinstance(ours, KANLinear)
    x = torch.randn(5, 6)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_linear_layer_activations_ours_lacks_are_refused(tck):
    """An act our Gram basis cannot apply names the layer and the activation."""
    with pytest.raises(ValueError, match="GRAMLayer: activation Tanh is not supported"):
        convert_torch_conv_kan(tck[1].GRAMLayer(6, 4, 3, act=nn.Tanh))


def test_unsupported_class_is_named():
    with pytest.raises(ValueError, match=r"Conv2d: no conversion; covered .*KAGNConvNDLayer"):
        convert_torch_conv_kan(nn.Conv2d(2, 2, 3))


@pytest.mark.parametrize("family", sorted(CONV_CLASSES))
def test_default_constructed_conv_layers_convert(tck, family):
    """torch-conv-kan's defaults (instance norm without affine, no groups) in train mode."""
    module_name, cls_name = CONV_CLASSES[family]
    ref = getattr(getattr(tck[0], module_name), cls_name.format(2))(3, 5, 3, padding=1)
    _randomise(ref)
    ours = convert_torch_conv_kan(ref)
    assert ours.training and not ours.norm.affine
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("module_name, cls_name", [("fast_kan_conv", "FastKANConv{}DLayer"),
                                                   ("kan_conv", "KANConv{}DLayer"),
                                                   ("relukan_conv", "ReLUKANConv{}DLayer")])
def test_spline_conv_layers_convert(tck, module_name, cls_name, dims):
    cls = getattr(getattr(tck[0], module_name), cls_name.format(dims))
    torch.manual_seed(0)
    ref = cls(4, 6, 3, groups=2, padding=2, stride=2, dilation=2)
    _randomise(ref)
    if cls_name.startswith("KAN"):
        with torch.no_grad():  # one slope for every group (ours has one PReLU per layer)
            for prelu in ref.prelus:
                prelu.weight.fill_(0.2)
    ref.eval()
    ours = convert_torch_conv_kan(ref)
    x = torch.randn((2, 4) + (7,) * dims)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_unequal_group_slopes_are_refused(tck):
    ref = tck[0].kan_conv.KANConv2DLayer(4, 6, 3, groups=2)
    with torch.no_grad():
        ref.prelus[1].weight.fill_(0.5)
    with pytest.raises(ValueError, match="PReLU slopes differ"):
        convert_torch_conv_kan(ref)


@pytest.mark.parametrize("cls_name", ["KAGN", "BottleNeckKAGN", "KALN", "KACN", "KAJN", "KAN",
                                      "FastKAN", "ReLUKAN"])
def test_kan_networks_convert(tck, cls_name):
    """torch-conv-kan's KAN MLPs (dropout between layers, L1 wrappers) layer by layer."""
    torch.manual_seed(0)
    kwargs = {"dropout": 0.1, "l1_decay": 0.01} if cls_name == "KAGN" else {}
    ref = getattr(tck[1], cls_name)([6, 8, 4], **kwargs)
    _randomise(ref)
    ref.eval()
    ours = convert_torch_conv_kan(ref).eval()
    assert sum(isinstance(m, KANLinear) for m in ours.modules()) == 2
    x = torch.randn(5, 6)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- VGGs
@pytest.fixture(scope="module")
def tck_vggkan():
    """torch-conv-kan's ``models.vggkan``."""
    return import_reference_models("vggkan")[0]


VGG_CASES = {  # class, constructor options (beyond 3 inputs, 5 classes, pooled to 1x1)
    "kagn-groups-l1": ("VGGKAGN", dict(vgg_type="VGG11", groups=2, degree=2, affine=True,
                                       dropout=0.1, l1_decay=0.01, dropout_linear=0.1)),
    "kagn-bn-sa-batch": ("VGGKAGN_BN", dict(vgg_type="VGG11sa", degree=2, affine=True,
                                            norm_layer=nn.BatchNorm2d, last_attention=True,
                                            sa_inner_projection=2, head_type="Matryoshka")),
    "kaln-batch-vgg-head": ("VGGKALN", dict(vgg_type="VGG11", groups=2, degree=2,
                                            norm_layer=nn.BatchNorm2d, head_type="VGG")),
    "kagn-no-head": ("VGGKAGN", dict(vgg_type="VGG11v2", degree=1, head_type=None)),
    # KAN heads: GELU KAN linear layers (mlp_kagn / mlp_kaln), our head_activation="gelu"
    "kagn-kan-head": ("VGGKAGN", dict(vgg_type="VGG11", degree=2, head_type="KAN",
                                      dropout_linear=0.1, l1_decay=0.01)),
    "kaln-hidden-kan-head": ("VGGKALN", dict(vgg_type="VGG11", degree=2, head_type="HiddenKAN")),
    "kagn-bn-kantryoshka-head": ("VGGKAGN_BN", dict(vgg_type="VGG11", degree=1,
                                                    head_type="KANtryoshka", dropout_linear=0)),
}


@pytest.mark.parametrize("case", sorted(VGG_CASES))
def test_vggs_convert_with_equal_outputs(tck_vggkan, case):
    """torch-conv-kan VGG instances -> our vgg_kan: equal eval-mode outputs (logits, Matryoshka
    logits, or features without a head), options read off the instance."""
    cls_name, options = VGG_CASES[case]
    torch.manual_seed(0)
    ref = getattr(tck_vggkan, cls_name)(3, 5, expected_feature_shape=(1, 1), **options)
    _randomise(ref)
    ref.eval()
    ours = convert_torch_conv_kan(ref)
    assert isinstance(ours, VGGKAN) and not ours.training
    assert ours.family == ("kaln" if cls_name == "VGGKALN" else "kagn")
    assert sum(isinstance(m, KANSelfAttention) for m in ours.features) == (
        3 if options.get("last_attention") else 0)
    size = 64 if options["vgg_type"].endswith("v2") else 32  # 2x2 at the bottom
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_moe_vgg_with_a_kan_head_converts(tck_vggkan):
    """MoEVGGKAGN's head is a plain (GELU) KAN layer: ours leaves the ``moe_*`` options to the
    convs."""
    torch.manual_seed(0)
    ref = tck_vggkan.MoEVGGKAGN(3, 5, degree=1, vgg_type="VGG11", head_type="HiddenKAN",
                                expected_feature_shape=(1, 1), num_experts=2, k=1)
    _randomise(ref)
    ref.eval()
    ours = convert_torch_conv_kan(ref)
    assert ours.model_config["head_activation"] == "gelu"
    head = ours.classifier[1]
    assert isinstance(head, KANLinear) and isinstance(head.layer, KANConv)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x)[0], rtol=1e-4, atol=1e-4)


def test_vggs_of_other_convs_are_refused(tck_vggkan):
    ref = tck_vggkan.VGGKACN(3, 5, degree=2, expected_feature_shape=(1, 1))
    with pytest.raises(ValueError, match=r"VGGKACN: no conversion; .*VGGKAGN, VGGKAGN_BN"):
        convert_torch_conv_kan(ref)


# ----------------------------------------------------------------------------- U2KANets
@pytest.fixture(scope="module")
def tck_u2kanet():
    """torch-conv-kan's ``models.u2kanet``."""
    return import_reference_models("u2kanet")[0]


U2KANET_CASES = {  # builder, options (beyond 3 inputs, 2 classes, width_scale 1)
    "kagn-small-groups": ("u2kagnet_small", dict(degree=2, groups=2)),
    "kaln-small-batch": ("u2kalnet_small", dict(degree=2, norm_layer=nn.BatchNorm2d)),
    "kacn-small-l1": ("u2kacnet_small", dict(degree=2, l1_decay=0.01)),
    "kagn-bottleneck-full": ("u2kagnet_bn", dict(degree=1)),
    "kagn-bottleneck-small-1x1-first": ("u2kagnet_bn_small", dict(degree=1)),
}


@pytest.mark.parametrize("case", sorted(U2KANET_CASES))
def test_u2kanets_convert_with_equal_outputs(tck_u2kanet, case):
    """torch-conv-kan's U2KANet / U2KANetSmall -> our u2kanet / u2kanet_small: in eval mode
    ours returns the fused logits, its first output."""
    builder, options = U2KANET_CASES[case]
    torch.manual_seed(0)
    ref = getattr(tck_u2kanet, builder)(3, 2, **options)
    _randomise(ref)
    ref.eval()
    ours = convert_torch_conv_kan(ref)
    assert isinstance(ours, U2KANet) and not ours.training
    x = torch.randn(1, 3, 64, 64)  # 2x2 at the bottom of every RSU block
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x)[0], rtol=1e-4, atol=1e-4)


def test_u2kanet_training_outputs_are_its_side_outputs(tck_u2kanet):
    """In training both return the fused logits and the six side logits (deep supervision)."""
    torch.manual_seed(0)
    ref = tck_u2kanet.u2kagnet_small(3, 2, degree=1)
    _randomise(ref)
    ours = convert_torch_conv_kan(ref)
    assert ours.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outputs, expected = ours(x), ref(x)
    assert len(outputs) == len(expected) == 7
    for output, reference in zip(outputs, expected):
        torch.testing.assert_close(output, reference, rtol=1e-4, atol=1e-4)


def test_u2kagnet_bn_small_first_conv_is_a_1x1_bottleneck_conv(tck_u2kanet):
    """Its first conv is a 1x1 bottleneck conv squeezing by 4 (its others by 8): our
    ``first_kernel_size=1``."""
    ours = convert_torch_conv_kan(tck_u2kanet.u2kagnet_bn_small(3, 2, degree=1, width_scale=4))
    first = ours.encoder[0].conv_in
    assert ours.model_config["first_kernel_size"] == 1
    assert isinstance(first, KANBottleneckConv) and first.base_weight.shape[2:] == (1, 1)
    assert first.inner_channels == 16  # 64 / 4 (by 8: min(16, its 3 inputs) = 3)


@pytest.mark.parametrize("dims", [1, 2])
def test_u2kanet_first_kernel_size_option(dims):
    model = create_model("u2kanet_small", spatial_dims=dims, in_channels=2, out_channels=3,
                         width_scale=0.25, degree=1, bottleneck_convs=True, first_kernel_size=1)
    first = model.encoder[0].conv_in
    assert isinstance(first, KANBottleneckConv) and first.base_weight.shape[2:] == (1,) * dims
    size = (64,) * dims
    assert model.eval()(torch.randn((1, 2) + size)).shape == (1, 3) + size
    plain = create_model("u2kanet_small", width_scale=0.25, first_kernel_size=1)
    assert isinstance(plain.encoder[0].conv_in, KANConv)
    with pytest.raises(OptionError) as err:
        create_model("u2kanet_small", first_kernel_size=2)
    assert err.value.key == "first_kernel_size"


def test_u2kanets_ours_cannot_express_are_refused(tck_u2kanet):
    with pytest.raises(ValueError, match="U2KANetSmall: FastKANConv2DLayer: networks convert "
                                         "when built from polynomial KAN convs"):
        convert_torch_conv_kan(tck_u2kanet.fast_u2kanet_small(3, 2))
    with pytest.raises(ValueError, match="U2KANetSmall: groups=2 divides its 4 input channels"):
        convert_torch_conv_kan(tck_u2kanet.u2kagnet_small(4, 2, degree=1, groups=2))


def test_hub_wrappers_convert_their_network():
    """``AutoKAN`` (a huggingface-hub wrapper, not a module) converts its ``model``."""
    (automodel,) = import_reference_models("automodel")
    torch.manual_seed(0)
    wrapper = automodel.AutoKAN(model_name="u2kagnet", input_channels=3, num_classes=2, degree=1)
    _randomise(wrapper.model)
    wrapper.eval()
    ours = convert_torch_conv_kan(wrapper)
    assert isinstance(ours, U2KANet) and not ours.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), wrapper(x)[0], rtol=1e-4, atol=1e-4)
