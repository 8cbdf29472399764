"""A MONAI image reader backed by SimpleITK, for ``.mha`` / ``.mhd`` / ``.nrrd`` / ``.nhdr``,
and the listing of the DICOM series in a folder (:func:`dicom_series`).

MONAI's own ``ITKReader`` needs the large ``itk`` package; SimpleITK is already a dependency.
Arrays come out in (x, y, z) order with a RAS affine, like MONAI's NIfTI reader, so the same
pipeline (orientation, spacing, inversion) applies to every format.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from monai.data import ImageReader
from monai.data.image_reader import _copy_compatible_dict, _stack_images
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
SERIES_DESCRIPTION = "0008|103e"


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of a folder."""

    uid: str  # SeriesInstanceUID, as GDCM groups the files
    description: str  # SeriesDescription ("" when the files have none)
    files: int

    def __str__(self) -> str:
        return f"{self.uid} ({self.description or 'no description'}, {self.files} files)"


def dicom_series(folder: str | Path) -> list[DicomSeries]:
    """Every DICOM series GDCM finds in ``folder`` (not its subfolders); none: ``[]``."""
    import SimpleITK as sitk

    found = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        header = sitk.ImageFileReader()
        header.SetFileName(files[0])
        header.ReadImageInformation()
        description = header.GetMetaData(SERIES_DESCRIPTION).strip() \
            if header.HasMetaDataKey(SERIES_DESCRIPTION) else ""
        found.append(DicomSeries(uid, description, len(files)))
    return found


def sitk_affine(image: Any) -> np.ndarray:
    """The RAS voxel-to-world affine of a SimpleITK image (ITK stores LPS)."""
    dims = image.GetDimension()
    direction = np.array(image.GetDirection()).reshape(dims, dims)
    affine = np.eye(dims + 1)
    affine[:dims, :dims] = direction @ np.diag(image.GetSpacing())
    affine[:dims, -1] = image.GetOrigin()
    affine[:min(dims, 2)] *= -1.0  # LPS -> RAS flips the first two world axes
    return affine


class SimpleITKReader(ImageReader):
    """Read scalar or vector images with SimpleITK; vector components become the last axis."""

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        return all(str(f).lower().endswith(SITK_SUFFIXES) for f in ensure_tuple(filename))

    def read(self, data: Sequence[str] | str, **kwargs: Any) -> Any:
        import SimpleITK as sitk

        images = [sitk.ReadImage(str(Path(f))) for f in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        import SimpleITK as sitk

        arrays, meta = [], {}
        for image in img if isinstance(img, list) else [img]:
            array = sitk.GetArrayFromImage(image)  # (z, y, x[, c])
            dims = image.GetDimension()
            vector = image.GetNumberOfComponentsPerPixel() > 1
            array = (np.moveaxis(array, -1, 0) if vector else array).T  # (x, y, z[, c])
            header = {"spacing": np.asarray(image.GetSpacing())}
            header[MetaKeys.ORIGINAL_AFFINE] = sitk_affine(image)
            header[MetaKeys.AFFINE] = header[MetaKeys.ORIGINAL_AFFINE].copy()
            header[MetaKeys.SPACE] = SpaceKeys.RAS
            header[MetaKeys.SPATIAL_SHAPE] = np.asarray(image.GetSize()[:dims])
            header[MetaKeys.ORIGINAL_CHANNEL_DIM] = -1 if vector else float("nan")
            arrays.append(np.ascontiguousarray(array))
            _copy_compatible_dict(header, meta)
        return _stack_images(arrays, meta), meta
