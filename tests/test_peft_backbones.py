"""kanpeft on any kanseg backbone: a ResKANet and a 3D UKANet through prepare / one training
step / merge for every method; the head API; and the CLI on saved model and run folders."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import kanpeft
from kanpeft.backbones import load_backbone
from kanpeft.cli import main
from kanpeft.config import load_config
from kanpeft.models import segmentation_model
from kanpeft.tasks import build_task
from kanseg.models import ResKANet, create_model, load_model, save_model
from test_peft_tasks import write_npz

METHODS = {"basis": {"degrees": [1], "extra_degrees": 1}, "scales": {}, "lora": {"r": 2}}
ADAPTER_TOKENS = ("basis_delta", "extra_weight", "shape_delta", "base_scale", "basis_scale",
                  "degree_scale", "shift", "lora_A", "lora_B")
UKANET = {"name": "ukanet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "depth": 1,
          "width": 4, "degree": 2}


def reskanet() -> nn.Module:
    torch.manual_seed(0)
    return create_model("reskanet18", in_channels=1, num_classes=3, width=2, degree=2,
                        layers=(1, 1, 1, 1)).eval()


def ukanet() -> nn.Module:
    torch.manual_seed(0)
    config = dict(UKANET)
    return create_model(config.pop("name"), **config).eval()


NETWORKS = {"reskanet": (reskanet, (2, 1, 32, 32)), "ukanet3d": (ukanet, (1, 1, 8, 8, 8))}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_prepare_train_merge(network, method):
    build, shape = NETWORKS[network]
    pristine = build()
    torch.manual_seed(1)
    x = torch.randn(shape)
    with torch.no_grad():
        reference = pristine(x)
    prepared = kanpeft.prepare(copy.deepcopy(pristine), method, **METHODS[method])
    with torch.no_grad():
        assert (prepared.eval()(x) - reference).abs().max() <= 1e-5, "init equality"

    before = {**dict(prepared.named_parameters()), **dict(prepared.named_buffers())}
    before = {name: t.detach().clone() for name, t in before.items()}
    prepared.train()
    optimiser = torch.optim.SGD([p for p in prepared.parameters() if p.requires_grad], lr=0.5)
    out = prepared(x)
    out = out[0] if isinstance(out, list) else out
    (out.square().mean() + out.mean()).backward()
    optimiser.step()
    after = {**dict(prepared.named_parameters()), **dict(prepared.named_buffers())}
    moved = {name for name, t in after.items() if not torch.equal(t, before[name])}
    foreign = sorted(n for n in moved if not any(token in n for token in ADAPTER_TOKENS))
    assert moved and not foreign, f"changed: {sorted(moved)}; not adapter tensors: {foreign}"

    prepared.eval()
    with torch.no_grad():
        adapted = prepared(x)
        assert (adapted - reference).abs().max() > 1e-6
        merged = kanpeft.merge(prepared).eval()
        assert type(merged) is type(pristine)
        assert (merged(x) - adapted).abs().max() <= 1e-4, "merge equality"


def test_head_api():
    model = reskanet()
    assert model.get_classifier() is model.head
    assert model.get_classifier()[-1].out_features == 3
    model.reset_classifier(5)
    assert model.get_classifier() is model.head and model.head[-1].out_features == 5
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    model.reset_classifier(0)
    assert model.head is None and isinstance(model.get_classifier(), nn.Identity)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, model.feature_channels[-1])
    vgg = create_model("vgg_kan", in_channels=1, num_classes=2, vgg_type="VGG11",
                       expected_feature_shape=(1, 1), degree=2)
    vgg.reset_classifier(4)
    assert vgg.get_classifier() is vgg.classifier and vgg.classifier[-1].out_features == 4
    assert vgg(torch.randn(1, 1, 32, 32)).shape == (1, 4)


def test_unet_on_a_reskanet_encoder():
    """The smp U-Net path takes ResKANet's stride-2 first map (the input is prepended) and
    drops its head; the encoder is the pretrained backbone itself."""
    backbone = reskanet()
    unet, new = segmentation_model(backbone, 2, [8, 8, 4, 4], [32, 32])
    assert new == ["decoder", "segmentation_head"]
    assert unet.encoder.backbone is backbone and backbone.head is None
    assert unet.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 2, 32, 32)
    with pytest.raises(ValueError, match="divisible by 16"):
        segmentation_model(reskanet(), 2, [8, 8, 4, 4], [40, 40])


def test_cli_on_a_reskanet_model_folder(tmp_path, capsys):
    folder = save_model(reskanet(), tmp_path / "backbone")
    assert main(["methods", "--backbone", str(folder), "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["full"]["ratio"] == 1.0
    assert rows["head"]["trainable"] == 16 * 2 + 2  # the new 2-class head on 16 features
    assert 0 < rows["scales"]["trainable"] < rows["lora"]["trainable"] < rows["full"]["trainable"]

    raw = {"task": "classification", "backbone": str(folder), "num_classes": 2,
           "peft": {"method": "basis", "options": {"degrees": [0], "extra_degrees": 1}},
           "classification": {"path": str(write_npz(tmp_path / "data.npz")), "image_size": 32,
                              "batch_size": 8},
           "trainer": {"max_epochs": 1, "lr": 0.01, "monitor": "auc", "log_every": 1},
           "output_dir": str(tmp_path / "run")}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(raw))
    assert main(["finetune", "--config", str(tmp_path / "ft.yaml")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "basis" and 0 < results["ratio"] < 1
    adapter = tmp_path / "run" / "adapter"
    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")  # a kanseg model folder again, degree 2 + 1
    assert isinstance(merged, ResKANet) and merged.model_config["degree"] == 3
    prepared = kanpeft.load_adapter(build_task(load_config(tmp_path / "ft.yaml"))[0], adapter)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), prepared.eval()(x), atol=1e-4, rtol=1e-4)


def test_a_ukanet_run_folder_as_backbone(saved_run, tmp_path, capsys):
    run = saved_run({"data": {"root": str(tmp_path / "data"), "spatial_dims": 3,
                              "patch_size": [8, 8, 8]},
                     "model": dict(UKANET), "loss": {"name": "dice_bce"}})
    weights = load_file(str(run / "checkpoints" / "best" / "model.safetensors"))
    for path in (run / "checkpoints" / "best", run / "checkpoints" / "best" / "model.safetensors"):
        state = load_backbone(str(path)).state_dict()
        assert all(torch.equal(state[k], v) for k, v in weights.items())
    source = load_backbone(str(run))
    assert all(torch.equal(source.state_dict()[k], v) for k, v in weights.items())
    rebuilt, new = segmentation_model(source, 3, [], [8, 8, 8])
    assert new == ["heads.0"] and rebuilt.heads[0].out_channels == 3
    kept = {k: v for k, v in source.state_dict().items() if not k.startswith("heads.")}
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in kept.items())

    assert main(["methods", "--backbone", str(run), "--num-classes", "3", "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["head"]["trainable"] == 4 * 3 + 3  # the new 1x1x1 output conv
    assert all(rows[m]["trainable"] < rows["full"]["trainable"] for m in METHODS)


def test_bad_backbones_say_what_was_expected(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for source in (tmp_path / "missing", tmp_path / "empty"):
        assert main(["methods", "--backbone", str(source)]) == 1
        err = capsys.readouterr().err
        assert str(source) in err and "kanseg run folder" in err and "torch-conv-kan" in err
    save_model(ukanet(), tmp_path / "ukanet")
    raw = {"task": "classification", "backbone": str(tmp_path / "ukanet")}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="no classification head"):
        build_task(load_config(tmp_path / "ft.yaml"))
