"""The ``data`` section of a kanseg config.

Build it from a plain mapping with ``kanseg.schema.from_dict(DataConfig, mapping, "data")``;
cross-field rules live in ``__post_init__`` so bad combinations fail with the key named.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

Layout = Literal["brats2021", "brats2023", "msd", "datalist", "folder2d", "nnunet"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
BRATS_LAYOUTS = ("brats2021", "brats2023")


@dataclass
class AugmentConfig:
    """Random augmentation applied to training patches (probabilities are per sample)."""

    enabled: bool = True
    flip_prob: float = 0.5  # per spatial axis
    rotate90_prob: float = 0.0  # quarter turns in the first two spatial axes
    rotate_prob: float = 0.2
    rotate_degrees: float = 15.0  # uniform in [-d, d] around every axis (one axis in 2D)
    zoom_prob: float = 0.2
    zoom_range: tuple[float, float] = (0.9, 1.1)
    intensity_shift_prob: float = 0.5
    intensity_shift: float = 0.1  # offsets uniform in [-s, s]
    intensity_scale_prob: float = 0.5
    intensity_scale: float = 0.1  # factors uniform in [1 - s, 1 + s]
    noise_prob: float = 0.1
    noise_std: float = 0.1

    def __post_init__(self) -> None:
        for name in ("flip_prob", "rotate90_prob", "rotate_prob", "zoom_prob",
                     "intensity_shift_prob", "intensity_scale_prob", "noise_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augment.{name} must be a probability in [0, 1], got {value}")
        lo, hi = self.zoom_range
        if not 0 < lo <= hi:
            raise ValueError(f"augment.zoom_range must be [min, max] with 0 < min <= max, "
                             f"got {list(self.zoom_range)}")
        for name in ("rotate_degrees", "intensity_shift", "intensity_scale", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class DataConfig:
    """Where the data is, how it is split, pre-processed, sampled, augmented and cached.

    Label handling:
      * ``label_mode="regions"``: one sigmoid output channel per entry of ``regions``
        (name -> raw label values). BraTS layouts default to TC/WT/ET.
      * ``label_mode="classes"``: softmax over ``labels`` (class names, background first);
        ``label_values`` are the raw values in the files (default 0..n-1), mapped to 0..n-1.
        ``mask_threshold`` binarises anti-aliased masks (value >= threshold -> 1) first.
      * ``label_mode=null``: regions for BraTS layouts; for ``nnunet`` what its
        ``dataset.json`` declares (regions when a label is a list of values); else classes.
      * ``nnunet``: ``labels``/``regions`` left null come from ``dataset.json``.
    """

    root: str = ""
    layout: Layout = "brats2021"
    spatial_dims: Literal[2, 3] = 3
    label_mode: Optional[Literal["regions", "classes"]] = None
    labels: Optional[list[str]] = None
    label_values: Optional[list[int]] = None
    regions: Optional[dict[str, list[int]]] = None
    mask_threshold: Optional[float] = None
    # BraTS: modality suffixes (order = channel order); datalist CSV: image column names;
    # folder2d: ["gray"] (default) or three names to keep RGB.
    modalities: Optional[list[str]] = None
    datalist: Optional[str] = None  # JSON / CSV file for layout "datalist"
    # splits: explicit case lists win, then a "fold" field in the datalist, then seeded folds
    fold: Optional[int] = 0  # null -> a seeded random val_fraction split
    num_folds: int = 5
    seed: int = 0
    val_fraction: float = 0.2
    train_cases: Optional[list[str]] = None
    val_cases: Optional[list[str]] = None
    # pre-processing
    orientation: Optional[str] = "RAS"
    spacing: Optional[list[float]] = None
    crop_foreground: bool = True
    intensity: Literal["mri", "ct", "none"] = "mri"
    ct_window: tuple[float, float] = (-175.0, 250.0)
    # patch sampling and loading
    patch_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    sampling: Literal["random", "balanced"] = "balanced"
    pos_neg_ratio: float = 1.0  # balanced: P(patch centred on foreground) = r / (r + 1)
    samples_per_case: int = 1
    batch_size: int = 2
    num_workers: int = 0
    cache: Literal["none", "memory", "disk"] = "none"
    cache_dir: Optional[str] = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        n = self.spatial_dims
        if len(self.patch_size) != n or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must have {n} positive sizes for spatial_dims={n}, "
                             f"got {self.patch_size}")
        if self.spacing is not None and (len(self.spacing) != n or min(self.spacing) <= 0):
            raise ValueError(f"spacing must be null or {n} positive values, got {self.spacing}")
        if self.orientation is not None and (
            len(self.orientation) < n or set(self.orientation.upper()) - set("LRAPSI")
        ):
            raise ValueError(f"orientation must be null or axis codes like 'RAS', "
                             f"got {self.orientation!r}")
        if self.layout in BRATS_LAYOUTS and n != 3:
            raise ValueError(f"layout {self.layout!r} is 3D: set spatial_dims to 3")
        if self.layout == "datalist" and not self.datalist:
            raise ValueError("layout 'datalist' needs the key 'datalist' (a .json or .csv file)")
        if self.num_folds < 2:
            raise ValueError(f"num_folds must be >= 2, got {self.num_folds}")
        if self.fold is not None and not 0 <= self.fold < self.num_folds:
            raise ValueError(f"fold must be in [0, {self.num_folds - 1}] or null, got {self.fold}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.labels is not None and self.label_values is not None \
                and len(self.labels) != len(self.label_values):
            raise ValueError(f"labels ({len(self.labels)} names) and label_values "
                             f"({len(self.label_values)} values) must have the same length")
        if self.mask_threshold is not None and self.resolved_label_mode == "regions":
            raise ValueError("mask_threshold is only for label_mode 'classes'")
        if self.resolved_label_mode == "regions" and self.regions is None \
                and self.layout not in (*BRATS_LAYOUTS, "nnunet"):
            raise ValueError(f"label_mode 'regions' with layout {self.layout!r} needs "
                             "'regions' (name -> list of label values)")
        lo, hi = self.ct_window
        if lo >= hi:
            raise ValueError(f"ct_window must be [low, high] with low < high, "
                             f"got {list(self.ct_window)}")
        if self.pos_neg_ratio < 0:
            raise ValueError(f"pos_neg_ratio must be >= 0, got {self.pos_neg_ratio}")
        for name in ("samples_per_case", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.cache == "disk" and not self.cache_dir:
            raise ValueError("cache 'disk' needs 'cache_dir' (a folder for the cached volumes)")

    @property
    def resolved_label_mode(self) -> Optional[str]:
        """``label_mode`` with ``null`` resolved (regions for BraTS, classes otherwise);
        ``None`` for ``nnunet``, whose ``dataset.json`` decides (see ``label_spec``)."""
        if self.label_mode is not None:
            return self.label_mode
        if self.layout == "nnunet":
            return None
        return "regions" if self.layout in BRATS_LAYOUTS else "classes"
