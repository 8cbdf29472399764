"""Config -> MONAI ``Compose`` for ``train`` / ``val`` / ``infer`` (dict transforms, 2D and 3D).

Keys: ``"image"`` (float32, channel first) and ``"label"`` (float32: one 0/1 channel per
region, or one channel of class indices 0..n-1). Deterministic steps come first so that
``CacheDataset``/``PersistentDataset`` cache them; random steps follow.

Inverting predictions (inference): the ``val``/``infer`` pipelines keep MetaTensor
metadata and the applied-operation stack of ``"image"`` (orientation, spacing, foreground
crop). Put the network output under ``"pred"`` in the same dict (a batch decollated with
``monai.data.decollate_batch``) and apply ``prediction_inverter(transform)`` — i.e.
``Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=False)`` — to
get ``"pred"`` back on the input's grid and affine, then e.g. ``SaveImaged``.
"""
from __future__ import annotations

import math
import warnings
from typing import Hashable, Literal, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import PILReader
from monai.transforms import (
    AsDiscreted,
    Compose,
    CropForegroundd,
    Invertd,
    LoadImaged,
    MapLabelValued,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
    RandZoomd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from PIL import Image

from .config import DataConfig
from .layouts import input_channels, label_spec
from .readers import SimpleITKReader

Mode = Literal["train", "val", "infer"]


class LabelsToRegionsd(MapTransform):
    """Raw label map (1 channel) -> one 0/1 channel per region (region = set of raw values).

    With BraTS 2021 regions ``{"TC": [1, 4], "WT": [1, 2, 4], "ET": [4]}`` this is the
    usual tumour core / whole tumour / enhancing tumour conversion; BraTS 2023 uses 3 for ET.
    """

    def __init__(self, keys: KeysCollection, regions: Sequence[Sequence[int]],
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.regions = [list(r) for r in regions]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            if label.shape[0] != 1:
                raise ValueError(f"LabelsToRegionsd: '{key}' must have 1 channel, "
                                 f"got shape {tuple(label.shape)}")
            channels = [torch.isin(label[0], torch.as_tensor(r, device=label.device))
                        for r in self.regions]
            out = torch.stack(channels).to(torch.float32)
            if hasattr(label, "copy_meta_from"):  # keep affine / metadata of a MetaTensor
                out = type(label)(out)
                out.copy_meta_from(label, copy_attr=False)
            d[key] = out
        return d


def _grayscale(image: Image.Image) -> Image.Image:
    return image.convert("L")


def _rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def _mask_mode(image: Image.Image) -> Image.Image:
    """Colour masks -> luminance; palette / grey / 16-bit masks keep their raw values."""
    return image.convert("L") if image.mode in ("RGB", "RGBA", "LA") else image


def _loaders(cfg: DataConfig, keys: list[str]) -> list:
    if cfg.spatial_dims == 3:
        loader = LoadImaged(keys, image_only=True, ensure_channel_first=True, dtype=np.float32)
        loader.register(SimpleITKReader())  # .mha / .nrrd without the itk package
        return [loader]
    image_reader = PILReader(converter=_grayscale if input_channels(cfg) == 1 else _rgb)
    loaders = [LoadImaged("image", reader=image_reader, image_only=True,
                          ensure_channel_first=True, dtype=np.float32)]
    if "label" in keys:
        loaders.append(LoadImaged("label", reader=PILReader(converter=_mask_mode),
                                  image_only=True, ensure_channel_first=True, dtype=np.float32))
    return loaders


def _label_transforms(cfg: DataConfig) -> list:
    spec = label_spec(cfg)
    if spec.mode == "regions":
        return [LabelsToRegionsd("label", spec.values)]
    steps: list = []
    if cfg.mask_threshold is not None:
        steps.append(AsDiscreted("label", threshold=cfg.mask_threshold))
    raw = [v[0] for v in spec.values]
    if raw != list(range(len(raw))):
        steps.append(MapLabelValued("label", orig_labels=raw, target_labels=range(len(raw)),
                                    dtype=np.float32))
    return steps


def _intensity(cfg: DataConfig) -> list:
    if cfg.intensity == "mri":
        return [NormalizeIntensityd("image", nonzero=True, channel_wise=True)]
    if cfg.intensity == "ct":
        lo, hi = cfg.ct_window
        return [ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0,
                                     clip=True)]
    return []


def preprocessing(cfg: DataConfig, keys: Sequence[str] = ("image", "label")) -> list:
    """Deterministic steps: load, labels, orientation, spacing, foreground crop, intensity."""
    keys = list(keys)
    n_keys = len(keys)
    interp = ["bilinear"] + ["nearest"] * (n_keys - 1)
    with warnings.catch_warnings():  # with pydicom (for DICOM-SEG) installed, MONAI's
        warnings.filterwarnings("ignore", "NvImgCodecPydicomReader")  # loaders warn: no GPU codec
        steps = _loaders(cfg, keys)
    if "label" in keys:
        steps += _label_transforms(cfg)
    if cfg.orientation:
        steps.append(Orientationd(keys, axcodes=cfg.orientation.upper()[: cfg.spatial_dims],
                                 labels=None))
    if cfg.spacing:
        steps.append(Spacingd(keys, pixdim=cfg.spacing, mode=interp))
    crop = [CropForegroundd(keys, source_key="image", allow_smaller=True)] \
        if cfg.crop_foreground else []
    # CT: window first so that air (< window) is 0 and cropped; MRI: crop before z-scoring.
    steps += _intensity(cfg) + crop if cfg.intensity == "ct" else crop + _intensity(cfg)
    return steps


def _sampling(cfg: DataConfig) -> list:
    keys = ["image", "label"]
    steps: list = [SpatialPadd(keys, spatial_size=cfg.patch_size)]
    if cfg.sampling == "balanced":
        steps.append(RandCropByPosNegLabeld(
            keys, label_key="label", spatial_size=cfg.patch_size, pos=cfg.pos_neg_ratio, neg=1.0,
            num_samples=cfg.samples_per_case, allow_smaller=False))
    else:
        steps.append(RandSpatialCropSamplesd(keys, roi_size=cfg.patch_size,
                                             num_samples=cfg.samples_per_case,
                                             random_size=False))
    return steps


def _augmentation(cfg: DataConfig) -> list:
    a, keys = cfg.augment, ["image", "label"]
    if not a.enabled:
        return []
    steps: list = []
    if a.flip_prob > 0:
        steps += [RandFlipd(keys, prob=a.flip_prob, spatial_axis=axis)
                  for axis in range(cfg.spatial_dims)]
    if a.rotate90_prob > 0:
        steps.append(RandRotate90d(keys, prob=a.rotate90_prob, spatial_axes=(0, 1)))
    if a.rotate_prob > 0 and a.rotate_degrees > 0:
        r = math.radians(a.rotate_degrees)
        ranges = {"range_x": r} if cfg.spatial_dims == 2 else \
            {"range_x": r, "range_y": r, "range_z": r}
        steps.append(RandRotated(keys, prob=a.rotate_prob, mode=["bilinear", "nearest"],
                                 padding_mode="zeros", **ranges))
    if a.zoom_prob > 0:
        steps.append(RandZoomd(keys, prob=a.zoom_prob, min_zoom=a.zoom_range[0],
                               max_zoom=a.zoom_range[1], mode=["bilinear", "nearest"],
                               keep_size=True))
    if a.intensity_scale_prob > 0:
        steps.append(RandScaleIntensityd("image", factors=a.intensity_scale,
                                         prob=a.intensity_scale_prob))
    if a.intensity_shift_prob > 0:
        steps.append(RandShiftIntensityd("image", offsets=a.intensity_shift,
                                         prob=a.intensity_shift_prob))
    if a.noise_prob > 0:
        steps.append(RandGaussianNoised("image", prob=a.noise_prob, std=a.noise_std))
    return steps


def build_transforms(cfg: DataConfig, mode: Mode) -> Compose:
    """The MONAI pipeline for ``train`` (patches, augmented), ``val`` (whole image + label)
    or ``infer`` (whole image only; invertible with :func:`prediction_inverter`)."""
    if mode == "train":
        steps = preprocessing(cfg) + _sampling(cfg) + _augmentation(cfg)
    elif mode == "val":
        steps = preprocessing(cfg)
    elif mode == "infer":
        steps = preprocessing(cfg, keys=["image"])
    else:
        raise ValueError(f"mode must be 'train', 'val' or 'infer', got {mode!r}")
    return Compose(steps)


def prediction_inverter(transform: Compose, key: str = "pred", nearest: bool = False) -> Invertd:
    """``Invertd`` that maps ``key`` back through the inverse of ``transform`` applied to
    ``"image"`` (undoing foreground crop, spacing and orientation). Use ``nearest=True`` for
    discrete label maps, ``False`` for probabilities."""
    return Invertd(keys=key, transform=transform, orig_keys="image",
                   nearest_interp=nearest, to_tensor=True)
