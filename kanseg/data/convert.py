"""Conversions with SimpleITK, keeping the geometry: DICOM series / NRRD / MHA / NIfTI ->
NIfTI, and any 3D dataset layout -> an nnU-Net v2 raw dataset folder.

SimpleITK keeps spacing, origin and direction cosines (LPS) and its NIfTI writer stores
them as the RAS qform/sform, so world coordinates of every voxel are preserved.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..files import atomic_write
from .config import BRATS_LAYOUTS, DataConfig
from .layouts import (
    BRATS_MODALITIES, NIFTI_SUFFIXES, DataError, LabelSpec, label_spec, load_cases,
    msd_dataset_json, nnunet_dataset_json, test_cases,
)
from .readers import dicom_series

if TYPE_CHECKING:  # SimpleITK is imported when a conversion runs, not with kanseg.data
    import SimpleITK as sitk


def dicom_series_files(folder: str | Path, series_id: str | None = None) -> list[str]:
    """The files of one DICOM series in ``folder`` (the only one, or the one named
    ``series_id``), in the slice order SimpleITK stacks them in."""
    import SimpleITK as sitk

    folder = str(folder)
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not ids:
        raise DataError(f"no DICOM series found in folder {folder}")
    if series_id is None and len(ids) > 1 or series_id is not None and series_id not in ids:
        problem = (f"holds {len(ids)} DICOM series; choose one with --series"
                   if series_id is None else f"holds no DICOM series {series_id!r}")
        listing = "".join(f"\n  {s}" for s in dicom_series(folder))
        raise DataError(f"{folder} {problem}; series found:{listing}")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_id or ids[0]))


def read_dicom_series(folder: str | Path, series_id: str | None = None) -> sitk.Image:
    """Read one DICOM series from ``folder`` (the only one, or the one named ``series_id``)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(dicom_series_files(folder, series_id))
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

    _write_image(image, out)
    return out


def _write_image(image: sitk.Image, path: Path) -> None:
    """Write ``image`` atomically in the format of ``path``'s extension (compressed)."""
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, useCompression=True), suffix)


# ----------------------------------------------------------------------------- nnU-Net
NNUNET_FOLDER = re.compile(r"Dataset\d{3}_[A-Za-z0-9_.-]+")
NNUNET_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")


def _channel_names(cfg: DataConfig, n_channels: int) -> list[str]:
    if cfg.layout in BRATS_LAYOUTS:
        return list(cfg.modalities or BRATS_MODALITIES[cfg.layout])
    if cfg.layout in ("msd", "nnunet"):
        table = msd_dataset_json(cfg.root)["modality"] if cfg.layout == "msd" \
            else nnunet_dataset_json(cfg.root)["channel_names"]
        return [str(table[k]) for k in sorted(table, key=int)]
    return list(cfg.modalities or [f"channel{i}" for i in range(n_channels)])


def _channels(files: str | list[str]) -> list[sitk.Image]:
    """One 3D image per channel: a list of files, or a 4D / vector-valued file split up."""
    import SimpleITK as sitk

    if isinstance(files, list):
        return [read_image(f) for f in files]
    image = read_image(files)
    if image.GetNumberOfComponentsPerPixel() > 1:
        return [sitk.VectorIndexSelectionCast(image, c)
                for c in range(image.GetNumberOfComponentsPerPixel())]
    if image.GetDimension() == 4:
        return [image[:, :, :, c] for c in range(image.GetSize()[3])]
    return [image]


def nnunet_labels_json(spec: LabelSpec) -> tuple[dict, dict[int, int], list[int] | None]:
    """``(dataset.json labels, raw value -> nnU-Net value, regions_class_order)``.

    nnU-Net wants consecutive values 0..n-1, so raw values are renumbered in order (BraTS 2021
    0, 1, 2, 4 -> 0, 1, 2, 3). Regions are listed from largest to smallest, as nnU-Net paints
    them; each paints the value it holds that no smaller region holds.
    """
    raw = sorted(spec.allowed_values)
    mapping = {v: i for i, v in enumerate(raw)}
    if spec.mode == "classes":
        labels = {name: mapping[v[0]] for name, v in zip(spec.names, spec.values)}
        labels.setdefault("background", 0)
        return labels, mapping, None
    regions = sorted(zip(spec.names, spec.values), key=lambda r: -len(r[1]))
    labels: dict = {"background": 0}
    order = []
    for rank, (name, values) in enumerate(regions):
        new = sorted(mapping[v] for v in values)
        labels[name] = new if len(new) > 1 else new[0]
        smaller = {mapping[v] for _, vals in regions[rank + 1:] for v in vals}
        order.append(min(set(new) - smaller or set(new)))
    return labels, mapping, order


def _write_label(src: str, path: Path, mapping: dict[int, int]) -> None:
    import SimpleITK as sitk

    image = read_image(src)
    raw = sitk.GetArrayFromImage(image)
    unknown = sorted(set(np.unique(raw).tolist()) - set(mapping))
    if unknown:
        raise DataError(f"{src}: label values {unknown[:10]} are not among the declared "
                        f"{sorted(mapping)} (run `kanseg data check`)")
    lut = np.zeros(max(mapping) + 1, dtype=np.uint8 if len(mapping) <= 256 else np.uint16)
    lut[list(mapping)] = list(mapping.values())
    out = sitk.GetImageFromArray(lut[raw.astype(np.int64)])
    out.CopyInformation(image)
    _write_image(out, path)


def convert_to_nnunet(cfg: DataConfig, out: str | Path, file_ending: str = ".nii.gz",
                      progress: bool = False) -> Path:
    """Write the dataset of ``cfg`` as an nnU-Net v2 raw folder ``out``
    (``Dataset<XXX>_<Name>``): ``imagesTr/<id>_<XXXX><ending>`` per channel,
    ``labelsTr/<id><ending>`` renumbered to 0..n-1, unlabelled cases in ``imagesTs/``, and a
    v2 ``dataset.json`` (regions with ``regions_class_order`` for region configs)."""
    from tqdm import tqdm

    out = Path(out)
    if not NNUNET_FOLDER.fullmatch(out.name):
        raise DataError(f"nnU-Net dataset folder {out.name!r} must be named "
                        "Dataset<three digits>_<Name>, e.g. Dataset501_BraTS")
    if file_ending not in NNUNET_ENDINGS:
        raise DataError(f"file ending {file_ending!r}: expected one of {NNUNET_ENDINGS}")
    if cfg.spatial_dims != 3:
        raise DataError(f"convert --to nnunet takes 3D datasets; layout {cfg.layout!r} has "
                        f"spatial_dims={cfg.spatial_dims}")
    labelled = [c for c in load_cases(cfg) if "label" in c]
    if not labelled:
        raise DataError(f"no labelled cases under {cfg.root!r} (layout {cfg.layout})")
    labels, mapping, order = nnunet_labels_json(label_spec(cfg))
    n_channels = 0
    cases = labelled + test_cases(cfg)
    for case in tqdm(cases, desc="converting cases", unit="case", disable=not progress):
        folder = "imagesTr" if "label" in case else "imagesTs"
        channels = _channels(case["image"])
        n_channels = n_channels or len(channels)
        if len(channels) != n_channels:
            raise DataError(f"case {case['id']}: {len(channels)} channels, the first case has "
                            f"{n_channels}")
        for c, image in enumerate(channels):
            _write_image(image, out / folder / f"{case['id']}_{c:04d}{file_ending}")
        if "label" in case:
            _write_label(case["label"], out / "labelsTr" / f"{case['id']}{file_ending}", mapping)
    meta = {"name": out.name.split("_", 1)[1],
            "description": f"converted by kanseg from layout {cfg.layout} at {cfg.root}",
            "channel_names": {str(i): n for i, n in enumerate(_channel_names(cfg, n_channels))},
            "labels": labels, "numTraining": len(labelled), "file_ending": file_ending}
    if order is not None:
        meta["regions_class_order"] = order
    atomic_write(out / "dataset.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return out
