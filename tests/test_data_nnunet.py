"""nnU-Net v2 raw layout (``layout: nnunet``) and ``kanseg data convert --to nnunet`` on real
NIfTI / MHA files written here: cases, labels and regions from ``dataset.json``, errors that
name the file or key, a real ``kanseg data check``, a 1-epoch ``kanseg train`` and
``kanseg infer`` on such a folder."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from kanseg.cli import main
from kanseg.data import DataConfig, build_transforms, check_dataset, input_channels, label_spec
from kanseg.data import load_cases, test_cases as list_test_cases
from kanseg.data.layouts import DataError
from kanseg.data.synth import write_dataset
from kanseg.schema import from_dict
from test_train import TINY

REGION_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                 "enhancing tumor": 3}


def _save(array: np.ndarray, path: Path) -> None:
    """NIfTI with nibabel, anything else with SimpleITK (1.5 mm voxels either way)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".nii.gz"):
        nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 1.5, 1.0])), path)
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
        image.SetSpacing((1.5, 1.5, 1.5))
        sitk.WriteImage(image, str(path))


def write_nnunet(root: Path, ending: str = ".nii.gz", cases: int = 3, test: int = 1,
                 labels: dict | None = None, size: int = 12) -> Path:
    """A tiny nnU-Net raw dataset: 2 channels, nested blobs labelled 1 (outer) .. 3 (inner)."""
    rng = np.random.default_rng(0)
    grid = np.linalg.norm(np.indices((size,) * 3) - size / 2 + 0.5, axis=0)
    for i in range(cases + test):
        folder = "imagesTr" if i < cases else "imagesTs"
        label = sum((grid < size / d).astype(np.uint8) for d in (3, 4, 6))  # 3 inside
        for c in range(2):
            image = (label * (c + 1) + rng.normal(size=label.shape)).astype(np.float32)
            _save(image, root / folder / f"case_{i:03d}_{c:04d}{ending}")
        if i < cases:
            _save(label, root / "labelsTr" / f"case_{i:03d}{ending}")
    meta = {"channel_names": {"0": "T1", "1": "FLAIR"}, "labels": labels or REGION_LABELS,
            "numTraining": cases, "file_ending": ending}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def cfg_for(root: Path, **data) -> DataConfig:
    return from_dict(DataConfig, {"root": str(root), "layout": "nnunet",
                                  "patch_size": [8, 8, 8], **data}, "data")


@pytest.mark.parametrize("ending", [".nii.gz", ".mha"])
def test_cases_channels_regions_and_loading(tmp_path, ending):
    root = write_nnunet(tmp_path / "Dataset001_Blobs", ending)
    cfg = cfg_for(root)
    cases = load_cases(cfg)
    assert [c["id"] for c in cases] == ["case_000", "case_001", "case_002"]
    assert cases[0]["image"] == [str(root / f"imagesTr/case_000_{c:04d}{ending}") for c in (0, 1)]
    assert cases[0]["label"] == str(root / f"labelsTr/case_000{ending}")
    assert [c["id"] for c in list_test_cases(cfg)] == ["case_003"]
    assert input_channels(cfg) == 2
    spec = label_spec(cfg)  # dataset.json declares regions: sigmoid regions
    assert spec.mode == "regions" and spec.names == ("whole tumor", "tumor core",
                                                     "enhancing tumor")
    assert spec.values == ((1, 2, 3), (2, 3), (3,))
    data = build_transforms(cfg_for(root, crop_foreground=False), "val")(cases[0])
    assert tuple(data["image"].shape) == (2, 12, 12, 12)
    raw = nib.load(cases[0]["label"]).get_fdata() if ending == ".nii.gz" else \
        sitk.GetArrayFromImage(sitk.ReadImage(cases[0]["label"])).T
    assert np.array_equal(data["label"][0].numpy(), np.isin(raw, [1, 2, 3]))  # symmetric blobs
    assert check_dataset(cfg).ok


def test_classes_from_labels_and_from_regions(tmp_path):
    root = write_nnunet(tmp_path / "Dataset002_Classes",
                        labels={"background": 0, "edema": 1, "core": 2, "enhancing": 3})
    spec = label_spec(cfg_for(root))
    assert spec.mode == "classes" and spec.names == ("background", "edema", "core", "enhancing")
    # a region dataset read as exclusive classes: every raw value, named where it can be
    regions = write_nnunet(tmp_path / "Dataset003_Regions")
    spec = label_spec(cfg_for(regions, label_mode="classes"))
    assert spec.names == ("background", "label1", "label2", "enhancing tumor")
    assert spec.values == ((0,), (1,), (2,), (3,))


def test_errors_name_the_file_or_key(tmp_path):
    root = write_nnunet(tmp_path / "Dataset004_Broken")
    (root / "imagesTr/case_001_0001.nii.gz").unlink()
    (root / "labelsTr/case_002.nii.gz").unlink()
    report = check_dataset(cfg_for(root))
    errors = {Path(e.where).name: e.message for e in report.errors}
    assert "missing image / modality file (case case_001)" in errors["case_001_0001.nii.gz"]
    assert "missing label file (case case_002)" in errors["case_002.nii.gz"]

    meta = json.loads((root / "dataset.json").read_text())
    for key, value, expected in [
        ("channel_names", None, "key 'channel_names' is missing"),
        ("labels", {"background": 0, "tumor": "x"}, "labels['tumor'] is 'x'"),
        ("labels", {"tumor": 1}, "no background entry with value 0"),
        ("file_ending", "nii", "'file_ending' must be an extension"),
    ]:
        broken = {k: v for k, v in meta.items() if k != key}
        if value is not None:
            broken[key] = value
        (root / "dataset.json").write_text(json.dumps(broken))
        with pytest.raises(DataError, match="dataset.json") as err:
            load_cases(cfg_for(root))
        assert expected in str(err.value)


def test_check_cli_and_convert_round_trip(tmp_path, capsys):
    synth = tmp_path / "synth"
    for _ in write_dataset(synth, cases=2, size=16, seed=1):
        pass
    out = tmp_path / "nnUNet_raw" / "Dataset501_Synth"
    assert main(["data", "convert", str(synth), str(out), "--to", "nnunet",
                 "--layout", "brats2021"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "t1", "1": "t1ce", "2": "t2", "3": "flair"}
    assert meta["labels"] == {"background": 0, "WT": [1, 2, 3], "TC": [1, 3], "ET": 3}
    assert meta["regions_class_order"] == [2, 1, 3]
    assert meta["file_ending"] == ".nii.gz" and meta["numTraining"] == 2
    case = "BraTS2021_00000"
    src = nib.load(synth / case / f"{case}_seg.nii.gz")
    dst = nib.load(out / "labelsTr" / f"{case}.nii.gz")
    assert np.allclose(src.affine, dst.affine, atol=1e-4)
    assert np.array_equal(np.searchsorted([0, 1, 2, 4], src.get_fdata().astype(int)),
                          dst.get_fdata().astype(int))  # ET 4 -> 3, consecutive values
    t1ce = nib.load(out / "imagesTr" / f"{case}_0001.nii.gz").get_fdata()
    assert np.allclose(t1ce, nib.load(synth / case / f"{case}_t1ce.nii.gz").get_fdata())
    capsys.readouterr()
    assert main(["data", "check", "--root", str(out), "--layout", "nnunet"]) == 0
    assert "2 cases checked: 0 errors" in capsys.readouterr().out
    assert main(["data", "convert", str(synth), str(tmp_path / "Synth"), "--to", "nnunet"]) == 1
    assert "must be named Dataset<three digits>_<Name>" in capsys.readouterr().err


def test_train_one_epoch_and_infer_on_nnunet_folder(tmp_path):
    root = write_nnunet(tmp_path / "Dataset005_Train", ".mha", cases=3, test=1, size=16)
    cfg = json.loads(json.dumps(TINY))
    cfg["data"].update(root=str(root), layout="nnunet")
    cfg["model"]["in_channels"] = 2
    cfg["trainer"]["max_epochs"] = 1
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 0
    assert (run / "checkpoints/last/model.safetensors").is_file()
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "val_dice_whole tumor" in header
    pred = tmp_path / "pred"
    assert main(["infer", "--checkpoint", str(run), "--input", str(root), "--layout", "nnunet",
                 "--output", str(pred)]) == 0
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == \
        [f"case_{i:03d}.nii.gz" for i in range(4)]  # imagesTr and imagesTs
    labels = nib.load(pred / "case_003.nii.gz")
    assert labels.shape == (16, 16, 16) and np.allclose(np.diag(labels.affine)[:3],
                                                        [-1.5, -1.5, 1.5])
    assert set(np.unique(labels.get_fdata()).astype(int)) <= {0, 1, 2, 3}
