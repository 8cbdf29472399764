"""SimpleITK conversion to NIfTI with geometry, and the real CT files in ../shared."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from kanseg.data import DataConfig, DataError, build_transforms, load_cases
from kanseg.data.check import check_dataset
from kanseg.commands.data import main as data_main
from kanseg.data.convert import convert_to_nifti
from kanseg.schema import from_dict

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOTALSEG = SHARED / "data" / "totalsegmentator"


def sitk_world(image: sitk.Image, index) -> np.ndarray:
    return np.array(image.TransformContinuousIndexToPhysicalPoint([float(i) for i in index]))


def nifti_world_lps(img: nib.Nifti1Image, index) -> np.ndarray:
    ras = img.affine @ np.array([*index, 1.0])
    return np.array([-ras[0], -ras[1], ras[2]])


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_oblique_nrrd_and_mha_keep_geometry(tmp_path, suffix):
    array = np.random.default_rng(0).integers(-1000, 1000, (5, 6, 7)).astype(np.int16)
    image = sitk.GetImageFromArray(array)  # numpy (z, y, x) -> size (7, 6, 5)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-12.0, 30.5, 100.25))
    angle = np.deg2rad(20)
    image.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0,
                        0, 0, 1))
    src = tmp_path / f"scan{suffix}"
    sitk.WriteImage(image, str(src))
    out = convert_to_nifti(src, tmp_path / "out")
    assert out == tmp_path / "out" / "scan.nii.gz"
    nifti = nib.load(out)
    assert nifti.shape == (7, 6, 5)
    assert np.array_equal(np.asarray(nifti.dataobj), array.transpose(2, 1, 0))
    for index in [(0, 0, 0), (6, 5, 4), (3, 1, 2)]:
        np.testing.assert_allclose(nifti_world_lps(nifti, index), sitk_world(image, index),
                                   atol=1e-4)
    assert not list((tmp_path / "out").glob(".*tmp*"))  # atomic write leaves no temp file


def test_dicom_series_written_here_converts(tmp_path):
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    series = tmp_path / "dicom"
    series.mkdir()
    origin = np.array([-100.0, -50.0, 20.0])
    for z in range(volume.shape[0]):
        slice_ = sitk.GetImageFromArray(volume[z])
        slice_.SetSpacing((0.5, 0.6))
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for tag, value in {"0020|000e": "1.2.826.0.1.3680043.2.1125.1", "0008|0060": "CT",
                           "0020|0013": str(z + 1), "0020|0037": "1\\0\\0\\0\\1\\0",
                           "0020|0032": "\\".join(str(v) for v in origin + [0, 0, 3.0 * z]),
                           "0028|0030": "0.6\\0.5"}.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(series / f"{z:03d}.dcm"))
        writer.Execute(slice_)
    out = convert_to_nifti(series, tmp_path / "ct.nii.gz")
    nifti = nib.load(out)
    assert nifti.shape == (6, 5, 4)
    np.testing.assert_allclose(nifti.header.get_zooms(), (0.5, 0.6, 3.0), atol=1e-4)
    np.testing.assert_allclose(nifti_world_lps(nifti, (0, 0, 0)), origin, atol=1e-3)
    assert np.array_equal(np.asarray(nifti.dataobj), volume.transpose(2, 1, 0))


def test_convert_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        convert_to_nifti(tmp_path / "none.nrrd", tmp_path / "x.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no DICOM series"):
        convert_to_nifti(tmp_path / "empty", tmp_path / "x.nii.gz")
    (tmp_path / "bad.mha").write_text("garbage")
    with pytest.raises(DataError, match="cannot read"):
        convert_to_nifti(tmp_path / "bad.mha", tmp_path / "x.nii.gz")
    assert data_main(["data", "convert", str(tmp_path / "bad.mha"), str(tmp_path / "x.png")]) == 1


needs_shared = pytest.mark.skipif(not TOTALSEG.is_dir(), reason="../shared data not present")


@needs_shared
def test_totalsegmentator_dicom_matches_reference_segmentation(tmp_path):
    out = tmp_path / "ct.nii.gz"
    assert data_main(["data", "convert", str(TOTALSEG / "example_ct_dicom"), str(out)]) == 0
    ct = nib.load(out)
    seg = nib.load(TOTALSEG / "example_seg_dicom.nii.gz")
    assert ct.shape == seg.shape == (512, 512, 20)
    np.testing.assert_allclose(ct.header.get_zooms(), seg.header.get_zooms(), atol=1e-5)
    # the reference stores the y axis reversed: same voxel grid, same world coordinates
    ct_ras, seg_ras = nib.as_closest_canonical(ct), nib.as_closest_canonical(seg)
    np.testing.assert_allclose(ct_ras.affine, seg_ras.affine, atol=1e-3)
    hu = np.asarray(ct_ras.dataobj).astype(np.float64)
    labels = np.asarray(seg_ras.dataobj)
    # anatomy lines up: the liver is contrast-enhanced soft tissue, and every organ is far
    # more homogeneous than when the y axis is taken the wrong way round
    assert 40 < hu[labels == 5].mean() < 200

    def within_organ_std(label_map: np.ndarray) -> float:
        inside = label_map > 0
        ids, values = label_map[inside], hu[inside]
        means = np.bincount(ids, weights=values) / np.maximum(np.bincount(ids), 1)
        return float(np.sqrt(((values - means[ids]) ** 2).mean()))

    assert within_organ_std(labels) < 0.5 * within_organ_std(labels[:, ::-1])


@needs_shared
def test_totalsegmentator_ct_loads_and_checks(tmp_path):
    datalist = tmp_path / "ct.json"
    datalist.write_text(json.dumps([
        {"image": str(TOTALSEG / "example_ct_sm.nii.gz"),
         "label": str(TOTALSEG / "example_seg.nii.gz")}]))
    cfg = from_dict(DataConfig, {
        "layout": "datalist", "datalist": str(datalist), "intensity": "ct",
        "ct_window": [-200, 400], "spacing": [4.0, 4.0, 4.0], "patch_size": [32, 32, 16],
        "labels": ["background", "spleen", "kidney_right", "kidney_left", "gallbladder",
                   "liver"],
        "label_values": [0, 1, 2, 3, 4, 5]}, "data")
    case = load_cases(cfg)[0]
    data = build_transforms(cfg, "val")(case)
    image, label = data["image"], data["label"]
    assert image.shape[0] == 1 and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert image.shape[1:] == label.shape[1:]
    np.testing.assert_allclose(np.linalg.norm(image.affine[:3, :3].numpy(), axis=0), 4.0)
    assert image.shape[1] <= round(122 * 3 / 4) + 1  # resampled to 4 mm, cropped to the body
    # label values beyond the five declared classes are reported by the check
    report = check_dataset(cfg)
    assert not report.ok and "outside the declared set" in report.errors[0].message
