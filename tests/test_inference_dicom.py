"""DICOM series in, DICOM-SEG out: `kanseg infer` on a series folder writes <id>.nii.gz and a
DICOM-SEG that pydicom reads back; its frames map onto the source slices and its mask equals
the NIfTI prediction. A folder of several series is refused with their list unless one is
picked as FOLDER#SeriesInstanceUID."""
from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from kanseg.cli import main
from kanseg.data.convert import convert_to_nifti, dicom_series_files
from kanseg.data.layouts import DataError
from kanseg.dicom_seg import write_dicom_seg

TOTALSEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalsegmentator"
SERIES_UID, STUDY_UID = "1.2.826.0.1.3680043.2.1125.7.1", "1.2.826.0.1.3680043.2.1125.7.2"


def _write_series(folder: Path, volume: np.ndarray, uid: str = SERIES_UID,
                  description: str = "", name: str = "slice") -> None:
    """A CT series, one file ``<name><n>.dcm`` per slice of ``volume`` (slices, rows, columns),
    0.7 x 0.8 x 2.5 mm."""
    folder.mkdir(parents=True, exist_ok=True)
    for z, pixels in enumerate(volume):
        image = sitk.GetImageFromArray(pixels)
        tags = {"0020|000e": uid, "0020|000d": STUDY_UID, "0008|0060": "CT",
                "0020|0052": "1.2.826.0.1.3680043.2.1125.7.3", "0010|0020": "P7",
                "0020|0013": str(z + 1), "0020|0037": "1\\0\\0\\0\\1\\0",
                "0020|0032": f"-40\\-30\\{10 + 2.5 * z}", "0028|0030": "0.8\\0.7",
                "0018|0050": "2.5", **({"0008|103e": description} if description else {})}
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"{name}{len(volume) - 1 - z}.dcm"))  # against z order
        writer.Execute(image)


def _seg_volume(seg: pydicom.Dataset, series: Path) -> np.ndarray:
    """Raw label values (slices, rows, columns) rebuilt from the SEG's frames: each frame is
    put on the source slice it references, with the value of its segment."""
    slice_of = {pydicom.dcmread(f).file_meta.MediaStorageSOPInstanceUID: z
                for z, f in enumerate(dicom_series_files(series))}  # = SOP Instance UID
    values = {s.SegmentNumber: int(s.SegmentLabel.split("=")[-1])
              for s in seg.SegmentSequence}
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    out = np.zeros((len(slice_of), seg.Rows, seg.Columns), np.int64)
    for frame, group in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        source = group.DerivationImageSequence[0].SourceImageSequence[0]
        number = group.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        out[slice_of[source.ReferencedSOPInstanceUID]][frame > 0] = values[number]
    return out


def _ct_run(saved_run, root: Path) -> Path:
    """A run (random weights) predicting raw values 0, 1, 3 from one CT channel."""
    return saved_run({
        "data": {"root": str(root), "layout": "msd", "patch_size": [16, 16, 8],
                 "labels": ["background", "v=1", "v=3"], "label_values": [0, 1, 3],
                 "intensity": "none"},
        "model": {"name": "ukanet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                  "depth": 1, "width": 4},
        "loss": {"name": "dice_ce"},
    })


def test_dicom_series_in_dicom_seg_out(tmp_path, saved_run, capsys):
    rng = np.random.default_rng(0)
    series = tmp_path / "ct_series"
    _write_series(series, (rng.random((8, 16, 20)) * 400 - 100).astype(np.int16))
    run = _ct_run(saved_run, tmp_path)

    out = tmp_path / "pred"
    assert main(["infer", "--checkpoint", str(run), "--input", str(series),
                 "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ct_series.nii.gz", "ct_series.seg.dcm"]
    nifti = nib.load(out / "ct_series.nii.gz")
    source = nib.load(convert_to_nifti(series, tmp_path / "ct.nii.gz"))
    assert nifti.shape == source.shape == (20, 16, 8)
    np.testing.assert_allclose(nifti.affine, source.affine, atol=1e-4)
    labels = np.asarray(nifti.dataobj)
    assert set(np.unique(labels)) == {0, 1, 3}  # every segment has voxels

    seg = pydicom.dcmread(out / "ct_series.seg.dcm")
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == STUDY_UID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES_UID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["v=1", "v=3"]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "kanseg ukanet"
    assert np.array_equal(_seg_volume(seg, series), labels.transpose(2, 1, 0))

    assert main(["infer", "--checkpoint", str(run), "--input", str(tmp_path / "ct.nii.gz"),
                 "--output", str(tmp_path / "p2"), "--format", "dicom-seg"]) == 1
    assert "dicom-seg needs DICOM series folders as input; not DICOM: ct" in \
        capsys.readouterr().err


def test_folder_of_two_series_names_them_and_predicts_the_one_picked(tmp_path, saved_run,
                                                                    capsys):
    rng = np.random.default_rng(1)
    folder, other = tmp_path / "exam", "1.2.826.0.1.3680043.2.1125.7.9"
    _write_series(folder, (rng.random((8, 16, 20)) * 400).astype(np.int16),
                  description="axial CT")
    _write_series(folder, (rng.random((5, 12, 20)) * 400).astype(np.int16), uid=other,
                  name="scout")
    run = _ct_run(saved_run, tmp_path)

    def infer(source: str, out: str) -> str:
        code = main(["infer", "--checkpoint", str(run), "--input", source,
                     "--output", str(tmp_path / out)])
        return capsys.readouterr().err if code else ""

    err = infer(str(folder), "p1")  # never a silent pick
    assert f"input folder {folder} holds 2 DICOM series; pick one with --input " \
           f"{folder}#<SeriesInstanceUID>" in err
    assert f"{SERIES_UID} (axial CT, 8 files)" in err
    assert f"{other} (no description, 5 files)" in err
    assert not (tmp_path / "p1").exists()
    with pytest.raises(DataError, match=rf"holds 2 DICOM series; choose one with --series; "
                                        rf"series found:\n  {re.escape(SERIES_UID)} \(axial CT"):
        convert_to_nifti(folder, tmp_path / "exam.nii.gz")  # kanseg data convert
    assert "holds no DICOM series '1.2.3'" in infer(f"{folder}#1.2.3", "p2")

    assert infer(f"{folder}#{other}", "p3") == ""
    assert nib.load(tmp_path / "p3" / "exam.nii.gz").shape == (20, 12, 5)
    seg = pydicom.dcmread(tmp_path / "p3" / "exam.seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == other
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 5


@pytest.mark.skipif(not TOTALSEG.is_dir(), reason="../shared data not present")
def test_dicom_seg_on_shared_ct_series(tmp_path):
    """A real CT series whose anonymiser blanked SOP Class / Instance UIDs in the datasets."""
    series = TOTALSEG / "example_ct_dicom"
    ct = np.asarray(nib.load(convert_to_nifti(series, tmp_path / "ct.nii.gz")).dataobj)
    labels = np.where(ct > 300, 3, np.where(ct > 0, 1, 0)).astype(np.uint8)  # bone, soft
    path = write_dicom_seg(labels, series, tmp_path / "ct.seg.dcm",
                           [(1, "v=1"), (3, "v=3")], "kanseg test")
    seg = pydicom.dcmread(path)
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == ct.shape[2]
    assert np.array_equal(_seg_volume(seg, series), labels.transpose(2, 1, 0))
    with pytest.raises(ValueError, match=r"label values \[2\] have no segment"):
        write_dicom_seg(labels + (labels == 1), series, tmp_path / "bad.seg.dcm",
                        [(1, "v=1"), (3, "v=3")], "kanseg test")
