"""Datasets and loaders from a :class:`DataConfig` (MONAI Dataset / CacheDataset /
PersistentDataset by ``cache`` mode, MONAI DataLoader)."""
from __future__ import annotations

from pathlib import Path

from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.transforms import Compose

from .config import DataConfig
from .layouts import DataError, load_cases, split_cases
from .transforms import build_transforms


def make_dataset(cases: list[dict], transform: Compose, cfg: DataConfig,
                 subset: str = "train") -> Dataset:
    """Wrap ``cases`` with ``transform`` using the configured cache mode.

    ``memory`` caches the deterministic prefix of ``transform`` in RAM; ``disk`` stores it
    under ``cache_dir/<subset>`` (hashed per case) and re-uses it across runs.
    """
    if cfg.cache == "memory":
        # one thread: MONAI image readers are not thread-safe (multi-file cases got loaded
        # with a single channel now and then with a thread pool; MONAI issue #1025)
        return CacheDataset(cases, transform, cache_rate=1.0, num_workers=1,
                            progress=len(cases) > 20)
    if cfg.cache == "disk":
        folder = Path(cfg.cache_dir or "") / subset
        folder.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(cases, transform, cache_dir=folder)
    return Dataset(cases, transform)


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """(train, val) datasets for the configured split; raises DataError if train is empty."""
    train_cases, val_cases = split_cases(load_cases(cfg), cfg)
    if not train_cases:
        raise DataError(f"no labelled training cases found under {cfg.root!r} "
                        f"(layout {cfg.layout}); run `kanseg data check` for details")
    train_tf = build_transforms(cfg, "train")
    train_tf.set_random_state(seed=cfg.seed)
    return (make_dataset(train_cases, train_tf, cfg, "train"),
            make_dataset(val_cases, build_transforms(cfg, "val"), cfg, "val"))


def build_loaders(cfg: DataConfig) -> tuple[DataLoader, DataLoader]:
    """(train_loader, val_loader): shuffled patch batches of ``batch_size *
    samples_per_case``; validation yields whole volumes one at a time (batch 1)."""
    train_ds, val_ds = build_datasets(cfg)
    persistent = cfg.num_workers > 0
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True,
                              num_workers=cfg.num_workers, persistent_workers=persistent,
                              drop_last=False)
    val_loader = DataLoader(val_ds, batch_size=1, shuffle=False, num_workers=cfg.num_workers,
                            persistent_workers=persistent)
    return train_loader, val_loader
