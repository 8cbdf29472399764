"""DICOM series / NRRD / MHA / NIfTI -> NIfTI with SimpleITK, keeping the geometry.

SimpleITK keeps spacing, origin and direction cosines (LPS) and its NIfTI writer stores
them as the RAS qform/sform, so world coordinates of every voxel are preserved.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .layouts import NIFTI_SUFFIXES, DataError

if TYPE_CHECKING:  # SimpleITK is imported when a conversion runs, not with kanseg.data
    import SimpleITK as sitk


def read_dicom_series(folder: str | Path, series_id: str | None = None) -> sitk.Image:
    """Read one DICOM series from ``folder`` (the only one, or the one named ``series_id``)."""
    import SimpleITK as sitk

    folder = str(folder)
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not ids:
        raise DataError(f"no DICOM series found in folder {folder}")
    if series_id is None and len(ids) > 1:
        raise DataError(f"{folder} holds {len(ids)} DICOM series; choose one with "
                        f"--series: {', '.join(ids)}")
    if series_id is not None and series_id not in ids:
        raise DataError(f"DICOM series {series_id!r} is not in {folder}; found {', '.join(ids)}")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_id or ids[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def read_image(src: str | Path, series_id: str | None = None) -> sitk.Image:
    """Read a DICOM series folder or any single file SimpleITK can read (NRRD, MHA, NIfTI)."""
    import SimpleITK as sitk

    path = Path(src)
    if path.is_dir():
        return read_dicom_series(path, series_id)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise DataError(f"cannot read {path} with SimpleITK: {str(err).strip()}") from None


def _output_path(src: Path, dst: Path) -> Path:
    if str(dst).endswith(NIFTI_SUFFIXES):
        return dst
    if dst.suffix:
        raise DataError(f"destination {dst} must end in .nii.gz or .nii, or be a folder")
    name = src.name
    for suffix in (*NIFTI_SUFFIXES, ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return dst / f"{name}.nii.gz"


def convert_to_nifti(src: str | Path, dst: str | Path, series_id: str | None = None) -> Path:
    """Convert ``src`` to NIfTI at ``dst`` (a ``.nii.gz`` file, or a folder to put it in).

    The file is written atomically (temporary name, then rename). Returns the written path.
    """
    src, dst = Path(src), Path(dst)
    out = _output_path(src, dst)
    image = read_image(src, series_id)
    import SimpleITK as sitk

    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if out.name.endswith(".nii.gz") else ".nii"
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}{suffix}")
    try:
        sitk.WriteImage(image, str(tmp), useCompression=suffix == ".nii.gz")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
