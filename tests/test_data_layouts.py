"""Dataset layouts, splits and label specs on real files written to tmp dirs."""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from kanseg.data import (
    DataConfig,
    DataError,
    build_transforms,
    input_channels,
    label_spec,
    load_cases,
    split_cases,
    test_cases as list_test_cases,
)
from kanseg.data.synth import write_case
from kanseg.schema import ConfigError, from_dict


def make_cfg(**data) -> DataConfig:
    return from_dict(DataConfig, data, "data")


def save_nifti(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


@pytest.mark.parametrize("layout,labels", [("brats2021", {0, 1, 2, 4}),
                                           ("brats2023", {0, 1, 2, 3})])
def test_brats_layout_loads_four_modalities_and_regions(tmp_path, layout, labels):
    for i in range(2):
        write_case(tmp_path, i, size=20, seed=3, layout=layout)
    (tmp_path / "notes").mkdir()  # a folder without NIfTI files is not a case
    cfg = make_cfg(root=str(tmp_path), layout=layout, patch_size=[16, 16, 16])
    cases = load_cases(cfg)
    assert [len(c["image"]) for c in cases] == [4, 4]
    sep = "_" if layout == "brats2021" else "-"
    t1ce = "t1ce" if layout == "brats2021" else "t1c"
    assert cases[0]["image"][1].endswith(f"{cases[0]['id']}{sep}{t1ce}.nii.gz")
    raw = nib.load(cases[0]["label"]).get_fdata()
    assert set(np.unique(raw).astype(int)) == labels
    data = build_transforms(cfg, "val")(cases[0])
    assert data["image"].shape[0] == 4 and data["label"].shape[0] == 3
    assert input_channels(cfg) == 4
    assert label_spec(cfg).names == ("TC", "WT", "ET")
    # classes mode maps the raw values to 0..3
    cfg_cls = make_cfg(root=str(tmp_path), layout=layout, label_mode="classes",
                       patch_size=[16, 16, 16], crop_foreground=False, orientation=None)
    label = build_transforms(cfg_cls, "val")(cases[0])["label"]
    assert set(np.unique(label.numpy()).astype(int)) == {0, 1, 2, 3}
    assert np.array_equal(label[0].numpy(), np.searchsorted(sorted(labels), raw))


def test_brats_modality_subset_and_missing_root(tmp_path):
    write_case(tmp_path, 0, size=16, layout="brats2021")
    cfg = make_cfg(root=str(tmp_path), layout="brats2021", modalities=["flair", "t1ce"],
                   patch_size=[8, 8, 8])
    assert [p.rsplit("_", 1)[1] for p in load_cases(cfg)[0]["image"]] == ["flair.nii.gz",
                                                                          "t1ce.nii.gz"]
    assert input_channels(cfg) == 2
    with pytest.raises(DataError, match="does not exist"):
        load_cases(make_cfg(root=str(tmp_path / "nope"), layout="brats2021"))
    with pytest.raises(DataError, match=r"brats2021 root is not set \(data.root\)"):
        load_cases(make_cfg(layout="brats2021"))


def write_msd(root, n=3, channels=2):
    rng = np.random.default_rng(0)
    training = []
    for i in range(n):
        image = rng.random((10, 12, 8, channels)).astype(np.float32) + 0.1
        label = np.zeros((10, 12, 8), np.uint8)
        label[2:6, 3:7, 2:5] = 1
        label[3:4, 4:5, 3:4] = 2
        save_nifti(root / "imagesTr" / f"hippo_{i:03d}.nii.gz", image)
        save_nifti(root / "labelsTr" / f"hippo_{i:03d}.nii.gz", label)
        training.append({"image": f"./imagesTr/hippo_{i:03d}.nii.gz",
                         "label": f"./labelsTr/hippo_{i:03d}.nii.gz"})
    save_nifti(root / "imagesTs" / "hippo_100.nii.gz",
               rng.random((10, 12, 8, channels)).astype(np.float32))
    meta = {"name": "Toy", "modality": {str(c): f"MR{c}" for c in range(channels)},
            "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
            "training": training, "test": ["./imagesTs/hippo_100.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(meta))


def test_msd_layout_4d_multimodal(tmp_path):
    write_msd(tmp_path)
    cfg = make_cfg(root=str(tmp_path), layout="msd", patch_size=[8, 8, 8], orientation=None,
                   crop_foreground=False)
    cases = load_cases(cfg)
    assert [c["id"] for c in cases] == ["hippo_000", "hippo_001", "hippo_002"]
    assert input_channels(cfg) == 2
    spec = label_spec(cfg)
    assert spec.names == ("background", "Anterior", "Posterior") and spec.activation == "softmax"
    data = build_transforms(cfg, "val")(cases[0])
    assert tuple(data["image"].shape) == (2, 10, 12, 8)
    assert tuple(data["label"].shape) == (1, 10, 12, 8)
    assert [c["id"] for c in list_test_cases(cfg)] == ["hippo_100"]
    infer = build_transforms(cfg, "infer")(list_test_cases(cfg)[0])
    assert tuple(infer["image"].shape) == (2, 10, 12, 8)


def test_msd_missing_dataset_json(tmp_path):
    with pytest.raises(DataError, match="dataset.json"):
        load_cases(make_cfg(root=str(tmp_path), layout="msd"))


def write_channels(root, n):
    cases = []
    for i in range(n):
        paths = []
        for c in ("a", "b"):
            paths.append(f"case{i}/{c}.nii.gz")
            save_nifti(root / paths[-1], np.full((6, 6, 6), i + 1.0, np.float32))
        label = np.zeros((6, 6, 6), np.uint8)
        label[1:3] = 1
        save_nifti(root / f"case{i}/seg.nii.gz", label)
        cases.append({"id": f"c{i}", "image": paths, "label": f"case{i}/seg.nii.gz",
                      "fold": i % 2})
    return cases


def test_datalist_json_with_folds_and_channels(tmp_path):
    records = write_channels(tmp_path, 4)
    (tmp_path / "list.json").write_text(json.dumps({"training": records}))
    cfg = make_cfg(layout="datalist", datalist=str(tmp_path / "list.json"), fold=1,
                   patch_size=[4, 4, 4], orientation=None)
    cases = load_cases(cfg)
    assert input_channels(cfg) == 2
    train, val = split_cases(cases, cfg)
    assert [c["id"] for c in val] == ["c1", "c3"] and [c["id"] for c in train] == ["c0", "c2"]
    image = build_transforms(cfg, "val")(cases[2])["image"]
    assert image.shape[0] == 2 and float(image.mean()) == pytest.approx(0.0, abs=1e-6)


def test_datalist_json_validation_section_and_bad_entry(tmp_path):
    records = write_channels(tmp_path, 3)
    (tmp_path / "list.json").write_text(json.dumps({"training": records[:2],
                                                    "validation": records[2:]}))
    cfg = make_cfg(layout="datalist", datalist=str(tmp_path / "list.json"))
    train, val = split_cases(load_cases(cfg), cfg)
    assert [c["id"] for c in val] == ["c2"] and len(train) == 2
    (tmp_path / "bad.json").write_text(json.dumps([{"label": "x.nii.gz"}]))
    with pytest.raises(DataError, match="entry 0 has no 'image'"):
        load_cases(make_cfg(layout="datalist", datalist=str(tmp_path / "bad.json")))


def test_datalist_csv_with_channel_columns(tmp_path):
    records = write_channels(tmp_path, 3)
    with (tmp_path / "list.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["id", "t1", "t2", "label", "fold"])
        writer.writeheader()
        for r in records:
            writer.writerow({"id": r["id"], "t1": r["image"][0], "t2": r["image"][1],
                             "label": r["label"], "fold": r["fold"]})
    cfg = make_cfg(layout="datalist", datalist=str(tmp_path / "list.csv"),
                   modalities=["t1", "t2"], fold=0, patch_size=[4, 4, 4])
    cases = load_cases(cfg)
    assert cases[1]["image"] == [str(tmp_path / "case1/a.nii.gz"), str(tmp_path / "case1/b.nii.gz")]
    assert [c["fold"] for c in cases] == [0, 1, 0]
    assert input_channels(cfg) == 2
    bad = make_cfg(layout="datalist", datalist=str(tmp_path / "list.csv"), modalities=["flair"])
    with pytest.raises(DataError, match="no column 'flair'"):
        load_cases(bad)


def antialiased_mask(shape=(24, 20)):
    mask = np.zeros(shape, np.uint8)
    mask[4:16, 5:15] = 255
    mask[4, 5:15] = 100  # anti-aliased edge below the threshold
    mask[15, 5:15] = 200  # above it
    return mask


def test_folder2d_binary_threshold_rgb_and_formats(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(0)
    for name, ext in (("a", ".png"), ("b", ".jpg"), ("c", ".tif")):
        rgb = rng.integers(1, 255, (24, 20, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(tmp_path / "images" / f"{name}{ext}")
        Image.fromarray(antialiased_mask()).save(tmp_path / "masks" / f"{name}.png")
    cfg = make_cfg(root=str(tmp_path), layout="folder2d", spatial_dims=2, patch_size=[8, 8],
                   mask_threshold=127, orientation=None, crop_foreground=False,
                   intensity="none")
    cases = load_cases(cfg)
    assert [c["id"] for c in cases] == ["a", "b", "c"]
    data = build_transforms(cfg, "val")(cases[2])
    assert tuple(data["image"].shape) == (1, 20, 24)  # PIL reader: (width, height)
    expected = (antialiased_mask() >= 127).astype(np.float32).T
    assert np.array_equal(data["label"][0].numpy(), expected)
    rgb_cfg = make_cfg(root=str(tmp_path), layout="folder2d", spatial_dims=2,
                       patch_size=[8, 8], modalities=["r", "g", "b"], mask_threshold=127)
    assert build_transforms(rgb_cfg, "val")(cases[0])["image"].shape[0] == 3
    assert input_channels(rgb_cfg) == 3


def test_folder2d_multiclass_label_values(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    mask = np.zeros((12, 10), np.uint8)
    mask[2:5] = 128
    mask[6:9] = 255
    Image.fromarray(np.full((12, 10), 50, np.uint8)).save(tmp_path / "images" / "x.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "x.png")
    cfg = make_cfg(root=str(tmp_path), layout="folder2d", spatial_dims=2, patch_size=[8, 8],
                   labels=["bg", "heart", "lung"], label_values=[0, 128, 255],
                   crop_foreground=False)
    assert label_spec(cfg).names == ("bg", "heart", "lung")
    label = build_transforms(cfg, "val")(load_cases(cfg)[0])["label"][0].numpy()
    assert np.array_equal(label, (mask // 127).astype(np.float32).T)


def test_seeded_split_determinism_and_folds():
    cases = [{"id": f"c{i}", "image": "x", "label": "y"} for i in range(23)]
    cfg = make_cfg(fold=2, num_folds=5, seed=7)
    a, b = split_cases(cases, cfg), split_cases(cases, cfg)
    assert a == b
    other = split_cases(cases, make_cfg(fold=2, num_folds=5, seed=8))
    assert [c["id"] for c in other[1]] != [c["id"] for c in a[1]]
    vals = [{c["id"] for c in split_cases(cases, make_cfg(fold=f, num_folds=5, seed=7))[1]}
            for f in range(5)]
    assert set().union(*vals) == {c["id"] for c in cases}
    assert sum(len(v) for v in vals) == 23 and all(4 <= len(v) <= 5 for v in vals)
    train, val = split_cases(cases, make_cfg(fold=None, val_fraction=0.3, seed=1))
    assert len(val) == 7 and len(train) == 16 and not {c["id"] for c in train} & {
        c["id"] for c in val}
    train, val = split_cases(cases, make_cfg(val_cases=["c3", "c1"]))
    assert [c["id"] for c in val] == ["c1", "c3"] and len(train) == 21
    train, val = split_cases(cases, make_cfg(train_cases=["c0"], val_cases=["c1"]))
    assert [c["id"] for c in train] == ["c0"] and [c["id"] for c in val] == ["c1"]
    with pytest.raises(DataError, match="unknown case ids"):
        split_cases(cases, make_cfg(val_cases=["zzz"]))


@pytest.mark.parametrize("data,match", [
    ({"patch_size": [8, 8]}, "patch_size must have 3"),
    ({"layout": "brats2021", "spatial_dims": 2, "patch_size": [8, 8]}, "is 3D"),
    ({"layout": "datalist"}, "needs the key 'datalist'"),
    ({"fold": 5}, "fold must be in"),
    ({"layout": "msd", "label_mode": "regions"}, "needs 'regions'"),
    ({"cache": "disk"}, "cache_dir"),
    ({"labels": ["a", "b"], "label_values": [0]}, "same length"),
    ({"augment": {"flip_prob": 2.0}}, "augment.flip_prob"),
    ({"sampling": "uniform"}, "data.sampling"),
])
def test_config_errors_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(**data)


def test_msd_regions_from_config(tmp_path):
    write_msd(tmp_path, n=1)
    cfg = make_cfg(root=str(tmp_path), layout="msd", label_mode="regions",
                   regions={"any": [1, 2], "posterior": [2]}, patch_size=[8, 8, 8],
                   crop_foreground=False, orientation=None)
    spec = label_spec(cfg)
    assert spec.activation == "sigmoid" and spec.out_channels == 2
    label = build_transforms(cfg, "val")(load_cases(cfg)[0])["label"].numpy()
    raw = nib.load(str(tmp_path / "labelsTr/hippo_000.nii.gz")).get_fdata()
    assert np.array_equal(label[0], raw > 0) and np.array_equal(label[1], raw == 2)
