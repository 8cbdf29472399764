"""Synthetic BraTS-like cases: a head with four MRI contrasts and a three-part tumour.

Everything is vectorised numpy (smooth random fields are upsampled with torch), so 20 cases
at 96^3 take a few seconds. The same ``seed`` always gives the same files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from .layouts import BRATS_CLASSES, BRATS_MODALITIES, BRATS_SEG, BRATS_SEP

# Mean intensity per tissue and modality (t1, t1ce, t2, flair), roughly like real MRI.
_TISSUES = ("background", "scalp", "skull", "csf", "grey", "white", "edema", "necrosis",
            "enhancing")
_CONTRAST = np.array([
    #  t1    t1ce  t2    flair
    [0.00, 0.00, 0.00, 0.00],  # background (air)
    [0.90, 0.90, 0.60, 0.70],  # scalp / fat
    [0.10, 0.10, 0.08, 0.08],  # skull
    [0.20, 0.22, 1.00, 0.10],  # csf
    [0.55, 0.58, 0.60, 0.62],  # grey matter
    [0.80, 0.82, 0.38, 0.45],  # white matter
    [0.45, 0.48, 0.85, 0.95],  # edema
    [0.25, 0.22, 0.92, 0.35],  # necrotic core
    [0.55, 1.00, 0.65, 0.75],  # enhancing rim
], dtype=np.float32)
_TISSUE = {name: i for i, name in enumerate(_TISSUES)}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: int) -> np.ndarray:
    """Smooth random field in about [-1, 1]: coarse Gaussian noise, trilinearly upsampled."""
    noise = torch.from_numpy(rng.standard_normal((1, 1, coarse, coarse, coarse)).astype(np.float32))
    field = F.interpolate(noise, size=shape, mode="trilinear", align_corners=True)[0, 0]
    return field.numpy() / 2.0


def _bias_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth multiplicative scanner bias (about 1 +- 0.15): a product of random 1D ramps."""
    t = np.linspace(-1, 1, size, dtype=np.float32)
    coefficients = rng.uniform(-1, 1, (3, 2)).astype(np.float32)
    x, y, z = (1.0 + 0.08 * (a * t + b * t**2) for a, b in coefficients)
    return x[:, None, None] * y[None, :, None] * z[None, None, :]


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation matrix (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _ellipsoid_distance(coords: np.ndarray, centre: np.ndarray, radii: np.ndarray,
                        rotation: np.ndarray | None = None) -> np.ndarray:
    """Normalised ellipsoid distance (< 1 inside) of ``coords`` (3, X, Y, Z)."""
    offset = coords - centre.astype(np.float32)[:, None, None, None]
    if rotation is not None:
        offset = np.einsum("ij,j...->i...", rotation.T.astype(np.float32), offset)
    scaled = offset / radii.astype(np.float32)[:, None, None, None]
    return np.sqrt(np.einsum("i...,i...->...", scaled, scaled))


def synth_case(size: int = 96, seed: int = 0, layout: str = "brats2021"
               ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One case: ({modality: float32 volume}, uint8 label volume, 4x4 affine)."""
    rng = np.random.default_rng(seed)
    shape = (size, size, size)
    coords = np.stack(np.meshgrid(*(np.linspace(-1, 1, size, dtype=np.float32),) * 3,
                                  indexing="ij"))
    wobble = 0.04 * _smooth_field(rng, shape, 6)  # irregular, brain-like outlines
    head_radii = np.array([0.78, 0.92, 0.80]) * rng.uniform(0.92, 1.05, 3)
    head = _ellipsoid_distance(coords, np.zeros(3), head_radii) + wobble
    tissue = np.zeros(shape, np.uint8)
    tissue[head < 1.0] = _TISSUE["scalp"]
    tissue[head < 0.93] = _TISSUE["skull"]
    tissue[head < 0.86] = _TISSUE["csf"]
    tissue[head < 0.82] = _TISSUE["grey"]
    gyri = 0.06 * _smooth_field(rng, shape, 12)  # folded grey/white boundary
    tissue[(head + gyri < 0.68)] = _TISSUE["white"]
    for side in (-1, 1):  # lateral ventricles
        centre = np.array([0.12 * side, rng.uniform(-0.05, 0.1), rng.uniform(0.0, 0.15)])
        radii = np.array([0.07, 0.30, 0.12]) * rng.uniform(0.8, 1.2, 3)
        tissue[_ellipsoid_distance(coords, centre, radii) + wobble < 1.0] = _TISSUE["csf"]
    brain = (head < 0.82)

    # Tumour: rotated, irregular nested ellipsoids inside the brain hemisphere.
    rotation = _rotation(rng)
    centre = rng.uniform(-0.3, 0.3, 3) * np.array([1.0, 1.2, 1.0]) \
        + np.array([rng.choice([-0.2, 0.2]), 0.0, 0.0])
    edema_radii = rng.uniform(0.25, 0.40, 3)
    core_radii = edema_radii * rng.uniform(0.5, 0.7)
    necrosis_radii = core_radii * rng.uniform(0.3, 0.55)
    bumps = 0.12 * _smooth_field(rng, shape, 5)
    label = np.zeros(shape, np.uint8)
    classes = dict(BRATS_CLASSES[layout])
    edema = (_ellipsoid_distance(coords, centre, edema_radii, rotation) + bumps < 1.0) & brain
    core = (_ellipsoid_distance(coords, centre, core_radii, rotation) + bumps / 2 < 1.0) & brain
    necrosis = (_ellipsoid_distance(coords, centre, necrosis_radii, rotation) + bumps / 2 < 1.0) \
        & core
    label[edema] = classes["ED"]
    label[core] = classes["ET"]
    label[necrosis] = classes["NCR"]
    tissue[edema] = _TISSUE["edema"]
    tissue[core] = _TISSUE["enhancing"]
    tissue[necrosis] = _TISSUE["necrosis"]

    texture = 1.0 + 0.05 * _smooth_field(rng, shape, 16)  # tissue inhomogeneity
    inside = head < 1.0
    images = {}
    for m, name in enumerate(BRATS_MODALITIES[layout]):
        contrast = _CONTRAST[:, m] * rng.uniform(0.9, 1.1, len(_TISSUES)).astype(np.float32)
        volume = contrast[tissue] * texture * _bias_field(rng, size)
        volume += 0.04 * rng.standard_normal(shape, dtype=np.float32) * inside
        # integer-valued like scanner data (compresses well); stored as float32
        images[name] = np.clip(np.round(volume * 1000.0), 0.0, None).astype(np.float32)

    return images, label, _affine(rng, size)


def _affine(rng: np.random.Generator, size: int) -> np.ndarray:
    """BraTS-like LPS-stored affine (x, y flipped), ~200 mm field of view, slight anisotropy."""
    spacing = 200.0 / size * np.array([1.0, 1.0, rng.uniform(1.0, 1.15)])
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    centre = (np.array([size, size, size]) - 1) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre + rng.uniform(-5, 5, 3)
    return affine


def case_id(layout: str, index: int) -> str:
    """BraTS-style case id: ``BraTS2021_00007`` or ``BraTS-GLI-00007-000``."""
    return f"BraTS2021_{index:05d}" if layout == "brats2021" else f"BraTS-GLI-{index:05d}-000"


def write_case(out: str | Path, index: int, size: int = 96, seed: int = 0,
               layout: str = "brats2021") -> Path:
    """Write case ``index`` (seeded by ``(seed, index)``) in the BraTS folder layout."""
    name = case_id(layout, index)
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    images, label, affine = synth_case(size, seed=int(np.random.SeedSequence([seed, index])
                                                       .generate_state(1)[0]), layout=layout)
    sep = BRATS_SEP[layout]
    for modality, volume in images.items():
        nib.save(nib.Nifti1Image(volume, affine), folder / f"{name}{sep}{modality}.nii.gz")
    seg = nib.Nifti1Image(label, affine)
    seg.set_data_dtype(np.uint8)
    nib.save(seg, folder / f"{name}{sep}{BRATS_SEG[layout]}.nii.gz")
    return folder


def write_dataset(out: str | Path, cases: int, size: int = 96, seed: int = 0,
                  layout: str = "brats2021") -> Iterator[Path]:
    """Write ``cases`` cases under ``out``; yields each case folder (for progress bars)."""
    if layout not in BRATS_MODALITIES:
        raise ValueError(f"layout must be one of {sorted(BRATS_MODALITIES)}, got {layout!r}")
    if size < 16:
        raise ValueError(f"size must be >= 16 voxels, got {size}")
    for index in range(cases):
        yield write_case(out, index, size, seed, layout)
