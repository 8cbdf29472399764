"""Config schema: every shipped config validates; bad keys, types and overrides are reported
with their dotted key path."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kanseg.config import config_to_dict, load_config, save_config
from kanseg.schema import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    if path.name.startswith("peft_"):  # kanpeft fine-tuning configs have their own schema
        from kanpeft.config import load_config as load_peft_config

        load_peft_config(path)
        return
    cfg = load_config(path)
    assert len(cfg.roi_size) == cfg.data.spatial_dims
    assert cfg.model.kwargs["spatial_dims"] == cfg.data.spatial_dims


def test_expected_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"brats3d.yaml", "demo3d.yaml", "msd_hippocampus.yaml", "msd_brain_tumour.yaml",
            "cxr_lung2d.yaml"} <= names


@pytest.fixture
def demo(tmp_path):
    return Path(__file__).resolve().parents[1] / "configs" / "demo3d.yaml"


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("override, message", [
    ("trainer.bogus=1", "unknown key 'trainer.bogus'; allowed keys in trainer:"),
    ("bogus.x=1", "unknown key 'bogus'; allowed top-level sections"),
    ("trainer.lr=fast", "trainer.lr: expected float, got 'fast'"),
    ("trainer.max_epochs=2.5", "trainer.max_epochs: expected int, got 2.5"),
    ("trainer.mixed_precision=fp8", "trainer.mixed_precision: expected one of 'no', 'bf16', 'fp16'"),
    ("data.augment.flip_prob=2", "flip_prob must be a probability"),
    ("data.patch_size=[32,32]", "patch_size must have 3 positive sizes"),
    ("model.wings=3", "unknown key 'model.wings'"),
    ("model.depth=0", "model.depth: depth must be >= 1"),
    ("model.name=nonet", "model.name: unknown model 'nonet'"),
    ("model.norm=bogus", "model.norm: norm must be one of"),
    ("model.kan_levels=[7]", "model.kan_levels: kan_levels must be distinct integers"),
    ("model.degree=-1", "model.degree: degree must be an integer >= 0"),
    ("model.conv_strategy=fast", "model.conv_strategy: conv_strategy must be one of"),
    ("model.width_scale=0.01", "model.width: width * width_scale must be >= 1"),
    ("loss.name=dice_ce", "labels are overlapping regions"),
    ("inference.roi_size=[8,8]", "inference.roi_size: expected 3 positive sizes"),
    ("trainer.ema=1.5", "ema must be a decay in (0, 1)"),
])
def test_errors_name_the_key(demo, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(demo, [override])
    assert message in str(err.value)
    assert str(demo) in str(err.value)


@pytest.mark.parametrize("override", ["trainer.lr", "=3", "trainer..lr=1", "trainer.lr=[1,"])
def test_bad_override_syntax(demo, override):
    with pytest.raises(ConfigError, match="--set"):
        load_config(demo, [override])


def test_override_into_a_scalar_is_rejected(demo):
    with pytest.raises(ConfigError, match=r"'trainer.lr' is [0-9.e-]+, not a section"):
        load_config(demo, ["trainer.lr.x=1"])


def test_overrides_are_yaml_values_and_roundtrip(demo, tmp_path):
    cfg = load_config(demo, ["trainer.max_epochs=3", "data.patch_size=[16, 16, 16]",
                             "trainer.ema=null", "trainer.max_minutes=1.5", "model.width=4",
                             "inference.tta_flips=true"])
    assert cfg.trainer.max_epochs == 3 and cfg.trainer.ema is None
    assert cfg.trainer.max_minutes == 1.5 and cfg.model.kwargs["width"] == 4
    assert cfg.data.patch_size == [16, 16, 16] and cfg.roi_size == [16, 16, 16]
    assert cfg.inference.tta_flips is True
    save_config(cfg, tmp_path / "resolved.yaml")
    saved = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert saved["model"]["name"] == "ukanet" and saved["model"]["width"] == 4
    assert config_to_dict(load_config(tmp_path / "resolved.yaml")) == config_to_dict(cfg)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(_write(tmp_path, "data: [1,\n"))
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_roi_defaults_to_patch_size(tmp_path):
    path = _write(tmp_path, "data: {patch_size: [32, 48, 40]}\nloss: {name: dice_bce}\n"
                            "model: {name: ukanet, spatial_dims: 3, width: 2, depth: 1}\n")
    assert load_config(path).roi_size == [32, 48, 40]


def test_scientific_notation_is_a_float_in_files_and_overrides(tmp_path, demo):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; float keys take it as the number."""
    text = demo.read_text().replace("weight_decay: 0.00001", "weight_decay: 1e-4")
    assert "weight_decay: 1e-4" in text
    cfg = load_config(_write(tmp_path, text), ["trainer.lr=3e-4"])
    assert cfg.trainer.lr == 3e-4 and cfg.trainer.weight_decay == 1e-4


def test_renamed_key_still_works_with_a_warning_and_is_saved_under_its_new_name(tmp_path, demo):
    """``loss.lambda_ce`` (it also weights the focal and BCE terms) is now ``lambda_voxel``."""
    with pytest.warns(FutureWarning, match=r"loss\.lambda_ce is deprecated; use loss\.lambda_voxel"):
        cfg = load_config(demo, ["loss.lambda_ce=0.25"])
    assert cfg.loss.lambda_voxel == 0.25
    save_config(cfg, tmp_path / "saved.yaml")
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())["loss"]
    assert saved["lambda_voxel"] == 0.25 and "lambda_ce" not in saved
    with pytest.raises(ConfigError, match=r"loss\.lambda_ce and loss\.lambda_voxel are the same"):
        load_config(demo, ["loss.lambda_ce=0.25", "loss.lambda_voxel=0.5"])


@pytest.mark.filterwarnings("ignore:model.name=densekanet. dropped:UserWarning")
def test_renamed_model_option_still_works_with_a_warning(tmp_path, demo):
    """``model.bottleneck`` (every KAN conv a bottleneck conv) is now ``bottleneck_convs``, and
    is saved under that name."""
    import torch

    dense = ["model.name=densekanet", "model.block_config=[1,1]", "model.growth_rate=4",
             "model.num_init_features=8", "model.bn_size=2"]
    with pytest.warns(DeprecationWarning,
                      match="model option bottleneck is deprecated; use bottleneck_convs"):
        cfg = load_config(demo, dense + ["model.bottleneck=true"])
    with torch.device("meta"):
        assert cfg.model.build().model_config["bottleneck_convs"] is True
    save_config(cfg, tmp_path / "saved.yaml")
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())["model"]
    assert saved["bottleneck_convs"] is True and "bottleneck" not in saved
    with pytest.raises(ConfigError, match=r"model\.bottleneck_convs: bottleneck and "
                                          r"bottleneck_convs are the same option"):
        load_config(demo, dense + ["model.bottleneck=true", "model.bottleneck_convs=true"])


def test_train_norm_needs_a_method_or_trainable_modules():
    from kanseg.config import PeftConfig, check_peft_config

    with pytest.raises(ConfigError, match=r"peft\.options\.train_norm: .*peft\.method.*"
                                          r"peft\.trainable"):
        check_peft_config(PeftConfig(options={"train_norm": True}))
    check_peft_config(PeftConfig(options={"train_norm": True}, trainable=["heads"]))
    check_peft_config(PeftConfig(options={"train_norm": False}))


def test_loss_weights_reach_the_voxelwise_term():
    """``lambda_voxel`` weights cross-entropy, BCE and focal: each loss equals its Dice term
    plus lambda_voxel x its voxel-wise term, computed here with MONAI's separate losses."""
    import torch
    from monai.losses import DiceLoss, FocalLoss

    from kanseg.engine.config import LossConfig
    from kanseg.engine.losses import build_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6)
    labels = torch.randint(0, 3, (2, 1, 6, 6))
    onehot = torch.nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
    dice = DiceLoss(softmax=True, to_onehot_y=True)(logits, labels)
    voxel = {
        "dice_ce": torch.nn.functional.cross_entropy(logits, labels[:, 0]),
        # MONAI's DiceFocalLoss uses the sigmoid focal term whatever the Dice activation
        "dice_focal": FocalLoss(to_onehot_y=True, gamma=2.0)(logits, labels),
    }
    for name, term in voxel.items():
        loss = build_loss(LossConfig(name=name, activation="softmax", lambda_voxel=0.3))
        torch.testing.assert_close(loss(logits, labels), dice + 0.3 * term)
    sigmoid_dice = DiceLoss(sigmoid=True)(logits, onehot)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, onehot)
    loss = build_loss(LossConfig(name="dice_bce", lambda_voxel=0.3), overlapping_labels=True)
    torch.testing.assert_close(loss(logits, onehot), sigmoid_dice + 0.3 * bce)


@pytest.mark.parametrize("file_loss, overrides, line", [
    ("  lambda_ce: 0.5\n", [],
     "config key loss.lambda_ce is deprecated; use loss.lambda_voxel"),
    ("", ["model.name=densekanet", "model.block_config=[1,1]", "model.growth_rate=4",
          "model.num_init_features=8", "model.bottleneck=true"],
     "model option bottleneck is deprecated; use bottleneck_convs"),
], ids=["config key", "model option"])
def test_cli_shows_a_deprecation_as_one_plain_line(tmp_path, demo, file_loss, overrides, line):
    import subprocess
    import sys

    text = demo.read_text()
    assert "loss:\n" in text
    config = _write(tmp_path, text.replace("loss:\n", "loss:\n" + file_loss, 1))
    sets = [arg for value in overrides for arg in ("--set", value)]
    result = subprocess.run(
        [sys.executable, "-m", "kanseg.cli", "train", "--config", str(config), "--run-dir",
         str(tmp_path / "run"), "--set", f"data.root={tmp_path / 'no_data'}", *sets],
        capture_output=True, text=True)
    assert result.returncode == 1
    assert f"kanseg: warning: {line}" in result.stderr.splitlines(), result.stderr
    assert not any(kind in result.stderr for kind in ("FutureWarning", "DeprecationWarning",
                                                       "Traceback"))
