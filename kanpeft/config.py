"""The schema of ``kanpeft finetune`` YAML configs (see ``configs/peft_*.yaml``): loading with
``--set a.b=v`` overrides (kanseg's override parser) and saving beside an adapter."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml

from kanseg.config import apply_overrides, read_yaml
from kanseg.data import DataConfig
from kanseg.engine.config import LossConfig, TrainerConfig
from kanseg.files import atomic_write_text
from kanseg.schema import ConfigError, from_dict, to_dict

from .methods import METHODS

#: methods that are not PEFT: every parameter trains, or only the new head / decoder
BASELINES = ("full", "head")
#: the task config written beside an adapter (``kanpeft merge`` rebuilds the model from it)
TASK_CONFIG_NAME = "finetune.yaml"


@dataclass
class ClassificationData:
    """An NPZ file (``{split}_images`` / ``{split}_labels``, MedMNIST style) or an image folder
    with ``train/``, ``val/`` (and ``test/``) subfolders of one folder per class."""

    path: str = ""
    image_size: Optional[int] = None   # resize to a square side; null keeps the size
    batch_size: int = 64
    num_workers: int = 0
    max_train: Optional[int] = None    # a fixed random subset of N training images (CPU-small)


@dataclass
class PeftSection:
    """``method``: full | head | basis | scales | lora; ``options``: the method's options."""

    method: str = "scales"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in BASELINES and self.method not in METHODS:
            raise ValueError(f"method must be one of {list(BASELINES) + sorted(METHODS)}, "
                             f"got {self.method!r}")


@dataclass
class SegmentationSection:
    """Data (kanseg's data config), loss, and the widths of the smp U-Net decoder built on a
    classification backbone (one per decoder level; a segmentation network keeps its own)."""

    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    decoder_channels: list[int] = field(default_factory=lambda: [64, 32, 16, 8])


@dataclass
class FinetuneConfig:
    """One fine-tuning run. ``backbone``: a kanseg run, checkpoint or model folder, or a
    torch-conv-kan checkpoint folder / file / hub id (:func:`kanpeft.backbones.load_backbone`)."""

    task: Literal["classification", "segmentation"] = "classification"
    backbone: str = ""
    num_classes: int = 2
    peft: PeftSection = field(default_factory=PeftSection)
    classification: ClassificationData = field(default_factory=ClassificationData)
    segmentation: SegmentationSection = field(default_factory=SegmentationSection)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output_dir: str = "runs/peft"


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """Read a YAML fine-tuning config; ``overrides`` are ``dotted.key=yaml_value`` strings.
    Errors name the file and the key."""
    raw = apply_overrides(read_yaml(path), overrides)
    try:
        return from_dict(FinetuneConfig, raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def save_task_config(cfg: FinetuneConfig, directory: Path) -> None:
    """Write ``cfg`` as ``finetune.yaml`` in ``directory`` (atomically)."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / TASK_CONFIG_NAME, yaml.safe_dump(to_dict(cfg), sort_keys=False))
