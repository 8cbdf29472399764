"""Dataset checks: every problem of every case, with the file it concerns.

Errors (training refuses to start): empty dataset, missing modality or label, unreadable or
corrupt file, image/label shape or affine mismatch, label values outside the declared set,
NaN/Inf voxels, duplicate case ids, more dimensions or channels than the network takes (a 4D
file where one 3D volume is expected). Warnings: unusual voxel spacing, empty label maps,
images smaller than the patch size, MSD dataset.json entries outside the dataset root, an
empty validation split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from .config import DataConfig
from .layouts import (
    NIFTI_SUFFIXES, DataError, input_channels, label_spec, load_cases, split_cases,
)
from .readers import sitk_affine

Severity = Literal["error", "warning"]
SPACING_RANGE_MM = (0.2, 8.0)
MAX_ANISOTROPY = 5.0


@dataclass
class Issue:
    severity: Severity
    where: str  # file (or dataset root) the problem concerns
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper():7s} {self.where}: {self.message}"


@dataclass
class CheckReport:
    """Outcome of :func:`check_dataset`; ``ok`` is False when there is any error."""

    cases: int = 0
    issues: list[Issue] = field(default_factory=list)

    def add(self, severity: Severity, where: str | Path, message: str) -> None:
        self.issues.append(Issue(severity, str(where), message))

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        lines = [str(i) for i in self.errors + self.warnings]
        lines.append(f"{self.cases} cases checked: {len(self.errors)} errors, "
                     f"{len(self.warnings)} warnings")
        return "\n".join(lines)

    def raise_if_errors(self) -> None:
        """Raise :class:`DataError` listing every error (for the trainer)."""
        if not self.ok:
            raise DataError("dataset check failed:\n" + "\n".join(map(str, self.errors)))


@dataclass
class _Volume:
    data: np.ndarray
    affine: np.ndarray | None  # None for 2D bitmaps (no geometry)
    spatial_shape: tuple[int, ...]


def _read(path: Path, spatial_dims: int, is_label: bool) -> _Volume:
    """Read voxels and geometry; channels (4D NIfTI, RGB) do not count as spatial."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
        return _Volume(data, image.affine, tuple(data.shape[:spatial_dims]))
    if spatial_dims == 2 and name.endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")):
        from PIL import Image

        with Image.open(path) as image:
            if is_label and image.mode in ("RGB", "RGBA", "LA"):
                image = image.convert("L")
            data = np.asarray(image)
        return _Volume(data, None, tuple(data.shape[:2]))
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    data = sitk.GetArrayFromImage(image)  # (z, y, x[, c])
    return _Volume(data, sitk_affine(image), tuple(image.GetSize()[:spatial_dims]))


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(affine[:-1, :-1], axis=0)


def _check_values(report: CheckReport, path: Path, vol: _Volume) -> bool:
    if np.issubdtype(vol.data.dtype, np.floating) and not np.isfinite(vol.data).all():
        bad = int((~np.isfinite(vol.data)).sum())
        report.add("error", path, f"{bad} NaN/Inf voxels")
        return False
    return True


def _check_geometry(report: CheckReport, path: Path, vol: _Volume, ref: _Volume | None,
                    ref_path: Path | None) -> None:
    if ref is not None and ref_path is not None:
        if vol.spatial_shape != ref.spatial_shape:
            report.add("error", path, f"shape {vol.spatial_shape} does not match "
                                      f"{ref.spatial_shape} of {ref_path.name}")
        elif vol.affine is not None and ref.affine is not None and \
                not np.allclose(vol.affine, ref.affine, atol=1e-3, rtol=1e-4):
            diff = np.abs(vol.affine - ref.affine).max()
            report.add("error", path, f"affine does not match {ref_path.name} "
                                      f"(max difference {diff:.4g})")
    if vol.affine is not None and ref is None:
        spacing = _spacing(vol.affine)
        lo, hi = SPACING_RANGE_MM
        anisotropy = spacing.max() / spacing.min()
        if spacing.min() < lo or spacing.max() > hi or anisotropy > MAX_ANISOTROPY:
            report.add("warning", path, f"unusual voxel spacing {np.round(spacing, 3).tolist()} mm")


def _check_label(report: CheckReport, path: Path, vol: _Volume, allowed: set[int] | None) -> None:
    values = np.unique(vol.data)
    if allowed is not None:
        outside = [v for v in values.tolist() if v not in allowed]
        if outside:
            report.add("error", path, f"label values {outside[:10]} outside the declared set "
                                      f"{sorted(allowed)} (declare labels/label_values, or "
                                      "mask_threshold for anti-aliased masks)")
    if values.size == 1 and values[0] == 0:
        report.add("warning", path, "label map is empty (background only)")


def _channels(shape: tuple[int, ...], spatial_dims: int) -> int:
    """Values per voxel: the product of the non-spatial dimensions (1 for a plain volume)."""
    return int(np.prod(shape[spatial_dims:], dtype=np.int64))


def _check_size(report: CheckReport, path: Path, case_id: str, vol: _Volume,
                cfg: DataConfig) -> None:
    """Warn when the (resampled) image is smaller than the patch size along some axis."""
    shape = np.array(vol.spatial_shape, dtype=float)
    if cfg.spacing is not None and vol.affine is not None:
        shape = shape * _spacing(vol.affine)[:cfg.spatial_dims] / np.array(cfg.spacing)
    if (shape < np.array(cfg.patch_size)).any():
        report.add("warning", path, f"case {case_id}: image shape {list(vol.spatial_shape)} "
                                    f"(~{np.round(shape).astype(int).tolist()} at data.spacing) "
                                    f"is smaller than data.patch_size {cfg.patch_size}; "
                                    "patches are padded")


def check_case(report: CheckReport, case: dict, cfg: DataConfig, allowed: set[int] | None,
               channels: int | None = None) -> None:
    """Add the problems of one case's files to ``report``; ``channels``: the number of image
    channels the network takes (None: not checked)."""
    images = case["image"] if isinstance(case["image"], list) else [case["image"]]
    ref: _Volume | None = None
    ref_path: Path | None = None
    shapes: list[tuple[int, ...]] = []
    for image in images + ([case["label"]] if "label" in case else []):
        path = Path(image)
        is_label = image == case.get("label")
        kind = "label" if is_label else "image / modality"
        if not path.is_file():
            report.add("error", path, f"missing {kind} file (case {case['id']})")
            continue
        try:
            vol = _read(path, cfg.spatial_dims, is_label)
        except Exception as err:  # any reader failure means the file is unusable
            report.add("error", path, f"unreadable or corrupt {kind} file: "
                                      f"{type(err).__name__}: {err}")
            continue
        if len(vol.spatial_shape) < cfg.spatial_dims:
            report.add("error", path, f"has {vol.data.ndim} dimensions, expected at least "
                                      f"{cfg.spatial_dims} spatial dimensions")
            continue
        if vol.affine is not None and _channels(vol.data.shape, cfg.spatial_dims) > 1 and is_label:
            report.add("error", path, f"label shape {vol.data.shape} is not a "
                                      f"{cfg.spatial_dims}D label map")
            continue
        if vol.affine is not None and not is_label:
            shapes.append(vol.data.shape)
        if not _check_values(report, path, vol):
            continue
        _check_geometry(report, path, vol, ref, ref_path)
        if ref is None:
            ref, ref_path = vol, path
            _check_size(report, path, case["id"], vol, cfg)
        if is_label:
            _check_label(report, path, vol, allowed)
    given = sum(_channels(s, cfg.spatial_dims) for s in shapes)
    if channels is not None and len(shapes) == len(images) and given != channels:
        report.add("error", images[0], f"case {case['id']}: image shape(s) {shapes} give "
                                       f"{given} channel(s), expected {channels} (one "
                                       f"{cfg.spatial_dims}D volume per modality)")


def _check_inside(report: CheckReport, case: dict, root: Path) -> None:
    """Warn about files of a case that lie outside ``root`` (a ``../`` dataset.json entry)."""
    images = case["image"] if isinstance(case["image"], list) else [case["image"]]
    for file in images + ([case["label"]] if "label" in case else []):
        if not Path(file).is_relative_to(root):
            report.add("warning", file, f"case {case['id']}: the dataset.json entry points "
                                        f"outside the dataset root {root}")


def check_dataset(cfg: DataConfig, progress: bool = False) -> CheckReport:
    """Check every case of the configured dataset (reads every file once)."""
    report = CheckReport()
    where = cfg.datalist if cfg.layout == "datalist" else cfg.root
    try:
        cases = load_cases(cfg)
        spec = label_spec(cfg)
    except DataError as err:
        report.add("error", where or "<root>", str(err))
        return report
    report.cases = len(cases)
    if not cases:
        report.add("error", where, f"empty dataset: no cases found for layout {cfg.layout}")
        return report
    allowed = None if cfg.mask_threshold is not None else spec.allowed_values
    channels = input_channels(cfg)
    seen: set[str] = set()
    for case in tqdm(cases, desc="checking cases", disable=not progress):
        if case["id"] in seen:
            report.add("error", case["image"] if isinstance(case["image"], str)
                       else case["image"][0], f"duplicate case id {case['id']!r}")
        seen.add(case["id"])
        if "label" not in case:
            report.add("warning", case["image"] if isinstance(case["image"], str)
                       else case["image"][0], f"case {case['id']} has no label (inference only)")
        check_case(report, case, cfg, allowed, channels)
        if cfg.layout == "msd":
            _check_inside(report, case, Path(cfg.root).resolve())
    try:
        _, val = split_cases(cases, cfg)
        if not val:
            report.add("warning", where, "the validation split is empty")
    except DataError as err:
        report.add("error", where, str(err))
    return report
