"""Adapter save / load, the HF peft workflow and training steps on small KAN classifiers."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import kanpeft
from kanpeft.methods.lora import kan_lora_config, load_kan_lora_config, lora_targets
from kanseg.layers import KANConv, create_kan_conv
from kanseg.models import create_model

METHOD_OPTIONS = {"basis": {"degrees": [2], "extra_degrees": 1}, "scales": {}, "lora": {"r": 2}}


def small_classifier(width: int = 6, bottleneck: bool = False, norm: str = "batch") -> nn.Module:
    """A tiny VGG-like KAGN classifier with a head called ``classifier``."""
    torch.manual_seed(0)
    conv = lambda i, o: create_kan_conv("kagn", 2, i, o, 3, padding=1, degree=3,  # noqa: E731
                                        bottleneck=bottleneck, norm=norm,
                                        dim_reduction=2.0, min_internal=3)
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(conv(1, width), nn.MaxPool2d(2), conv(width, width),
                                               nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    model.add_module("classifier", nn.Linear(width, 2))
    return model


def train_steps(model: nn.Module, steps: int = 3, size: int = 8) -> None:
    torch.manual_seed(2)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=0.05)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(4, 1, size, size), torch.randint(0, 2, (4,))
        loss = nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()


@pytest.mark.parametrize("method", ["basis", "scales", "lora"])
def test_training_moves_only_adapter_params(method):
    backbone = small_classifier()
    frozen = {n: p.detach().clone() for n, p in backbone.named_parameters()
              if not n.startswith("classifier")}
    prepared = kanpeft.prepare(backbone, method, trainable_modules=["classifier"],
                               **METHOD_OPTIONS[method])
    before = {n: p.detach().clone() for n, p in prepared.named_parameters()}
    train_steps(prepared)
    moved = {n for n, p in prepared.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in prepared.named_parameters() if p.requires_grad}
    assert moved and moved <= trainable
    assert any("classifier" in n for n in moved)
    for name, param in backbone.named_parameters():  # the wrapped original layers
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


@pytest.mark.parametrize("method", ["basis", "scales", "lora"])
def test_adapter_round_trip(method, tmp_path):
    pristine = small_classifier(bottleneck=True)
    prepared = kanpeft.prepare(copy.deepcopy(pristine), method, trainable_modules=["classifier"],
                               **METHOD_OPTIONS[method])
    train_steps(prepared)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        expected = prepared(x)
    kanpeft.save_adapter(prepared, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    adapter_bytes = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    model_bytes = sum(p.numel() * 4 for p in pristine.parameters())
    assert adapter_bytes < model_bytes
    assert kanpeft.adapter_method(tmp_path / "adapter") == method

    loaded = kanpeft.load_adapter(copy.deepcopy(pristine), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-6, rtol=1e-5)
        merged = kanpeft.merge(loaded).eval()
        torch.testing.assert_close(merged(x), expected, atol=1e-4, rtol=1e-4)

    with pytest.raises(ValueError, match="does not fit"):
        kanpeft.load_adapter(small_classifier(width=8, bottleneck=True), tmp_path / "adapter")
    other = copy.deepcopy(pristine)  # same architecture, another base
    with torch.no_grad():
        other.features[0].base_weight.add_(0.01)
    with pytest.raises(ValueError, match="trained on another base"):
        kanpeft.load_adapter(copy.deepcopy(other), tmp_path / "adapter")
    kanpeft.load_adapter(other, tmp_path / "adapter", force=True)


def test_hf_peft_workflow(tmp_path):
    """get_peft_model, save_pretrained, PeftModel.from_pretrained, set_adapter, merge_and_unload
    on a VGG-KAGN (plain peft freezes parameters, not BatchNorm statistics: InstanceNorm here)."""
    torch.manual_seed(0)
    pristine = create_model("vgg_kan", in_channels=1, num_classes=2, family="kagn",
                            vgg_type="VGG11", expected_feature_shape=(1, 1), norm="instance",
                            degree=2)
    targets = lora_targets(pristine)
    assert targets == [f"features.{i}" for i in (0, 2, 4, 5, 7, 8, 10, 11)]
    config = kan_lora_config(r=2, lora_alpha=4, target_modules=targets, modules_to_save=["classifier"])
    peft_model = get_peft_model(copy.deepcopy(pristine), config)
    train_steps(peft_model, steps=1, size=32)
    second = kan_lora_config(r=3, lora_alpha=3, target_modules=targets)
    peft_model.add_adapter("other", second)
    peft_model.set_adapter("other")
    train_steps(peft_model, steps=1, size=32)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out_other = peft_model(x)
        peft_model.set_adapter("default")
        out_default = peft_model(x)
    assert not torch.allclose(out_other, out_default)
    peft_model.save_pretrained(str(tmp_path))  # default at the root, "other" in a subfolder

    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), str(tmp_path),
                                       config=load_kan_lora_config(tmp_path)).eval()
    loaded.load_adapter(str(tmp_path / "other"), adapter_name="other")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out_default, atol=1e-6, rtol=1e-5)
        loaded.set_adapter("other")
        torch.testing.assert_close(loaded(x), out_other, atol=1e-6, rtol=1e-5)
        merged = loaded.merge_and_unload().eval()
        torch.testing.assert_close(merged(x), out_other, atol=1e-4, rtol=1e-4)
    assert type(merged.features[0]) is KANConv and type(merged) is type(pristine)


def test_trainable_report_counts():
    model = kanpeft.prepare(small_classifier(), "scales", trainable_modules=["classifier"])
    report = kanpeft.trainable_report(model, show=False)
    assert report.total == sum(p.numel() for p in model.parameters())
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.trainable == sum(t for _, t, _ in report.rows)
    assert 0 < report.ratio < 0.2
    assert "TOTAL" in str(report) and "features.0" in str(report)


def test_train_norm_with_lora():
    """Norms outside LoRA targets (bottleneck layers) train; norms inside are refused clearly."""
    prepared = kanpeft.prepare(small_classifier(bottleneck=True), "lora", r=2, train_norm=True)
    assert any(p.requires_grad for n, p in prepared.named_parameters() if ".norm." in n)
    with pytest.raises(ValueError, match="inside LoRA-wrapped"):
        kanpeft.prepare(small_classifier(), "lora", r=2, train_norm=True)
