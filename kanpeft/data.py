"""Classification data for ``kanpeft finetune``: an NPZ file (MedMNIST style) or an image folder,
as tensors of grayscale images in [0, 1] and integer labels. (Segmentation data is kanseg's.)"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from .config import ClassificationData


def _read_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    with np.load(path) as data:
        if f"{split}_images" not in data:
            return None
        return data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)


def _read_folder(path: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    from torchvision.datasets import ImageFolder

    if not (path / split).is_dir():
        return None
    folder = ImageFolder(str(path / split), loader=lambda p: np.asarray(_gray(p)))
    images = np.stack([img for img, _ in folder])
    return images, np.asarray(folder.targets)


def _gray(path: str):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("L")


def classification_split(cfg: ClassificationData, split: str) -> TensorDataset | None:
    """``(images (N, 1, H, W) in [0, 1], labels)`` of one split, or None if it is absent."""
    path = Path(cfg.path)
    if not path.exists():
        raise FileNotFoundError(f"classification.path {path} does not exist")
    arrays = _read_npz(path, split) if path.suffix == ".npz" else _read_folder(path, split)
    if arrays is None:
        return None
    images, labels = arrays
    if images.ndim != 3:
        raise ValueError(f"{path} [{split}]: expected grayscale images (N, H, W), got {images.shape}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    if cfg.image_size:
        x = nn.functional.interpolate(x, size=(cfg.image_size,) * 2, mode="bilinear",
                                      align_corners=False)
    y = torch.from_numpy(labels.astype(np.int64))
    if split == "train" and cfg.max_train:
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[: cfg.max_train]
        x, y = x[keep], y[keep]
    return TensorDataset(x, y)
