"""Segmentation networks (UKANet, U2KANet), blocks and the model registry."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kanseg.models import (
    count_parameters, create_model, get_model_spec, list_models, register_model,
)
from kanseg.models.blocks import ConvFactory, KANResBlock, RSUBlock, crop_to, pad_to_multiple

REQUIRED = {"ukanet", "u2kanet", "u2kanet_small", "vgg_kan", "reskanet18", "reskanet34",
            "reskanet50"}


def test_registry_names_and_errors():
    assert REQUIRED <= set(list_models())
    with pytest.raises(ValueError, match="unknown model 'unet'.*ukanet"):
        create_model("unet")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['widht'\]"):
        create_model("ukanet", widht=8)
    # options of another family are rejected for this family
    with pytest.raises(ValueError, match="grid_size"):
        create_model("ukanet", family="kagn", grid_size=4)
    with pytest.raises(ValueError, match="spatial_dims"):
        create_model("ukanet", spatial_dims=4)
    with pytest.raises(ValueError, match="family must be one of"):
        create_model("ukanet", family="nope")


@pytest.mark.parametrize("name, kwargs, key, unknown", [
    ("nonet", {}, "name", False),
    ("ukanet", {"widht": 8}, "widht", True),
    ("ukanet", {"spatial_dims": 4}, "spatial_dims", False),
    ("ukanet", {"family": "nope"}, "family", False),
    ("ukanet", {"depth": 0}, "depth", False),
    ("ukanet", {"kan_levels": [9]}, "kan_levels", False),
    ("ukanet", {"norm": "bogus"}, "norm", False),
    ("ukanet", {"degree": -1}, "degree", False),
    ("ukanet", {"family": "kan", "grid_size": 0}, "grid_size", False),
    ("u2kanet", {"variant": "huge"}, "variant", False),
    ("ukanet", {"conv_strategy": "fast"}, "conv_strategy", False),
    ("vgg_kan", {"vgg_type": "VGG12"}, "vgg_type", False),
    ("reskanet18", {"style": "keras"}, "style", False),
    ("reskanet18", {"width": 0}, "width", False),
    ("reskanet18", {"width_scale": 0.001}, "width_scale", False),
    ("reskanet18", {"width_per_group": 32}, "width_per_group", False),
    ("reskanet50", {"width_per_group": 0}, "width_per_group", False),
    ("reskanet18", {"replace_stride_with_dilation": [True]}, "replace_stride_with_dilation",
     False),
    ("reskanet18", {"pointwise_options": {"grid": 3}}, "pointwise_options", False),
    ("reskanet18", {"pointwise_options": {"family": "kan"}, "degree": 2}, "pointwise_options",
     False),
    ("reskanet18", {"stem_options": {"family": "nope"}}, "stem_options", False),
    ("reskanet18", {"hidden_dim": 8, "norm": "instance"}, "hidden_dim", False),
    ("densekanet", {"growth_rate": 0}, "growth_rate", False),
    ("rdnet", {"downsample": [True] * 7}, "downsample", False),
    ("rdnet", {"norm": "batch"}, "norm", True),
    ("ukanet", {"width": 2, "width_scale": 0.1}, "width", False),
    ("ukanet", {"activation": "tanhh"}, "activation", False),
    ("ukanet", {"base_activation": "tanhh"}, "base_activation", False),
    ("vgg_kan", {"bottleneck": True, "bottleneck_convs": True}, "bottleneck_convs", False),
    ("segresnet", {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "width": 3},
     "width", False),
])
def test_registry_errors_carry_the_offending_key(name, kwargs, key, unknown):
    """Configs report ``model.<key>`` from the error's ``key``, not from its message."""
    from kanseg.layers import OptionError, UnknownOptionError

    with pytest.raises(OptionError) as err, torch.device("meta"):
        create_model(name, **kwargs)
    assert err.value.key == key
    assert isinstance(err.value, UnknownOptionError) == unknown


def test_register_model_decorator():
    @register_model("test_tiny_linear", dims=(1,), task="classification", out_features=3)
    def tiny(in_features: int = 2, out_features: int = 1) -> torch.nn.Module:
        """A linear layer (test model)."""
        return torch.nn.Linear(in_features, out_features)

    model = create_model("test_tiny_linear", in_features=5)
    assert model.out_features == 3 and model.model_config == {
        "name": "test_tiny_linear", "in_features": 5, "out_features": 3}
    assert get_model_spec("test_tiny_linear").description == "A linear layer (test model)."
    with pytest.raises(ValueError, match="already registered"):
        register_model("test_tiny_linear", tiny)
    with pytest.raises(ValueError, match="bias"):
        create_model("test_tiny_linear", bias=False)


#: small layouts of the networks whose ``bottleneck`` option is now ``bottleneck_convs``, and a
#: value unlike its default
RENAMED_BOTTLENECK = [
    ("vgg_kan", dict(num_classes=3, degree=1), True),
    ("densekanet", dict(num_classes=3, block_config=(1, 1), growth_rate=4, num_init_features=8,
                        bn_size=2, degree=1), True),
    ("rdnet", dict(num_classes=3, num_init_features=8, growth_rates=(8, 8), num_blocks=(1, 1),
                   downsample=(False, True), degree=1), False),
]


@pytest.mark.parametrize("name, options, value", RENAMED_BOTTLENECK)
def test_bottleneck_is_a_deprecated_name_of_bottleneck_convs(name, options, value):
    """The old model option builds the same network, with a DeprecationWarning, and is recorded
    under its new name; giving both names is an OptionError for ``bottleneck_convs``."""
    from kanseg.layers import KANBottleneckConv, OptionError
    from kanseg.models import get_model_spec, resolved_config

    def shapes(model: torch.nn.Module) -> dict:
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    with torch.device("meta"):
        new = create_model(name, bottleneck_convs=value, **options)
        with pytest.warns(DeprecationWarning,
                          match="model option bottleneck is deprecated; use bottleneck_convs"):
            old = create_model(name, bottleneck=value, **options)
        with pytest.warns(DeprecationWarning, match="model option bottleneck is deprecated"):
            direct = get_model_spec(name).builder(bottleneck=value, **options)
        default = create_model(name, **options)
    assert shapes(old) == shapes(new) == shapes(direct) != shapes(default)
    assert any(isinstance(m, KANBottleneckConv) for m in new.modules()) == value
    assert old.model_config == new.model_config  # saved under the new name
    resolved = resolved_config(old)
    assert "bottleneck" not in resolved and resolved["bottleneck_convs"] == value
    with pytest.raises(OptionError, match="bottleneck and bottleneck_convs are the same") as err:
        create_model(name, bottleneck=value, bottleneck_convs=value, **options)
    assert err.value.key == "bottleneck_convs"


def test_the_old_name_overrides_a_registered_default_of_the_new_one():
    """``densekanet_tiny_bn`` registers ``bottleneck_convs=True``: ``bottleneck=False`` from a
    user is that option, not a second one."""
    with pytest.warns(DeprecationWarning), torch.device("meta"):
        model = create_model("densekanet_tiny_bn", bottleneck=False, num_classes=3)
    assert model.model_config["bottleneck_convs"] is False
    assert "bottleneck" not in model.model_config


def test_count_parameters_matches_a_real_build():
    kwargs = dict(spatial_dims=2, in_channels=1, out_channels=2, depth=2, width=4)
    model = create_model("ukanet", **kwargs)
    assert count_parameters("ukanet", **kwargs) == sum(p.numel() for p in model.parameters())


def test_pad_and_crop_roundtrip():
    x = torch.randn(1, 2, 5, 8, 3)
    padded, size = pad_to_multiple(x, 4)
    assert padded.shape[2:] == (8, 8, 4)
    assert torch.equal(crop_to(padded, size), x)
    assert padded[:, :, 5:].abs().sum() == 0


def _reference_basic_block(block: KANResBlock, x: torch.Tensor) -> torch.Tensor:
    first, second = block.body
    return F.silu(second(first(x)) + block.shortcut(x))


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_residual_block_shapes_and_identity_shortcut(spatial_dims):
    conv = ConvFactory("kagn", spatial_dims, "instance", options={"degree": 2})
    x = torch.randn(2, 4, *([6] * spatial_dims))
    same = KANResBlock(conv, 4, 4)
    assert isinstance(same.shortcut, torch.nn.Identity)
    torch.testing.assert_close(same(x), _reference_basic_block(same, x))
    down = KANResBlock(conv, 4, 8, stride=2, kind="bottleneck")
    assert down(x).shape == (2, 8, *([3] * spatial_dims))
    assert [m.kernel_size for m in down.body] == [(1,) * spatial_dims, (3,) * spatial_dims,
                                                   (1,) * spatial_dims]


@pytest.mark.parametrize("dilated", [False, True])
def test_rsu_block_shapes(dilated):
    conv = ConvFactory("kagn", 2, "instance", options={"degree": 1})
    block = RSUBlock(conv, 3, 2, 4, height=4, dilated=dilated)
    x = torch.randn(1, 3, 13, 10)
    assert block(x).shape == (1, 4, 13, 10)
    # residual: output = U-part + input conv
    assert len(block.encoder) == 3 and len(block.decoder) == 3


@pytest.mark.parametrize("family,options", [("kagn", {"degree": 2}), ("kaln", {"degree": 1}),
                                            ("fastkan", {"grid_size": 3}),
                                            ("wavkan", {"wavelet": "mexican_hat"})])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_ukanet_shapes_odd_sizes(family, options, spatial_dims):
    size = (9, 7, 6)[:spatial_dims]
    model = create_model("ukanet", spatial_dims=spatial_dims, in_channels=2, out_channels=3,
                         family=family, depth=2, width=4, **options)
    assert model(torch.randn(1, 2, *size)).shape == (1, 3, *size)


@pytest.mark.parametrize("name", ["ukanet", "u2kanet_small"])
def test_segmentation_networks_in_1d(name):
    size = {"depth": 2, "width": 4} if name == "ukanet" else {"width_scale": 0.125}
    model = create_model(name, spatial_dims=1, in_channels=2, out_channels=3, degree=1, **size)
    assert model(torch.randn(2, 2, 37)).shape == (2, 3, 37)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_ukanet_deep_supervision_train_and_eval(spatial_dims):
    size = (10, 12, 9)[:spatial_dims]
    model = create_model("ukanet", spatial_dims=spatial_dims, in_channels=1, out_channels=2,
                         depth=3, width=2, deep_supervision=True, supervision_levels=3,
                         block="bottleneck", plain_stem=True, bottleneck_convs=True,
                         degree=1)
    outputs = model(torch.randn(2, 1, *size))
    assert isinstance(outputs, list) and len(outputs) == 3
    for level, out in enumerate(outputs):
        assert out.shape == (2, 2, *[-(-s // 2**level) for s in size])
    model.eval()
    assert model(torch.randn(2, 1, *size)).shape == (2, 2, *size)


def test_ukanet_stem_stride_and_blocks_per_stage():
    model = create_model("ukanet", spatial_dims=3, in_channels=1, out_channels=2, depth=2,
                         width=4, stem_stride=2, blocks_per_stage=2, degree=1,
                         deep_supervision=True, supervision_levels=2)
    outputs = model(torch.randn(1, 1, 7, 8, 9))
    assert [tuple(o.shape[2:]) for o in outputs] == [(7, 8, 9), (2, 2, 3)]
    assert model.heads[0].stride == (2, 2, 2)
    assert len(model.encoder[0]) == 2


def test_ukanet_errors():
    with pytest.raises(ValueError, match="block must be one of"):
        create_model("ukanet", block="dense")
    with pytest.raises(ValueError, match="supervision_levels"):
        create_model("ukanet", depth=2, deep_supervision=True, supervision_levels=3)
    model = create_model("ukanet", spatial_dims=2, depth=2, width=2, degree=1)
    with pytest.raises(ValueError, match="expects input"):
        model(torch.randn(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(1, 1, 4, 3))


@pytest.mark.parametrize("name", ["u2kanet", "u2kanet_small"])
@pytest.mark.parametrize("spatial_dims,size", [(2, (40, 35)), (3, (33, 9, 8))])
def test_u2kanet_shapes(name, spatial_dims, size):
    model = create_model(name, spatial_dims=spatial_dims, in_channels=2, out_channels=3,
                         width_scale=1 / 16, family="kacn", degree=1, deep_supervision=True)
    outputs = model(torch.randn(1, 2, *size))
    assert len(outputs) == 7 and all(o.shape == (1, 3, *size) for o in outputs)
    model.eval()
    assert model(torch.randn(1, 2, *size)).shape == (1, 3, *size)


def test_u2kanet_variants_differ_and_validate():
    assert count_parameters("u2kanet", spatial_dims=2) > 10 * count_parameters(
        "u2kanet_small", spatial_dims=2)
    assert get_model_spec("u2kanet_small").defaults["variant"] == "small"
    with pytest.raises(ValueError, match="variant"):
        create_model("u2kanet", variant="medium")


@pytest.mark.parametrize("name,kwargs", [
    ("ukanet", dict(spatial_dims=3, depth=2, width=4, deep_supervision=True,
                    supervision_levels=2)),
    ("u2kanet_small", dict(spatial_dims=2, width_scale=1 / 8, deep_supervision=True)),
])
def test_few_steps_reduce_loss(name, kwargs):
    """A real learning check: fit a tiny synthetic segmentation batch."""
    torch.manual_seed(0)
    spatial = (8, 8, 8) if kwargs["spatial_dims"] == 3 else (40, 40)
    x = torch.randn(2, 1, *spatial)
    target = (x > 0.3).long().squeeze(1)
    model = create_model(name, in_channels=1, out_channels=2, degree=2, **kwargs)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_fn():
        out = model(x)
        return F.cross_entropy(out[0] if isinstance(out, list) else out, target)

    first = loss_fn().item()
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
    assert loss_fn().item() < 0.7 * first


def test_every_layer_option_reaches_kan_networks():
    """The registry takes the layer core's own option list (conv_strategy included)."""
    from kanseg.layers import LAYER_OPTIONS, KANConv
    from kanseg.models.registry import accepted_arguments

    assert set(LAYER_OPTIONS) <= accepted_arguments("ukanet")
    model = create_model("ukanet", spatial_dims=2, in_channels=1, out_channels=2, width=8,
                         depth=2, conv_strategy="dense")
    strategies = {m.conv_strategy for m in model.modules() if isinstance(m, KANConv)}
    assert strategies == {"dense"}


@pytest.mark.parametrize("name, dims, kwargs", [
    ("ukanet", 2, {"width": 8, "depth": 2}), ("ukanet", 3, {"width": 8, "depth": 1}),
    ("u2kanet", 2, {"variant": "small", "width_scale": 0.5}),
    ("reskanet18", 2, {"width": 8})])
def test_groups_reach_the_kan_convs(name, dims, kwargs):
    """``groups`` groups every KAN conv it divides; the stem from 1 image channel stays whole."""
    from kanseg.layers import KANConv

    args = dict(spatial_dims=dims, in_channels=1) if name != "reskanet18" else dict(in_channels=1)
    args["out_channels" if name != "reskanet18" else "num_classes"] = 2
    grouped = create_model(name, groups=2, **args, **kwargs)
    plain = create_model(name, **args, **kwargs)
    layers = [m for m in grouped.modules() if isinstance(m, KANConv)]
    assert {m.groups for m in layers} == {1, 2}
    assert all(m.groups == 1 for m in layers if m.in_channels == 1)
    assert sum(p.numel() for p in grouped.parameters()) < sum(p.numel() for p in plain.parameters())
    x = torch.randn((1, 1) + (40,) * dims)
    assert grouped.eval()(x).shape[:2] == (1, 2)
    with pytest.raises(ValueError, match="groups"):
        create_model(name, groups=0, **args, **kwargs)


@pytest.mark.parametrize("head_type", ["KAN", "HiddenKAN"])
def test_vgg_kan_heads(head_type):
    """torch-conv-kan's KAN heads: a KAN linear layer of the network's family on the pooled
    features (HiddenKAN: to 512, then a linear layer)."""
    from kanseg.layers import KANLinear

    model = create_model("vgg_kan", in_channels=1, num_classes=5, family="kacn", degree=2,
                         head_type=head_type, expected_feature_shape=(1, 1), width_scale=1,
                         vgg_type="VGG11v2").eval()
    heads = [m for m in model.classifier.modules() if isinstance(m, KANLinear)]
    assert len(heads) == 1 and heads[0].layer.basis.family == "kacn"
    assert heads[0].out_features == (5 if head_type == "KAN" else 512)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)
