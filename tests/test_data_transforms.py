"""MONAI pipelines: region conversion, 2D/3D train patches, intensity, inversion, loaders."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from kanseg.data import (
    DataConfig,
    LabelsToRegionsd,
    build_loaders,
    build_transforms,
    load_cases,
    prediction_inverter,
    split_cases,
)
from kanseg.data.layouts import BRATS_REGIONS
from kanseg.data.synth import write_case
from kanseg.schema import from_dict


def make_cfg(**data) -> DataConfig:
    return from_dict(DataConfig, data, "data")


def hand_regions(label: np.ndarray, et: int) -> np.ndarray:
    """TC = NCR + ET, WT = NCR + ED + ET, ET = ET, written voxel by voxel."""
    out = np.zeros((3,) + label.shape, np.float32)
    for idx, v in np.ndenumerate(label):
        out[0][idx] = v in (1, et)
        out[1][idx] = v in (1, 2, et)
        out[2][idx] = v == et
    return out


@pytest.mark.parametrize("layout,et", [("brats2021", 4), ("brats2023", 3)])
def test_brats_regions_match_hand_computed_masks(layout, et):
    label = np.random.default_rng(0).choice([0, 1, 2, et], size=(1, 5, 4, 3)).astype(np.float32)
    label[0, 0, 0, 0] = 0
    regions = BRATS_REGIONS[layout]
    out = LabelsToRegionsd("label", list(regions.values()))({"label": MetaTensor(label)})["label"]
    assert isinstance(out, MetaTensor)
    assert np.array_equal(out.numpy(), hand_regions(label[0], et))
    # a 2021 map read with 2023 regions must not call label 4 ET
    if layout == "brats2023":
        legacy = LabelsToRegionsd("label", list(regions.values()))(
            {"label": torch.full((1, 2, 2), 4.0)})["label"]
        assert legacy.sum() == 0


def test_regions_reject_multichannel_label():
    with pytest.raises(ValueError, match="must have 1 channel"):
        LabelsToRegionsd("label", [[1]])({"label": torch.zeros(2, 3, 3)})


@pytest.fixture(scope="module")
def brats_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats")
    for i in range(3):
        write_case(root, i, size=24, seed=1)
    return root


def test_train_pipeline_3d_patches_and_augmentation(brats_root):
    cfg = make_cfg(root=str(brats_root), patch_size=[16, 16, 12], samples_per_case=3,
                   spacing=[2.5, 2.5, 2.5], sampling="balanced", pos_neg_ratio=1e6,
                   augment={"rotate_prob": 1.0, "zoom_prob": 1.0, "noise_prob": 1.0,
                            "rotate90_prob": 1.0})
    samples = build_transforms(cfg, "train")(load_cases(cfg)[0])
    assert len(samples) == 3
    for s in samples:
        assert tuple(s["image"].shape) == (4, 16, 16, 12)
        assert tuple(s["label"].shape) == (3, 16, 16, 12)
        assert set(np.unique(s["label"].numpy())) <= {0.0, 1.0}
        assert s["label"][1].sum() > 0  # pos_neg_ratio huge: centred on tumour


def test_random_sampling_pads_small_volumes(brats_root):
    cfg = make_cfg(root=str(brats_root), patch_size=[32, 32, 32], sampling="random",
                   augment={"enabled": False})
    (sample,) = build_transforms(cfg, "train")(load_cases(cfg)[0])
    assert tuple(sample["image"].shape) == (4, 32, 32, 32)


def test_train_pipeline_2d(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image = np.zeros((40, 30), np.uint8)
    image[5:35, 5:25] = 120
    mask = np.zeros((40, 30), np.uint8)
    mask[10:20, 10:20] = 255
    Image.fromarray(image).save(tmp_path / "images" / "p.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "p.png")
    cfg = make_cfg(root=str(tmp_path), layout="folder2d", spatial_dims=2, patch_size=[16, 16],
                   mask_threshold=127, samples_per_case=2, pos_neg_ratio=1e6,
                   augment={"rotate_prob": 1.0, "zoom_prob": 1.0, "rotate90_prob": 1.0})
    samples = build_transforms(cfg, "train")(load_cases(cfg)[0])
    assert [tuple(s["image"].shape) for s in samples] == [(1, 16, 16)] * 2
    assert all(s["label"].sum() > 0 for s in samples)


def test_mri_zscore_over_nonzero_per_channel(brats_root):
    cfg = make_cfg(root=str(brats_root), crop_foreground=False, orientation=None)
    case = load_cases(cfg)[0]
    image = build_transforms(cfg, "infer")({"image": case["image"]})["image"].numpy()
    for c, path in enumerate(case["image"]):
        raw = nib.load(path).get_fdata()
        inside = raw != 0
        expected = (raw[inside] - raw[inside].mean()) / raw[inside].std()
        np.testing.assert_allclose(image[c][inside], expected, rtol=1e-4, atol=1e-4)
        assert np.all(image[c][~inside] == 0)


def test_ct_window_scale_and_crop(tmp_path):
    hu = np.full((12, 10, 8), -1000.0, np.float32)
    hu[2:9, 3:8, 1:6] = np.linspace(-300, 400, 7 * 5 * 5).reshape(7, 5, 5)
    nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.0, 1.0])), tmp_path / "ct.nii.gz")
    cfg = make_cfg(layout="datalist", datalist=str(tmp_path / "x.json"), intensity="ct",
                   ct_window=[-100.0, 300.0], orientation=None)
    image = build_transforms(cfg, "infer")({"image": str(tmp_path / "ct.nii.gz")})["image"]
    region = hu[2:9, 3:8, 1:6]
    expected = np.clip((region + 100.0) / 400.0, 0, 1)
    # crop keeps the bounding box of voxels above the window's lower edge
    kept = np.argwhere(expected > 0)
    lo, hi = kept.min(0), kept.max(0) + 1
    np.testing.assert_allclose(image[0].numpy(), expected[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]],
                               atol=1e-6)


def test_infer_pipeline_inverts_orientation_crop_and_spacing(tmp_path):
    volume = np.zeros((14, 12, 10), np.float32)
    volume[3:10, 2:9, 4:8] = np.arange(7 * 7 * 4).reshape(7, 7, 4) + 1.0
    affine = np.array([[-1.5, 0, 0, 40], [0, -1.5, 0, 30], [0, 0, 2.0, -20], [0, 0, 0, 1]])
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), path)
    cfg = make_cfg(layout="datalist", datalist=str(tmp_path / "x.json"), intensity="none",
                   orientation="RAS", crop_foreground=True)
    transform = build_transforms(cfg, "infer")
    data = transform({"image": str(path)})
    assert tuple(data["image"].shape) == (1, 7, 7, 4)
    assert data["image"].affine[0, 0] > 0  # now RAS
    data["pred"] = data["image"].clone()
    restored = prediction_inverter(transform, nearest=True)(data)["pred"]
    assert np.array_equal(restored[0].numpy(), volume)
    np.testing.assert_allclose(restored.affine.numpy(), affine)
    # with resampling: geometry (shape, affine) is restored exactly, values approximately
    cfg = make_cfg(layout="datalist", datalist=str(tmp_path / "x.json"), intensity="none",
                   spacing=[1.0, 1.0, 1.0], crop_foreground=False)
    transform = build_transforms(cfg, "infer")
    data = transform({"image": str(path)})
    assert tuple(data["image"].shape[1:]) != volume.shape
    data["pred"] = (data["image"] > 0).float()
    restored = prediction_inverter(transform, nearest=True)(data)["pred"]
    assert tuple(restored.shape[1:]) == volume.shape
    np.testing.assert_allclose(restored.affine.numpy(), affine, atol=1e-5)
    assert (restored[0].numpy() == (volume > 0)).mean() > 0.97


@pytest.mark.parametrize("cache", ["none", "memory", "disk"])
def test_build_loaders_cache_modes(brats_root, tmp_path, cache):
    cfg = make_cfg(root=str(brats_root), patch_size=[8, 8, 8], batch_size=2,
                   samples_per_case=2, num_folds=3, fold=0, cache=cache,
                   cache_dir=str(tmp_path / "cache"))
    train, val = build_loaders(cfg)
    batch = next(iter(train))
    assert tuple(batch["image"].shape) == (4, 4, 8, 8, 8)
    assert tuple(batch["label"].shape) == (4, 3, 8, 8, 8)
    (whole,) = list(val)
    assert whole["image"].shape[0] == 1 and whole["image"].shape[2] > 8
    assert whole["id"] == [c["id"] for c in split_cases(load_cases(cfg), cfg)[1]]
    if cache == "disk":
        assert any((tmp_path / "cache" / "val").iterdir())


def test_train_transform_is_reproducible(brats_root):
    cfg = make_cfg(root=str(brats_root), patch_size=[8, 8, 8])
    case = load_cases(cfg)[0]
    first, second = (build_transforms(cfg, "train").set_random_state(seed=5)(case)
                     for _ in range(2))
    assert torch.equal(first[0]["image"], second[0]["image"])
