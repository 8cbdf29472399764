"""Every error path of the dataset check, on real (and deliberately broken) files."""
from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from kanseg.data import DataConfig, DataError
from kanseg.data.check import check_dataset
from kanseg.commands.data import main as data_main
from kanseg.data.synth import write_case
from kanseg.schema import from_dict
from test_data_layouts import write_msd


def brats_cfg(root, **extra) -> DataConfig:
    return from_dict(DataConfig, {"root": str(root), "layout": "brats2021",
                                  "patch_size": [32, 32, 32], **extra}, "data")


def case_file(root, index, modality):
    name = f"BraTS2021_{index:05d}"
    return root / name / f"{name}_{modality}.nii.gz"


@pytest.fixture()
def brats(tmp_path):
    for i in range(6):
        write_case(tmp_path, i, size=32, seed=2)
    return tmp_path


def replace_volume(path, data=None, affine=None, dtype=None):
    old = nib.load(path)
    data = old.get_fdata() if data is None else data
    image = nib.Nifti1Image(data if dtype is None else data.astype(dtype),
                            old.affine if affine is None else affine)
    nib.save(image, path)


def test_clean_dataset_passes(brats):
    report = check_dataset(brats_cfg(brats))
    assert report.ok and report.cases == 6 and not report.issues
    report.raise_if_errors()


def test_every_problem_is_reported_with_its_file(brats):
    missing_mod = case_file(brats, 0, "flair")
    missing_mod.unlink()
    missing_label = case_file(brats, 1, "seg")
    missing_label.unlink()
    corrupt = case_file(brats, 2, "t2")
    corrupt.write_bytes(gzip.compress(b"not a nifti header at all"))
    bad_shape = case_file(brats, 3, "t1ce")
    replace_volume(bad_shape, data=np.ones((32, 32, 31), np.float32))
    bad_affine = case_file(brats, 3, "seg")
    label = nib.load(bad_affine).get_fdata()
    label[0, 0, 0] = 7  # also a value outside {0, 1, 2, 4}
    replace_volume(bad_affine, data=label.astype(np.uint8), affine=np.diag([2.0, 1, 1, 1]),
                   dtype=np.uint8)
    nan_file = case_file(brats, 4, "t1")
    volume = nib.load(nan_file).get_fdata().astype(np.float32)
    volume[3, 3, 3] = np.nan
    volume[4, 4, 4] = np.inf
    replace_volume(nan_file, data=volume)
    bad_values = case_file(brats, 5, "seg")
    label = nib.load(bad_values).get_fdata()
    label[1, 1, 1] = 3
    replace_volume(bad_values, data=label.astype(np.uint8), dtype=np.uint8)

    report = check_dataset(brats_cfg(brats))
    assert not report.ok
    by_file = {}
    for issue in report.errors:
        by_file.setdefault(issue.where, []).append(issue.message)
    assert "missing image / modality file" in by_file[str(missing_mod)][0]
    assert "missing label file" in by_file[str(missing_label)][0]
    assert "unreadable or corrupt" in by_file[str(corrupt)][0]
    assert "shape (32, 32, 31) does not match (32, 32, 32)" in by_file[str(bad_shape)][0]
    assert any("affine does not match" in m for m in by_file[str(bad_affine)])
    assert any("label values [7]" in m for m in by_file[str(bad_affine)])
    assert "2 NaN/Inf voxels" in by_file[str(nan_file)][0]
    assert "label values [3] outside the declared set [0, 1, 2, 4]" in by_file[str(bad_values)][0]
    assert len(report.errors) == 8
    with pytest.raises(DataError, match="dataset check failed"):
        report.raise_if_errors()


def test_empty_and_missing_datasets(tmp_path):
    report = check_dataset(brats_cfg(tmp_path))
    assert not report.ok and "empty dataset" in report.errors[0].message
    report = check_dataset(brats_cfg(tmp_path / "absent"))
    assert not report.ok and "does not exist" in report.errors[0].message
    msd = from_dict(DataConfig, {"root": str(tmp_path), "layout": "msd"}, "data")
    assert "dataset.json" in check_dataset(msd).errors[0].message


def test_unusual_spacing_is_a_warning_and_empty_label_too(brats):
    for modality in ("t1", "t1ce", "t2", "flair", "seg"):
        replace_volume(case_file(brats, 0, modality), affine=np.diag([0.9, 0.9, 9.0, 1.0]),
                       dtype=np.uint8 if modality == "seg" else None)
    replace_volume(case_file(brats, 1, "seg"), data=np.zeros((32, 32, 32), np.uint8))
    report = check_dataset(brats_cfg(brats))
    assert report.ok
    messages = {w.where: w.message for w in report.warnings}
    assert "unusual voxel spacing [0.9, 0.9, 9.0]" in messages[str(case_file(brats, 0, "t1"))]
    assert "empty" in messages[str(case_file(brats, 1, "seg"))]


def test_4d_file_where_3d_is_expected_and_patch_larger_than_image(brats):
    t1 = case_file(brats, 0, "t1")
    volume = nib.load(t1).get_fdata()
    replace_volume(t1, data=np.stack([volume, volume], axis=-1))
    seg = case_file(brats, 1, "seg")
    replace_volume(seg, data=np.zeros((32, 32, 32, 2)), dtype=np.uint8)
    report = check_dataset(brats_cfg(brats, patch_size=[40, 32, 32]))
    errors = {e.where: e.message for e in report.errors}
    assert "(32, 32, 32, 2)" in errors[str(t1)] and "5 channel(s), expected 4" in errors[str(t1)]
    assert errors[str(seg)] == "label shape (32, 32, 32, 2) is not a 3D label map"
    assert len(errors) == 2
    small = [w.message for w in report.warnings if "patch_size" in w.message]
    assert len(small) == 6 and "case BraTS2021_00002: image shape [32, 32, 32]" in small[2]
    assert "[40, 32, 32]" in small[2]


def test_datalist_duplicates_unknown_split_ids_and_2d_masks(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.full((8, 6), 9, np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.full((8, 7), 9, np.uint8)).save(tmp_path / "images" / "b.png")
    Image.fromarray(np.full((8, 6), 255, np.uint8)).save(tmp_path / "masks" / "a.png")
    Image.fromarray(np.zeros((8, 6), np.uint8)).save(tmp_path / "masks" / "b.png")
    cfg = from_dict(DataConfig, {"root": str(tmp_path), "layout": "folder2d", "spatial_dims": 2,
                                 "patch_size": [4, 4], "val_cases": ["zz"]}, "data")
    report = check_dataset(cfg)
    messages = [str(e) for e in report.errors]
    assert any("masks/a.png" in m and "label values [255]" in m for m in messages)
    assert any("masks/b.png" in m and "shape (8, 6) does not match (8, 7)" in m
               for m in messages)
    assert any("unknown case ids ['zz']" in m for m in messages)
    records = [{"id": "x", "image": "images/a.png", "label": "masks/a.png"}] * 2
    (tmp_path / "list.json").write_text(json.dumps(records))
    cfg = from_dict(DataConfig, {"root": str(tmp_path), "layout": "datalist", "spatial_dims": 2,
                                 "datalist": str(tmp_path / "list.json"), "mask_threshold": 127,
                                 "patch_size": [4, 4]}, "data")
    assert [e.message for e in check_dataset(cfg).errors] == ["duplicate case id 'x'"]


def test_cli_exit_codes(brats, tmp_path, capsys):
    assert data_main(["data", "check", "--root", str(brats)]) == 0
    case_file(brats, 0, "t1").unlink()
    assert data_main(["data", "check", "--root", str(brats)]) == 1
    out = capsys.readouterr().out
    assert "BraTS2021_00000_t1.nii.gz: missing" in out and "1 errors" in out
    config = tmp_path / "cfg.yaml"
    config.write_text(f"model: {{}}\ndata:\n  root: {brats}\n  layout: brats2021\n")
    assert data_main(["data", "check", "--config", str(config)]) == 1
    config.write_text("data:\n  layout: brats2099\n")
    assert data_main(["data", "check", "--config", str(config)]) == 2
    assert "data.layout" in capsys.readouterr().err


def test_msd_entries_outside_the_root_are_reported(tmp_path):
    task = tmp_path / "Task04"
    write_msd(task)
    meta = json.loads((task / "dataset.json").read_text())
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name in ("x.nii.gz", "y.nii.gz"):
        (outside / name).write_bytes((task / "labelsTr/hippo_000.nii.gz").read_bytes())
    meta["training"].append({"image": "../elsewhere/x.nii.gz", "label": "../elsewhere/y.nii.gz"})
    (task / "dataset.json").write_text(json.dumps(meta))
    cfg = from_dict(DataConfig, {"root": str(task), "layout": "msd",
                                 "patch_size": [8, 8, 8]}, "data")
    report = check_dataset(cfg)
    inside = {w.where: w.message for w in report.warnings if "outside" in w.message}
    assert set(inside) == {str(outside / "x.nii.gz"), str(outside / "y.nii.gz")}
    assert "case x: the dataset.json entry points outside the dataset root" in \
        inside[str(outside / "x.nii.gz")]
    # the 2-channel 4D images of MSD are what the network takes: no channel error for them
    assert [str(e.where) for e in report.errors] == [str(outside / "x.nii.gz")]
