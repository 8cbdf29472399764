"""RDNet's ``post_block_attention`` and ``stem_options`` (torch-conv-kan's KAGNRDNet option and
stem): build in every dimension, and the reference networks with them convert with equal
eval-mode outputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kanseg.layers.attention import KANSelfAttention
from kanseg.layers.errors import OptionError
from kanseg.models import convert_torch_conv_kan, create_model
from kanseg.models.rdnet import RDNet

from conftest import import_reference_models
from test_models_convert import _randomise

SMALL = dict(num_init_features=16, growth_rates=(8, 16, 16), num_blocks=(1, 2, 1),
             downsample=(False, True, False), ese=(False, True, True), degree=2)


def _attentions(model: nn.Module) -> list[KANSelfAttention]:
    return [m for m in model.modules() if isinstance(m, KANSelfAttention)]


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_post_block_attention_ends_every_stage(dims):
    torch.manual_seed(0)
    model = create_model("rdnet", spatial_dims=dims, in_channels=2, num_classes=3,
                         post_block_attention=True, attention_inner_scale=3, **SMALL)
    attentions = _attentions(model)
    assert [stage[-1] for stage in model.stages] == attentions
    assert [(a.channels, a.inner_proj.out_channels) for a in attentions] == [
        (24, 8), (40, 13), (32, 10)]  # int(channels / 3)
    x = torch.randn((2, 2) + (16,) * dims, requires_grad=True)
    model(x).sum().backward()  # recomputed attention bodies
    assert x.grad is not None and all(a.gamma.grad is not None for a in attentions)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 3)


def test_attention_inner_scale_must_be_positive():
    with pytest.raises(OptionError, match="attention_inner_scale") as err:
        create_model("rdnet", post_block_attention=True, attention_inner_scale=0, **SMALL)
    assert err.value.key == "attention_inner_scale"


def _reference(**options: object) -> nn.Module:
    """torch-conv-kan's ``KAGNRDNet`` (post-block attention unless ``options`` say otherwise),
    SMALL's layout in 2D."""
    pytest.importorskip("timm")
    (module,) = import_reference_models("kan_rdnet")
    layout = dict(num_init_features=SMALL["num_init_features"],
                  growth_rates=SMALL["growth_rates"], num_blocks_list=SMALL["num_blocks"],
                  is_downsample_block=(None, True, False),
                  block_type=["BlockESE" if e else "Block" for e in SMALL["ese"]])
    return module.KAGNRDNet(**{**layout, "in_chans": 3, "num_classes": 5,
                               "post_block_attention": True, **options})


def _converted_with_equal_outputs(reference: nn.Module) -> RDNet:
    """``reference`` with random weights, in eval mode, converted: ours has as many parameters
    and the same outputs within 1e-4."""
    torch.manual_seed(1)
    _randomise(reference)
    reference.eval()
    ours = convert_torch_conv_kan(reference)
    assert isinstance(ours, RDNet) and not ours.training
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for p in reference.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (ours(x) - reference(x)).abs().max().item()
    assert diff < 1e-4, diff
    return ours


@pytest.mark.parametrize("scale", [1, 3])
def test_rdnet_with_post_block_attention_converts_with_equal_outputs(scale):
    torch.manual_seed(0)
    reference = _reference(drop_rate=0.1, inner_projection_attention_scale=scale)
    ours = _converted_with_equal_outputs(reference)
    assert ours.model_config["post_block_attention"]
    assert ours.model_config["attention_inner_scale"] == scale
    assert len(_attentions(ours)) == 3


def test_rdnet_attention_layouts_we_cannot_build_are_refused():
    """An attention layer whose q/k/v are not 3x3 'same' ungrouped convs names itself."""
    reference = _reference()
    reference.dense_stages[1].proj_q.groups = 2
    with pytest.raises(ValueError, match="KAGNRDNet attention 0"):
        convert_torch_conv_kan(reference)


@pytest.mark.parametrize("body, stem_options", [
    (dict(is_bottleneck=False, degree=2, dropout=0.1),
     {"bottleneck_convs": True, "degree": 3, "dropout": 0.0}),
    (dict(is_bottleneck=True, degree=1), {"degree": 3}),
    (dict(is_bottleneck=False, degree=3), {"bottleneck_convs": True}),
], ids=["plain-degree-2-dropout", "bottleneck-degree-1", "plain-degree-3"])
def test_rdnet_stem_unlike_its_body_converts_to_stem_options(body, stem_options):
    """torch-conv-kan's stem is a degree-3 bottleneck KAGN conv without dropout whatever the
    body: ours gets ``stem_options`` for what differs."""
    torch.manual_seed(0)
    reference = _reference(**body)
    ours = _converted_with_equal_outputs(reference)
    assert ours.model_config["stem_options"] == stem_options


def test_stem_options_replace_the_network_options_of_the_stem():
    model = create_model("rdnet", spatial_dims=1, in_channels=2, num_classes=3,
                         bottleneck_convs=False,
                         stem_options={"bottleneck_convs": True, "degree": 1}, **SMALL)
    stem = model.stem[0]
    assert type(stem).__name__ == "KANBottleneckConv" and stem.basis.degree == 1
    assert {m.degree for m in model.stages.modules() if hasattr(m, "degree")} == {
        SMALL["degree"]}
    for bad, match in (({"wavelet": "morlet"}, r"\['wavelet'\] are no options of family 'kagn'"),
                       ([("degree", 1)], "must map KAN conv options")):
        with pytest.raises(OptionError, match=match) as err:
            create_model("rdnet", stem_options=bad, **SMALL)
        assert err.value.key == "stem_options"
