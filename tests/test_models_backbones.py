"""2D backbones (VGG-KAN, ResKANet) and their segmentation-models-pytorch encoders."""
from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from kanseg.layers import KANBottleneckConv, KANConv
from kanseg.models import VGG_TYPES, create_model, list_models
from kanseg.models.vgg import vgg_layout

import kanseg.models.smp as kan_smp  # noqa: E402  (registers the encoders)


def test_vgg_layouts_follow_the_depth_and_version_rules():
    assert len(VGG_TYPES) == 16
    for vgg_type in VGG_TYPES:
        layout = vgg_layout(vgg_type)
        convs = [v for v in layout if v != "M"]
        depth = int(vgg_type[3:5])
        version = vgg_type[5:]
        pools = 4 if not version else 5
        assert layout.count("M") == pools
        # VGG-n has n - 3 convs in v1 (n minus the 3 fully connected layers), plus 2 in v2-v4
        assert len(convs) == depth - 3 + (2 if version else 0)
        assert convs[-1] == {"": 128, "v2": 128, "v3": 256, "v4": 256}[version]
    with pytest.raises(ValueError, match="vgg_type must be one of"):
        vgg_layout("VGG12")


@pytest.mark.parametrize("vgg_type", VGG_TYPES)
def test_every_vgg_type_builds_and_runs(vgg_type):
    model = create_model("vgg_kan", vgg_type=vgg_type, in_channels=1, num_classes=3, degree=1,
                         expected_feature_shape=(1, 1))
    x = torch.randn(1, 1, 64, 64)
    features = model.forward_features(x)
    assert len(features) == len(model.feature_channels) == vgg_layout(vgg_type).count("M") + 1
    for f, c, s in zip(features, model.feature_channels, model.feature_strides):
        assert f.shape == (1, c, 64 // s, 64 // s)
    assert model(x).shape == (1, 3)
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(1, 1, model.feature_strides[-1], 8))


@pytest.mark.parametrize("family,options", [("kagn", {"degree": 2}), ("kaln", {"degree": 1}),
                                            ("relukan", {})])
def test_vgg_bottleneck_layers_groups_and_heads(family, options):
    model = create_model("vgg_kan", family=family, bottleneck_convs=True, norm="batch", groups=2,
                         head_type="VGG", num_classes=4, expected_feature_shape=(2, 2),
                         **options)
    kan = [m for m in model.features if not isinstance(m, torch.nn.MaxPool2d)]
    assert all(isinstance(m, KANBottleneckConv) for m in kan)
    assert kan[0].groups == 1 and all(m.groups == 2 for m in kan[1:])
    assert kan[-1].inner_channels == 2 * 16  # torch-conv-kan rule: max(in, out)/8, floor 16
    assert model.classifier[0].in_features == 128 * 4
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    plain = create_model("vgg_kan", family=family, **options)
    assert all(isinstance(m, KANConv) for m in plain.features
               if not isinstance(m, torch.nn.MaxPool2d))
    headless = create_model("vgg_kan", head_type=None, **({"family": family} | options))
    assert headless.classifier is None
    assert headless(torch.randn(1, 3, 32, 32)).shape == (1, 128, 2, 2)


@pytest.mark.parametrize("name,channels", [("reskanet18", [4, 4, 8, 16, 32]),
                                           ("reskanet34", [4, 4, 8, 16, 32]),
                                           ("reskanet50", [4, 16, 32, 64, 128])])
def test_reskanet_depths(name, channels):
    model = create_model(name, width=4, num_classes=5, family="kacn", degree=1)
    blocks = sum(len(stage) for stage in model.stages)
    assert blocks == {"reskanet18": 8, "reskanet34": 16, "reskanet50": 16}[name]
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert [f.shape[1] for f in features] == channels == model.feature_channels
    assert [32 // f.shape[-1] for f in features] == model.feature_strides == [2, 4, 8, 16, 32]
    assert model(x).shape == (2, 5)
    with pytest.raises(ValueError, match="layers must list 4"):
        create_model(name, layers=(2, 2))


def test_every_named_resnet_and_densenet_variant_is_an_smp_encoder():
    expected = {f"kan-{name}" for name in list_models() if name != "densekanet"
                and name.startswith(("reskanet", "moe_reskanet", "densekanet"))}
    assert expected <= set(kan_smp.SMP_ENCODER_NAMES)
    assert {"kan-densekanet_tiny_moebn", "kan-moe_reskanet18", "kan-densekanet121_bn"} <= expected
    assert not any(name.startswith("kan-rdnet") for name in kan_smp.SMP_ENCODER_NAMES)


@pytest.mark.parametrize("encoder", ["kan-vgg11", "kan-vgg11v4", "kan-reskanet18",
                                     "kan-densekanet_tiny_moebn"])
def test_smp_unet_on_kan_encoders(encoder):
    assert encoder in kan_smp.SMP_ENCODER_NAMES
    model = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=1, classes=2,
                     decoder_channels=(8, 8, 8, 8, 8))
    x = torch.randn(1, 1, 64, 64)
    features = model.encoder(x)
    assert [f.shape[1] for f in features] == model.encoder.out_channels
    assert [64 // f.shape[-1] for f in features] == [1, 2, 4, 8, 16, 32]
    assert model(x).shape == (1, 2, 64, 64)


def test_smp_custom_registration_and_errors():
    kan_smp.register_smp_encoder("kan-test-kaln", "reskanet18", family="kaln", width=4, degree=1)
    model = smp.FPN(encoder_name="kan-test-kaln", encoder_weights=None, classes=3)
    assert model.encoder.backbone.stem.basis.family == "kaln"
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="dilated"):
        smp.DeepLabV3(encoder_name="kan-test-kaln", encoder_weights=None, classes=2)


def test_backbone_learns_a_tiny_classification_batch():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 32, 32)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])  # memorise 8 random images
    model = create_model("vgg_kan", in_channels=1, num_classes=2, degree=2, dropout_linear=0.0,
                         expected_feature_shape=(2, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    first = F.cross_entropy(model(x), y).item()
    for _ in range(10):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    assert F.cross_entropy(model(x), y).item() < 0.5 * first
