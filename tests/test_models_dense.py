"""DenseKANet, ResKANet 101/152 and RDNet: builds, layer counts, registry / smp reachability,
and conversion of torch-conv-kan's own networks with equal eval-mode outputs."""
from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from kanseg.layers import KANBottleneckConv, KANConv
from kanseg.models import convert_torch_conv_kan, create_model, list_models
from kanseg.models import smp as kan_smp
from kanseg.models.densekanet import DENSE_LAYOUTS, DenseKANet
from kanseg.models.rdnet import RDNET_VARIANTS, RDNet
from kanseg.models.reskanet import ResKANet

from conftest import import_reference_models
from test_models_convert import _randomise

SMALL = dict(growth_rate=4, num_init_features=8, bn_size=2, degree=1)


def _kan_convs(model: nn.Module) -> list[nn.Module]:
    """Top-level KAN convs (not the core conv inside a bottleneck conv)."""
    found = [m for m in model.modules() if isinstance(m, (KANConv, KANBottleneckConv))]
    inner = {id(m.core) for m in found if isinstance(m, KANBottleneckConv)}
    return [m for m in found if id(m) not in inner]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def tck_models() -> dict:
    """torch-conv-kan's ``models.densekanet`` and ``models.reskanet`` (by module name)."""
    names = ("densekanet", "reskanet")
    return dict(zip(names, import_reference_models(*names)))


# ----------------------------------------------------------------------------- DenseKANet
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_densekanet_builds_in_every_dimension(dims):
    model = create_model("densekanet", spatial_dims=dims, in_channels=2, num_classes=3,
                         block_config=(2, 1, 1), family="kaln", **SMALL).eval()
    x = torch.randn((2, 2) + (32,) * dims)
    features = model.forward_features(x)
    assert [f.shape[1] for f in features] == model.feature_channels == [8, 16, 12, 10]
    assert [32 // f.shape[-1] for f in features] == model.feature_strides == [2, 4, 8, 16]
    assert model(x).shape == (2, 3)
    assert create_model("densekanet", spatial_dims=dims, num_classes=0, block_config=(1,),
                        **SMALL)(torch.randn((1, 3) + (8,) * dims)).shape == (1, 12)


@pytest.mark.parametrize("depth", ["121", "161", "169", "201"])
def test_densekanet_depth_counts_its_layers(depth):
    """DenseNet-N has N weighted layers: the stem, two KAN convs per dense layer, the three
    transition convs and the classifier."""
    growth, blocks = DENSE_LAYOUTS[depth]
    with torch.device("meta"):
        model = create_model(f"densekanet{depth}", num_classes=10)
    transitions = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(_kan_convs(model)) == 1 + 2 * sum(blocks)
    assert 1 + 2 * sum(blocks) + len(transitions) + len(linears) == int(depth)
    assert model.num_features == {"121": 1024, "161": 2204, "169": 1664, "201": 1920}[depth]
    assert {m.out_channels for m in _kan_convs(model)[2::2]} == {growth}


def test_densekanet_tiny_and_bn_variants():
    tiny = create_model("densekanet_tiny", in_channels=1, num_classes=4, block_config=(1, 1, 1),
                        **SMALL).eval()
    assert tiny.pool is None and len(tiny.transitions) == 3
    assert type(tiny.classifier[1]).__name__ == "KANLinear"
    assert tiny(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    bn = create_model("densekanet121_bn", num_classes=4, block_config=(1, 1), **SMALL)
    convs = _kan_convs(bn)
    assert all(isinstance(m, KANBottleneckConv) for m in convs)
    assert all(isinstance(m.norm, nn.BatchNorm2d) for m in convs)


def test_densekanet_classifier_api_and_errors():
    model = create_model("densekanet", num_classes=3, block_config=(1, 1), **SMALL)
    assert model.get_classifier() is model.classifier
    model.reset_classifier(7)
    assert model.get_classifier()[1].out_features == 7
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, model.num_features)
    with pytest.raises(ValueError, match="block_config"):
        create_model("densekanet", block_config=(2, 0))
    with pytest.raises(ValueError, match="growth_rate"):
        create_model("densekanet", growth_rate=0)
    with pytest.raises(ValueError, match="too small"):
        create_model("densekanet", block_config=(1, 1), **SMALL)(torch.randn(1, 3, 8, 8))


def test_densekanet_memory_efficient_gradients_match():
    torch.manual_seed(0)
    plain = create_model("densekanet", num_classes=2, block_config=(2, 1), norm="batch", **SMALL)
    lean = create_model("densekanet", num_classes=2, block_config=(2, 1), norm="batch",
                        memory_efficient=True, **SMALL)
    lean.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for model in (plain, lean):
        model(x).square().sum().backward()
        grads.append(model.stem.basis_weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_registry_smp_and_config_reach_the_new_models():
    names = {"densekanet", "densekanet_tiny", "densekanet121_bn", "densekanet201",
             "reskanet101", "reskanet152", "rdnet", "rdnet_tiny", "rdnet_large"}
    assert names <= set(list_models())
    assert {"kan-densekanet121", "kan-densekanet_tiny", "kan-reskanet101"} <= set(
        kan_smp.SMP_ENCODER_NAMES)
    kan_smp.register_smp_encoder("kan-test-dense", "densekanet", block_config=(1, 1, 1, 1),
                                 **SMALL)
    model = smp.Unet(encoder_name="kan-test-dense", encoder_weights=None, in_channels=1,
                     classes=2, decoder_channels=(8, 8, 8, 8, 8))
    x = torch.randn(1, 1, 64, 64)
    features = model.encoder(x)
    assert [f.shape[1] for f in features] == model.encoder.out_channels
    assert [64 // f.shape[-1] for f in features] == [1, 2, 4, 8, 16, 32]
    assert model(x).shape == (1, 2, 64, 64)


def test_densekanet_config_round_trip(tmp_path):
    """Options reach the model through its saved config.json (what configs build from)."""
    from kanseg.models import load_model, save_model

    model = create_model("densekanet", spatial_dims=3, in_channels=1, num_classes=2,
                         block_config=(1, 1), head_type="KAN", family="kacn", **SMALL).eval()
    loaded = load_model(save_model(model, tmp_path / "dense"))
    assert loaded.model_config["head_type"] == "KAN" and loaded.model_config["family"] == "kacn"
    x = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(loaded(x), model(x))


# ----------------------------------------------------------------------------- ResKANet
@pytest.mark.parametrize("depth, stage_blocks", [(101, (3, 4, 23, 3)), (152, (3, 8, 36, 3))])
def test_reskanet_101_152_count_their_layers(depth, stage_blocks):
    with torch.device("meta"):
        model = create_model(f"reskanet{depth}", num_classes=10)
    assert tuple(len(stage) for stage in model.stages) == stage_blocks
    body = sum(len(block.body) for stage in model.stages for block in stage)
    assert 1 + body + 1 == depth  # stem, three convs per bottleneck block, classifier
    assert model.feature_channels[-1] == 2048


def test_reskanet_reference_style_and_heads():
    model = create_model("reskanet18", width=4, num_classes=3, style="torch_conv_kan",
                         head_type="HiddenKAN", degree=1).eval()
    block = model.stages[1][0]
    assert [conv.kernel_size for conv in block.body] == [(3, 3), (1, 1)]
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    with pytest.raises(ValueError, match="style"):
        create_model("reskanet18", style="timm")


# ----------------------------------------------------------------------------- RDNet
@pytest.mark.parametrize("dims, reference_depthwise", [(1, False), (2, True), (3, False)])
def test_rdnet_builds_in_every_dimension(dims, reference_depthwise):
    model = create_model("rdnet", spatial_dims=dims, in_channels=1, num_classes=3,
                         num_init_features=16, growth_rates=(8, 8, 16), num_blocks=(1, 2, 1),
                         downsample=(False, True, False), ese=(False, True, True), degree=1,
                         reference_depthwise=reference_depthwise).eval()
    x = torch.randn((2, 1) + (16,) * dims)
    features = model.forward_features(x)
    assert [f.shape[1] for f in features] == model.feature_channels == [24, 24]
    assert [16 // f.shape[-1] for f in features] == model.feature_strides == [4, 8]
    assert model(x).shape == (2, 3)


def test_rdnet_variants_and_errors():
    with torch.device("meta"):
        tiny = create_model("rdnet_tiny", num_classes=10)
    assert len(tiny.stages) == len(RDNET_VARIANTS["tiny"]["growth_rates"]) == 7
    assert tiny.feature_strides == [4, 8, 16, 32]
    with pytest.raises(ValueError, match="num_blocks"):
        create_model("rdnet", num_blocks=(1, 2))
    with pytest.raises(ValueError, match="norm"):
        create_model("rdnet", norm="batch")


def test_degree_major_depthwise_matches_its_definition():
    """Output channel g of torch-conv-kan's depthwise V2 conv reads stacked channels
    g*n .. g*n+n-1 of the degree-major basis stack (written out here with a loop)."""
    from kanseg.models.rdnet import DegreeMajorDepthwiseConv

    torch.manual_seed(0)
    conv = DegreeMajorDepthwiseConv("kagn", 2, 4, 3, 1, degree=2)
    x = torch.randn(2, 4, 5, 5)
    basis = conv.basis(x)  # (B, C, n, H, W)
    n = conv.basis.n_basis
    expected = []
    for g in range(4):
        out = F.conv2d(F.silu(x[:, g:g + 1]), conv.base_weight[g:g + 1], padding=1)
        for j in range(n):
            d, c = divmod(g * n + j, 4)
            out = out + F.conv2d(basis[:, c:c + 1, d], conv.basis_weight[g:g + 1, j:j + 1],
                                 padding=1)
        expected.append(out)
    torch.testing.assert_close(conv(x), torch.cat(expected, 1))


# ----------------------------------------------------------------------------- parity
def _check_parity(reference: nn.Module, shape: tuple[int, ...],
                  dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(1)
    _randomise(reference)
    reference.eval()
    ours = convert_torch_conv_kan(reference)
    assert not ours.training
    x = torch.randn(shape, dtype=dtype)
    reference.to(dtype), ours.to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-4)
    return ours


@pytest.mark.parametrize("block, norm, maxpool", [
    ("_KAGNDenseBlock", nn.InstanceNorm2d, True),
    ("_BottleNeckKAGNDenseBlock", nn.BatchNorm2d, False),
    ("_KALNDenseBlock", nn.InstanceNorm2d, False), ("_KACNDenseBlock", nn.BatchNorm2d, True)])
def test_densekanet_converts_with_equal_outputs(tck_models, block, norm, maxpool):
    module = tck_models["densekanet"]
    torch.manual_seed(0)
    reference = module.DenseKANet(getattr(module, block), input_channels=3, num_classes=5,
                                  growth_rate=4, block_config=(2, 1, 1, 1), num_init_features=8,
                                  bn_size=2, degree=2, groups=2, affine=True, norm_layer=norm,
                                  use_first_maxpool=maxpool, dropout_linear=0.1)
    ours = _check_parity(reference, (2, 3, 64, 64) if maxpool else (2, 3, 32, 32))
    assert isinstance(ours, DenseKANet) and ours.model_config["name"] == "densekanet"
    assert _n_params(ours) == _n_params(reference)


def test_tiny_densekanet_converts_with_equal_outputs(tck_models):
    module = tck_models["densekanet"]
    torch.manual_seed(0)
    reference = module.TinyDenseKANet(module._KAGNDenseBlock, input_channels=3, num_classes=5,
                                      growth_rate=4, block_config=(1, 2, 1), num_init_features=8,
                                      bn_size=2, degree=2, affine=True,
                                      norm_layer=nn.InstanceNorm2d, memory_efficient=True)
    ours = _check_parity(reference, (2, 3, 32, 32))
    assert ours.classifier[1].layer.basis.family == "kagn"
    assert _n_params(ours) == _n_params(reference)


@pytest.mark.parametrize("builder, name", [
    ("densekagnet121", "densekanet121"), ("densekagnet161", "densekanet161"),
    ("densekagnet169", "densekanet169"), ("densekagnet201", "densekanet201"),
    ("densekagnet121bn", "densekanet121_bn"), ("tiny_densekagnet", "densekanet_tiny"),
    ("tiny_densekagnet_bn", "densekanet_tiny_bn")])
def test_named_densekanets_have_the_reference_parameter_count(tck_models, builder, name):
    """Counted on the meta device, heads included (the tiny BN head is a BottleNeckKAGN)."""
    with torch.device("meta"):
        reference = getattr(tck_models["densekanet"], builder)(3, 10)
        ours = create_model(name, num_classes=10)
    assert _n_params(ours) == _n_params(reference)


@pytest.mark.parametrize("builder, name", [("reskagnet101", "reskanet101"),
                                           ("reskagnet152", "reskanet152")])
def test_reskanet_101_152_have_the_reference_parameter_count(tck_models, builder, name):
    with torch.device("meta"):
        reference = getattr(tck_models["reskanet"], builder)(3, 10)
        ours = create_model(name, num_classes=10, width=8, norm="instance",
                            style="torch_conv_kan")
    assert _n_params(ours) == _n_params(reference)


@pytest.mark.parametrize("block, norm, layers", [
    ("KAGNBasicBlock", nn.InstanceNorm2d, [1, 2, 1, 1]),
    ("KAGNBottleneck", nn.InstanceNorm2d, [1, 1, 1, 1]),
    ("BottleneckKAGNBottleneck", nn.BatchNorm2d, [1, 1, 1, 1]),
    ("KALNBasicBlock", nn.InstanceNorm2d, [1, 1, 1, 1])])
def test_reskanet_converts_with_equal_outputs(tck_models, block, norm, layers):
    """Instance norm needs 2x2 maps at stride 32 (64x64 inputs); batch norm does with 32x32."""
    module = tck_models["reskanet"]
    torch.manual_seed(0)
    reference = module.ResKANet(getattr(module, block), layers, input_channels=3,
                                num_classes=5, groups=2, degree=2, affine=True,
                                norm_layer=norm, dropout_linear=0.1)
    size = 64 if norm is nn.InstanceNorm2d else 32
    ours = _check_parity(reference, (2, 3, size, size))
    assert isinstance(ours, ResKANet) and ours.model_config["style"] == "torch_conv_kan"
    assert _n_params(ours) == _n_params(reference)


def test_kaln_reskanet_stem_norm_converts_as_stem_options(tck_models):
    """torch-conv-kan's KALN ResKANet keeps an instance-norm stem whatever ``norm_layer``:
    ours gets ``stem_options`` (parity: ``tests/test_reskanet_convert.py``)."""
    module = tck_models["reskanet"]
    reference = module.ResKANet(module.KALNBasicBlock, [1, 1, 1, 1], num_classes=5,
                                degree=1, norm_layer=nn.BatchNorm2d)
    ours = convert_torch_conv_kan(reference)
    # (without ``affine``, torch's defaults: an affine batch norm, a plain instance norm)
    assert ours.model_config["stem_options"] == {"norm": "instance", "affine": False}
    assert ours.model_config["norm"] == "batch"


def test_rdnet_converts_with_equal_outputs():
    pytest.importorskip("timm")
    (module,) = import_reference_models("kan_rdnet")
    torch.manual_seed(0)
    reference = module.KAGNRDNet(num_init_features=16, growth_rates=(8, 8, 16),
                                 num_blocks_list=(1, 2, 1),
                                 is_downsample_block=(None, True, False),
                                 block_type=["Block", "BlockESE", "BlockESE"], in_chans=3,
                                 num_classes=5, drop_rate=0.1)
    ours = _check_parity(reference, (2, 3, 32, 32))
    assert isinstance(ours, RDNet)
    assert _n_params(ours) == _n_params(reference)


@pytest.mark.slow
@pytest.mark.parametrize("package, builder", [("reskanet", "reskagnet101"),
                                              ("reskanet", "reskagnet152"),
                                              ("densekanet", "densekagnet121"),
                                              ("densekanet", "densekagnet121bn")])
def test_full_depth_networks_convert_with_equal_outputs(tck_models, package, builder):
    """In float64: with random weights and running statistics, 100+ layers in eval mode grow
    activations to ~1e6, where float32 rounding alone differs by more than 1e-4."""
    torch.manual_seed(0)
    reference = getattr(tck_models[package], builder)(3, 10)
    _check_parity(reference, (1, 3, 64, 64), torch.float64)
