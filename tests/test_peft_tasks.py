"""kanpeft tasks and CLI end to end on tiny data: torch-conv-kan backbone folder -> finetune ->
adapter -> merge -> torch-conv-kan folder again."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import kanpeft
from kanpeft.cli import main
from kanpeft.config import FinetuneConfig, load_config
from kanpeft.data import classification_split
from kanpeft.tasks import build_task, finetune, merge_adapter
from kanseg.models import create_model
from kanseg.models.torch_conv_kan import load_torch_conv_kan, save_torch_conv_kan
from kanseg.schema import ConfigError


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """A small VGG-KAGN saved in torch-conv-kan's checkpoint format."""
    torch.manual_seed(0)
    model = create_model("vgg_kan", in_channels=1, num_classes=3, family="kagn", vgg_type="VGG11",
                         expected_feature_shape=(1, 1), norm="instance", degree=2)
    return save_torch_conv_kan(model, tmp_path_factory.mktemp("backbone") / "vgg")


def write_npz(path: Path, n: int = 16) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        labels = rng.integers(0, 2, size=(n, 1))
        images = rng.integers(0, 120, size=(n, 28, 28)) + 100 * labels[:, :, None]
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    np.savez(path, **arrays)
    return path


def classification_config(backbone: Path, data: Path, out: Path, method: str, **options) -> dict:
    return {"task": "classification", "backbone": str(backbone), "num_classes": 2,
            "peft": {"method": method, "options": options},
            "classification": {"path": str(data), "image_size": 32, "batch_size": 8},
            "trainer": {"max_epochs": 1, "lr": 0.01, "monitor": "auc", "log_every": 1},
            "output_dir": str(out)}


def test_finetune_merge_round_trip(backbone, tmp_path):
    data = write_npz(tmp_path / "data.npz")
    raw = classification_config(backbone, data, tmp_path / "run", "basis", degrees=[1],
                                extra_degrees=1)
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(raw))
    assert main(["finetune", "--config", str(tmp_path / "ft.yaml")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= results["test_accuracy"] <= 1 and 0 < results["ratio"] < 1
    adapter = tmp_path / "run" / "adapter"
    assert kanpeft.adapter_method(adapter) == "basis"

    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    merged = load_torch_conv_kan(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["degree"] == 3
    cfg = load_config(tmp_path / "ft.yaml")
    prepared = kanpeft.load_adapter(build_task(cfg)[0], adapter).eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), prepared(x), atol=1e-4, rtol=1e-4)

    # the adapter records its base: the same architecture with other weights is refused
    torch.manual_seed(1)
    other = save_torch_conv_kan(create_model(
        "vgg_kan", in_channels=1, num_classes=3, family="kagn", vgg_type="VGG11",
        expected_feature_shape=(1, 1), norm="instance", degree=2), tmp_path / "other")
    merge = ["merge", "--adapter", str(adapter), "--backbone", str(other), "--output"]
    assert main([*merge, str(tmp_path / "refused")]) == 1
    assert not (tmp_path / "refused").exists()
    assert main([*merge, str(tmp_path / "forced"), "--force"]) == 0


def test_methods_command_lists_counts(backbone, capsys):
    assert main(["methods", "--backbone", str(backbone), "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"full", "head", "basis", "scales", "lora"}
    assert rows["full"]["ratio"] == 1.0
    assert rows["head"]["trainable"] < rows["scales"]["trainable"] < rows["lora"]["trainable"]
    assert rows["head"]["trainable"] == 128 * 2 + 2


def test_image_folder_dataset(tmp_path):
    for split in ("train", "val"):
        for label, name in enumerate(["normal", "pneumonia"]):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((20, 20), 50 + 100 * label, np.uint8)).save(folder / f"{i}.png")
    cfg = FinetuneConfig().classification
    cfg.path, cfg.image_size = str(tmp_path), 32
    ds = classification_split(cfg, "train")
    assert ds.tensors[0].shape == (6, 1, 32, 32)
    assert ds.tensors[1].tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.allclose(ds.tensors[0][3:].mean(), torch.tensor(150 / 255))
    assert classification_split(cfg, "test") is None
    cfg.max_train = 4  # a random subset, not the first (sorted) images
    assert set(classification_split(cfg, "train").tensors[1].tolist()) == {0, 1}


def test_segmentation_finetune(backbone, tmp_path):
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    for i in range(5):
        mask = np.zeros((32, 32), np.uint8)
        r, c = rng.integers(4, 16, size=2)
        mask[r: r + 12, c: c + 12] = 255
        image = (mask // 2 + rng.integers(0, 60, size=(32, 32))).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "data" / "images" / f"case{i}.png")
        Image.fromarray(mask).save(tmp_path / "data" / "masks" / f"case{i}.png")
    config_file = Path(__file__).resolve().parents[1] / "configs" / "peft_cxr_lung.yaml"
    raw = yaml.safe_load(config_file.read_text())
    raw["backbone"] = str(backbone)
    raw["peft"] = {"method": "lora", "options": {"r": 2}}
    data = raw["segmentation"]["data"]
    data.update(root=str(tmp_path / "data"), spacing=None, patch_size=[32, 32], batch_size=2)
    raw["trainer"].update(max_epochs=1)
    raw["output_dir"] = str(tmp_path / "run")
    cfg = load_config_from(raw, tmp_path)
    results = finetune(cfg)
    assert 0 <= results["val_dice_mean"] <= 1
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert "decoder" in config["modules_to_save"]
    merge_adapter(tmp_path / "run" / "adapter", tmp_path / "merged")
    state = load_file(str(tmp_path / "merged" / "model.safetensors"))
    model = build_task(cfg)[0]
    model.load_state_dict(state)  # a plain U-Net of the original classes: no LoRA keys left
    prepared = kanpeft.load_adapter(build_task(cfg)[0], tmp_path / "run" / "adapter").eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), prepared(x), atol=1e-4, rtol=1e-4)


def load_config_from(raw: dict, tmp_path: Path) -> FinetuneConfig:
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    return load_config(tmp_path / "cfg.yaml")


def test_config_errors_name_the_key(tmp_path):
    (tmp_path / "bad.yaml").write_text("task: classification\npeft: {method: dora}\n")
    with pytest.raises(ConfigError, match="method must be one of"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="classification.bogus"):
        load_config(tmp_path / "bad.yaml", ["peft.method=lora", "classification.bogus=1"])
    assert main(["finetune", "--config", str(tmp_path / "missing.yaml")]) == 1


def test_merge_of_a_missing_adapter_folder_says_so(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["merge", "--adapter", str(missing), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"adapter folder {missing} does not exist" in err and "--backbone" not in err
