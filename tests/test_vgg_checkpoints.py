"""torch-conv-kan VGG checkpoint layouts through ``load_torch_conv_kan``: reference instances
saved as their checkpoint folders (state dict + ``config.json``) load with equal eval-mode
outputs (self-attention types, MoE VGGs, VGGKALN, L1 wrappers, VGG and Matryoshka heads), and
ours save back to their layout."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kanseg.layers.attention import KANSelfAttention
from kanseg.layers.moe import MoEKANConv
from kanseg.models import create_model, load_torch_conv_kan, save_torch_conv_kan
from kanseg.models.torch_conv_kan import CheckpointError, vgg_from_state_dict

from conftest import import_reference_models
from test_models_convert import _randomise

BASE = dict(input_channels=2, num_classes=5, degree=2, affine=True,
            expected_feature_shape=[1, 1], dropout_linear=0.25)
#: id -> (reference class, constructor arguments beyond BASE, norm_layer or None)
CASES = {
    "kagn-sa-last-attention-l1-grouped": ("VGGKAGN", dict(
        vgg_type="VGG11sa", last_attention=True, sa_inner_projection=2, l1_decay=1e-4,
        groups=2), None),
    "moe-kagn-bn-sa-last-attention": ("MoE_VGGKAGN_BN", dict(
        vgg_type="VGG11sa", last_attention=True, num_experts=2, k=2), None),
    "kaln-batch-norm-l1": ("VGGKALN", dict(vgg_type="VGG11", l1_decay=1e-4, groups=2),
                           nn.BatchNorm2d),
    "kagn-matryoshka-head": ("VGGKAGN", dict(vgg_type="VGG11", head_type="Matryoshka"), None),
    "kagn-vgg-head": ("VGGKAGN", dict(vgg_type="VGG11", head_type="VGG"), None),
}


@pytest.fixture(scope="module")
def vggkan() -> object:
    """torch-conv-kan's ``models.vggkan``."""
    return import_reference_models("vggkan")[0]


def _save_reference(reference: nn.Module, config: dict, folder: Path) -> Path:
    """``reference`` as a torch-conv-kan checkpoint folder: its state dict + ``config.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
              folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _logits(output: object, moe: bool) -> tuple[torch.Tensor, ...]:
    """The logits of a VGG's output as a tuple (MoE VGGs also return their loss)."""
    if moe:
        output = output[0]
    return output if isinstance(output, tuple) else (output,)


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_vgg_checkpoint_folders_load_with_equal_outputs(vggkan, tmp_path, case):
    cls_name, extra, norm_layer = CASES[case]
    config = {**BASE, **extra}
    torch.manual_seed(0)
    reference = getattr(vggkan, cls_name)(
        **config, **({"norm_layer": norm_layer} if norm_layer else {}))
    torch.manual_seed(1)
    _randomise(reference)
    reference.eval()
    ours = load_torch_conv_kan(_save_reference(reference, config, tmp_path / "ckpt"))
    assert not ours.training
    moe = "num_experts" in config
    assert any(isinstance(m, MoEKANConv) for m in ours.modules()) == moe
    if config["vgg_type"].endswith("sa"):
        assert sum(isinstance(m, KANSelfAttention) for m in ours.features) == 3
    x = torch.randn(2, 2, 32, 32)
    with torch.no_grad():
        theirs, mine = _logits(reference(x), moe), _logits(ours(x), False)
    assert len(mine) == len(theirs)
    diff = max((a - b).abs().max().item() for a, b in zip(mine, theirs))
    assert diff < 1e-4, diff


def test_matryoshka_head_saves_to_their_layout(vggkan, tmp_path):
    torch.manual_seed(0)
    ours = create_model("vgg_kan", in_channels=2, num_classes=5, head_type="Matryoshka",
                        expected_feature_shape=(1, 1), degree=2, affine=True).eval()
    _randomise(ours)
    folder = save_torch_conv_kan(ours, tmp_path / "out")
    state = load_file(folder / "model.safetensors")
    assert "classifier.3.nesting_classifier_0.weight" in state
    reference = vggkan.VGGKAGN(**json.loads((folder / "config.json").read_text())).eval()
    reference.load_state_dict(state, strict=True)
    x = torch.randn(1, 2, 32, 32)
    with torch.no_grad():
        for a, b in zip(ours(x), reference(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head_type", ["KAN", "HiddenKAN", "KANtryoshka"])
def test_kan_heads_are_refused_by_name(tmp_path, head_type):
    with pytest.raises(CheckpointError, match=f"head_type='{head_type}'"):
        vgg_from_state_dict({}, {**BASE, "vgg_type": "VGG11", "head_type": head_type})
    model = create_model("vgg_kan", num_classes=3, head_type=head_type,
                         expected_feature_shape=(1, 1))
    with pytest.raises(ValueError, match=f"head_type='{head_type}'"):
        save_torch_conv_kan(model, tmp_path / "out")
