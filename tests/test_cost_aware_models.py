"""MONAI baselines in the registry, per-level KAN/plain blocks (``kan_levels``), and the
CPU-sized hippocampus config, each trained through the real ``kanseg train``."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from kanseg.cli import main
from kanseg.config import load_config
from kanseg.layers.conv import KANConv
from kanseg.models import create_model, list_models
from kanseg.models.baselines import BASELINES
from kanseg.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = REPO / "configs" / "msd_hippocampus.yaml"
# the smallest width each baseline accepts, to keep the one-step trainings fast
SMALL = {"monai_unet": 4, "segresnet": 8, "dynunet": 4, "swinunetr": 12}
# SwinUNETR's deepest level is 1/32: instance norm needs more than one voxel there
PATCH = {"monai_unet": 32, "segresnet": 32, "dynunet": 32, "swinunetr": 64}


def write_msd(root: Path, cases: int = 6, shape=(30, 36, 28)) -> Path:
    """A hippocampus-like Decathlon folder: 1-channel MRI, labels 0/1/2 in two blobs."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(cases):
        label = np.zeros(shape, np.uint8)
        c = [s // 2 + int(rng.integers(-3, 4)) for s in shape]
        label[c[0] - 4:c[0] + 4, c[1] - 8:c[1], c[2] - 3:c[2] + 3] = 1
        label[c[0] - 4:c[0] + 4, c[1]:c[1] + 8, c[2] - 3:c[2] + 3] = 2
        image = (100 * label + rng.normal(0, 20, shape)).astype(np.float32)
        name = f"hippocampus_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "Hippocampus", "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": cases, "training": training}))
    return root


def write_folder2d(root: Path, cases: int = 6, size: int = 40) -> Path:
    """images/*.png + masks/*.png (0/255) with a bright disc as foreground."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(cases):
        cy, cx = rng.integers(12, size - 12, 2)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < 64).astype(np.uint8) * 255
        image = np.clip(mask * 0.6 + rng.normal(60, 15, mask.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"case{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"case{i}.png")
    return root


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory) -> Path:
    return write_msd(tmp_path_factory.mktemp("msd"))


@pytest.fixture(scope="module")
def png_root(tmp_path_factory) -> Path:
    return write_folder2d(tmp_path_factory.mktemp("png"))


def config_2d(folder: Path, root: Path) -> Path:
    cfg = {
        "data": {"root": str(root), "layout": "folder2d", "spatial_dims": 2,
                 "label_mode": "classes", "labels": ["background", "fg"], "mask_threshold": 127,
                 "orientation": None, "crop_foreground": False, "intensity": "none",
                 "patch_size": [32, 32], "batch_size": 2, "num_workers": 0, "cache": "memory"},
        "model": {"name": "ukanet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
                  "family": "kagn", "degree": 2, "width": 4, "depth": 2},
        "loss": {"name": "dice_ce"},
        "trainer": {"max_epochs": 1, "log_every": 1},
        "inference": {"roi_size": [32, 32], "sw_batch_size": 2},
    }
    path = folder / "tiny2d.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_once(config: Path, run: Path, *overrides: str) -> list[dict]:
    args = ["train", "--config", str(config), "--run-dir", str(run)]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    return list(csv.DictReader(open(run / "metrics.csv")))


def test_baselines_are_registered_and_listed(capsys):
    assert set(BASELINES) <= set(list_models())
    assert main(["models", "--spatial-dims", "3"]) == 0
    out = capsys.readouterr().out
    for name in BASELINES:
        assert name in out


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("dims", [2, 3])
def test_baseline_builds_any_size(name, dims):
    net = create_model(name, spatial_dims=dims, in_channels=2, out_channels=3, width=SMALL[name])
    size = (37, 42, 34)[:dims]  # not a multiple of any stride: padded and cropped back
    assert net(torch.randn(1, 2, *size)).shape == (1, 3, *size)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n == "swinunetr" else n for n in BASELINES])
def test_baseline_trains_one_epoch_3d(name, tmp_path, msd_root):
    rows = train_once(HIPPOCAMPUS, tmp_path / name, f"data.root={msd_root}",
                      f"model.name={name}", f"model.width={SMALL[name]}",
                      "trainer.max_minutes=null", "trainer.schedule_horizon=epochs",
                      "trainer.max_epochs=1", "trainer.val_every=1",
                      "data.num_workers=0", f"data.patch_size={[PATCH[name]] * 3}",
                      "data.batch_size=2")
    assert rows and 0.0 <= float(rows[-1]["val_dice_mean"]) <= 1.0
    cfg = load_config(tmp_path / name / "config.yaml")
    assert cfg.model.name == name and "kan_levels" not in cfg.model.kwargs


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_trains_one_epoch_2d(name, tmp_path, png_root):
    rows = train_once(config_2d(tmp_path, png_root), tmp_path / name, f"model.name={name}",
                      f"model.width={SMALL[name]}", f"data.patch_size={[PATCH[name]] * 2}",
                      f"inference.roi_size={[PATCH[name]] * 2}")
    assert rows and float(rows[-1]["train_loss"]) > 0


def test_switching_model_drops_foreign_options_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="family.*kan_levels|kan_levels.*stem_stride"):
        cfg = load_config(HIPPOCAMPUS, ["model.name=segresnet"])
    assert cfg.model.name == "segresnet"
    assert set(cfg.model.kwargs) == {"spatial_dims", "in_channels", "out_channels", "width"}
    # an option set explicitly with --set is kept, and checked
    with pytest.raises(ConfigError, match="model.degree"):
        load_config(HIPPOCAMPUS, ["model.name=segresnet", "model.degree=3"])


def kan_convs_by_level(net) -> dict[str, bool]:
    """For each encoder/decoder stage, whether it holds any KAN conv."""
    stages = {f"encoder.{i}": m for i, m in enumerate(net.encoder)}
    stages |= {f"decoder.{i}": m for i, m in enumerate(net.decoder)}
    stages["stem"] = net.stem
    return {k: any(isinstance(x, KANConv) for x in m.modules()) for k, m in stages.items()}


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_kan_levels_choose_blocks_per_level(dims):
    net = create_model("ukanet", spatial_dims=dims, in_channels=1, out_channels=2, width=4,
                       depth=2, degree=2, kan_levels=[1, 2])
    assert kan_convs_by_level(net) == {"stem": False, "encoder.0": False, "decoder.0": False,
                                       "encoder.1": True, "decoder.1": True, "encoder.2": True}
    size = (20, 12, 12)[:dims]
    assert net(torch.randn(2, 1, *size)).shape == (2, 2, *size)
    plain = create_model("ukanet", spatial_dims=dims, in_channels=1, out_channels=2, width=4,
                         depth=2, kan_levels=[])
    assert not any(kan_convs_by_level(plain).values())
    every = create_model("ukanet", spatial_dims=dims, in_channels=1, out_channels=2, width=4,
                         depth=2)
    assert all(kan_convs_by_level(every).values())


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_u2kanet_kan_levels(dims):
    net = create_model("u2kanet_small", spatial_dims=dims, in_channels=1, out_channels=2,
                       width_scale=0.25, kan_levels=[5])
    has_kan = [any(isinstance(x, KANConv) for x in stage.modules()) for stage in net.encoder]
    assert has_kan == [False] * 5 + [True]
    assert not any(isinstance(x, KANConv) for x in net.decoder.modules())
    size = (64, 40, 36)[:dims]
    assert net(torch.randn(1, 1, *size)).shape == (1, 2, *size)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_full_resolution_refine_head_sees_the_image(dims):
    torch.manual_seed(0)
    net = create_model("ukanet", spatial_dims=dims, in_channels=2, out_channels=3, width=4,
                       depth=2, stem_stride=2, kan_levels=[2], refine_channels=5,
                       deep_supervision=True, supervision_levels=2)
    size = (20, 12, 14)[:dims]
    image = torch.randn(2, 2, *size)
    outputs = net(image)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, *size),
                                                 (2, 3, *[-(-s // 4) for s in size])]
    refine = net.heads[0]
    # the full-resolution block reads the upsampled features (5) and the 2 image channels
    assert refine.block[0].in_channels == 7 and refine.head.out_channels == 3
    outputs[0].sum().backward()
    assert refine.block[0].weight.grad[:, 5:].abs().sum() > 0  # the image slice is used
    net.eval()
    assert net(image).shape == (2, 3, *size)


@pytest.mark.parametrize("options", [{"refine_channels": 4, "stem_stride": 1},
                                     {"refine_channels": -1, "stem_stride": 2},
                                     {"refine_channels": True, "stem_stride": 2}])
def test_bad_refine_channels_names_the_key(options):
    with pytest.raises(ValueError, match="refine_channels"):
        create_model("ukanet", spatial_dims=2, in_channels=1, out_channels=2, width=4,
                     depth=2, **options)


@pytest.mark.parametrize("value", ["[4]", "[-1]", "[1,1]", "[a]", "3"])
def test_bad_kan_levels_names_the_key(value):
    with pytest.raises(ConfigError, match=r"model\.kan_levels"):
        load_config(HIPPOCAMPUS, [f"model.kan_levels={value}"])


def test_hippocampus_config_trains_on_decathlon_layout(tmp_path, msd_root):
    cfg = load_config(HIPPOCAMPUS)
    assert cfg.data.root == "../shared/data/hippocampus" and cfg.data.layout == "msd"
    assert cfg.model.kwargs["kan_levels"] and cfg.trainer.max_minutes == 10
    rows = train_once(HIPPOCAMPUS, tmp_path / "run", f"data.root={msd_root}",
                      "trainer.max_epochs=1", "trainer.val_every=1", "data.num_workers=0")
    assert {"val_dice_Anterior", "val_dice_Posterior"} <= set(rows[-1])
    assert float(rows[-1]["patches_per_s"]) > 0
