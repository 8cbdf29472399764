"""MoE ResKANets: the ``moe_*`` options and stem options of ResKANet, the ``moe_reskanet*``
models, and parity with torch-conv-kan's MoEResKANet (instances and saved state dicts)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close

from kanseg.layers.auxiliary import collect_auxiliary_losses
from kanseg.layers.moe import MoEKANConv
from kanseg.models import (
    ResKANet, convert_torch_conv_kan, create_model, get_model_spec, load_torch_conv_kan,
)
from kanseg.models.reskanet import RESNET_LAYOUTS, reskanet_name
from kanseg.models.torch_conv_kan import CheckpointError
from conftest import import_reference_models
from test_moe import _randomise


@pytest.fixture(scope="module")
def tck_reskanet():
    """torch-conv-kan's ``models.reskanet``."""
    return import_reference_models("reskanet")[0]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- our models
def test_moe_reskanet_mixes_its_3x3_convs_and_reports_their_losses():
    """Every 3x3 conv of the blocks is a mixture, not the stem, the 1x1 convs or the head;
    the trainer's auxiliary losses are the mixtures' load-balancing losses."""
    model = create_model("moe_reskanet18", in_channels=3, num_classes=4, width=4,
                         family="kaln", degree=1, moe_experts=2).train()
    mixtures = [m for m in model.modules() if isinstance(m, MoEKANConv)]
    assert len(mixtures) == 16 and not isinstance(model.stem, MoEKANConv)
    assert isinstance(model.head[1], nn.Linear)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    losses = collect_auxiliary_losses(model, by_kind=True)
    assert_close(losses["load_balance"], sum(m.auxiliary_loss() for m in mixtures))
    model.eval()(torch.randn(1, 3, 32, 32))
    assert not collect_auxiliary_losses(model)


def test_stem_options_set_the_stem_and_feature_strides():
    model = create_model("reskanet18", in_channels=3, num_classes=0, width=4, stem_width=6,
                         stem_kernel_size=3, stem_stride=1, first_maxpool=False).eval()
    features = model.forward_features(torch.randn(1, 3, 32, 32))
    assert model.feature_strides == [1, 1, 2, 4, 8]
    assert [32 // f.shape[-1] for f in features] == model.feature_strides
    assert [f.shape[1] for f in features] == model.feature_channels == [6, 4, 8, 16, 32]


def test_reskanet_names_come_from_the_layouts_table():
    """Each layout of ``RESNET_LAYOUTS`` is registered under ``reskanet_name``'s name (plain
    and MoE); any other layout is named ``reskanet18``."""
    for depth, (layers, block) in RESNET_LAYOUTS.items():
        for moe in (False, True):
            name = reskanet_name(layers, block, moe)
            assert name == f"{'moe_' if moe else ''}reskanet{depth}"
            defaults = get_model_spec(name).defaults
            assert (defaults["layers"], defaults["block"]) == (layers, block)
            assert ("moe_experts" in defaults) == moe
    assert reskanet_name((1, 1, 1, 1), "basic", moe=True) == "moe_reskanet18"


# ----------------------------------------------------------------------------- parity
MOE_CASES = {  # block, layers, max-pool, experts, k, constructor options
    "basic": ("MoEKALNBasicBlock", [1, 2, 1, 1], True, 2, 2, dict(affine=True)),
    "bottleneck": ("MoEKALNBottleneck", [1, 1, 1, 1], False, 2, 2, dict(affine=True)),
    "bottleneck-top1": ("MoEKALNBottleneck", [1, 1, 1, 1], True, 3, 1, {}),
}


def _moe_reference(module, case: str, noisy_gating: bool = True) -> nn.Module:
    block, layers, maxpool, experts, k, options = MOE_CASES[case]
    torch.manual_seed(0)
    reference = module.MoEResKANet(
        getattr(module, block), layers, input_channels=3, num_classes=5, groups=2, degree=2,
        use_first_maxpool=maxpool, fcnv_kernel_size=3, fcnv_stride=1, fcnv_padding=1,
        num_experts=experts, k=k, noisy_gating=noisy_gating, **options)
    _randomise(reference)
    return reference


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_moe_reskanets_convert_with_equal_outputs(tck_reskanet, case):
    reference = _moe_reference(tck_reskanet, case).eval()
    ours = convert_torch_conv_kan(reference)
    assert isinstance(ours, ResKANet) and not ours.training
    config = ours.model_config
    assert config["name"].startswith("moe_reskanet") and config["style"] == "torch_conv_kan"
    assert (config["moe_experts"], config["moe_top_k"]) == MOE_CASES[case][3:5]
    assert _n_params(ours) == _n_params(reference)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert_close(ours(x), reference(x)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("noisy_gating", [False, True])
def test_moe_reskanet_training_loss_is_the_references(tck_reskanet, noisy_gating):
    """In training (same noise for the same seed) the summed auxiliary losses are the loss
    MoEResKANet returns (the mean over stages of their summed losses)."""
    reference = _moe_reference(tck_reskanet, "basic", noisy_gating).train()
    ours = convert_torch_conv_kan(reference)
    assert ours.training
    assert_trains_alike(reference, ours, torch.randn(4, 3, 32, 32))


def assert_trains_alike(reference: nn.Module, ours: nn.Module, x: torch.Tensor) -> None:
    """In training mode, with the same gating noise (same seed), the logits and the summed
    auxiliary losses of ``ours`` are the logits and the loss MoEResKANet ``reference``
    returns."""
    torch.manual_seed(3)
    logits, loss = reference(x)
    torch.manual_seed(3)
    assert_close(ours(x), logits, rtol=1e-4, atol=1e-4)
    assert_close(collect_auxiliary_losses(ours, by_kind=True)["load_balance"],
                 loss.reshape(()), rtol=1e-4, atol=1e-6)


def test_reskanet_with_a_3x3_stem_without_max_pool_converts(tck_reskanet):
    """torch-conv-kan's ``reskagnet_18x32p`` layout (3x3 stride-1 stem, no max-pool)."""
    torch.manual_seed(0)
    reference = tck_reskanet.ResKANet(
        tck_reskanet.KAGNBasicBlock, [1, 1, 1, 1], input_channels=3, num_classes=5, degree=2,
        use_first_maxpool=False, fcnv_kernel_size=3, fcnv_stride=1, fcnv_padding=1)
    _randomise(reference)
    reference.eval()
    ours = convert_torch_conv_kan(reference)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-4)


def test_moe_reskanet_hidden_layer_with_instance_norm_is_refused(tck_reskanet):
    """MoEResKANet's hidden KALN conv runs on the 1x1 pooled map: with its default instance
    norm the reference cannot run a forward, and ours refuses to build it."""
    module = tck_reskanet
    reference = module.MoEResKANet(module.MoEKALNBasicBlock, [1, 1, 1, 1], num_classes=5,
                                   degree=1, num_experts=2, hidden_layer_dim=8).eval()
    with pytest.raises(ValueError, match="spatial element"):
        reference(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="instance norm is undefined"):
        convert_torch_conv_kan(reference)


# ----------------------------------------------------------------------------- checkpoints
def test_moe_reskanet_state_dicts_load(tck_reskanet, tmp_path):
    """A MoEResKANet's state dict, as a checkpoint folder (safetensors + config.json) or a
    bare .pt file with ``config=``, loads with equal eval outputs."""
    reference = _moe_reference(tck_reskanet, "bottleneck-top1").eval()
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    config = {"input_channels": 3, "num_classes": 5, "groups": 2, "degree": 2,
              "num_experts": 3, "k": 1, "use_first_maxpool": True, "fcnv_stride": 1}
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(state, tmp_path / "weights.pt")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x)[0]
        for ours in (load_torch_conv_kan(tmp_path),
                     load_torch_conv_kan(tmp_path / "weights.pt", config=config)):
            assert isinstance(ours, ResKANet) and not ours.training
            assert ours.stages[0][0].body[1].top_k == 1
            assert_close(ours(x), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(CheckpointError, match="fcnv_stride"):
        load_torch_conv_kan(tmp_path / "weights.pt", config={"k": 1})


def test_plain_reskanet_state_dicts_load(tck_reskanet, tmp_path):
    torch.manual_seed(0)
    reference = tck_reskanet.ResKANet(tck_reskanet.BottleneckKAGNBottleneck, [1, 1, 1, 1],
                                      input_channels=3, num_classes=5, groups=2, degree=2,
                                      affine=True, norm_layer=nn.BatchNorm2d)
    _randomise(reference)
    reference.eval()
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    ours = load_torch_conv_kan(tmp_path / "weights.pt",
                               config={"fcnv_stride": 2, "use_first_maxpool": True})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-4)
