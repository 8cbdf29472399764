"""Training a prepared model on the shared Accelerate trainer: attaching the method (or a
baseline), and the classification and segmentation runs with their final metrics."""
from __future__ import annotations

import resource
import sys
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

from kanseg.data import build_loaders, label_spec
from kanseg.engine.config import TrainerConfig
from kanseg.engine.losses import build_loss
from kanseg.engine.trainer import Trainer
from kanseg.engine.validation import SegmentationValidator
from kanseg.schema import from_dict

from .api import prepare
from .config import ClassificationData, PeftSection, SegmentationSection
from .data import classification_split
from .methods.common import AdapterConfig, freeze_except
from .metrics import ClassificationValidator, classification_metrics


def attach_method(model: nn.Module, peft: PeftSection, trainable: list[str]) -> nn.Module:
    """Freeze / prepare ``model`` for ``peft.method``; ``trainable`` modules always train."""
    if peft.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if peft.method == "head":
        freeze_except(model, from_dict(AdapterConfig, {"trainable_modules": trainable,
                                                       **peft.options}, "peft.options"))
        return model
    options = dict(peft.options)
    options["trainable_modules"] = list(options.get("trainable_modules", [])) + trainable
    return prepare(model, peft.method, **options)


def peak_memory_mb() -> float:
    """Peak resident memory of this process (MB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def run_classification(model: nn.Module, data: ClassificationData, trainer_cfg: TrainerConfig,
                       run_dir: Path) -> dict[str, float]:
    """Train on the train split, validate on val; accuracy / AUC of the final model on test
    (val when there is no test split)."""
    train = classification_split(data, "train")
    val = classification_split(data, "val")
    test = classification_split(data, "test") or val
    if train is None or val is None:
        raise ValueError(f"classification.path {data.path} needs train and val splits")
    loader = DataLoader(train, batch_size=data.batch_size, shuffle=True,
                        num_workers=data.num_workers)
    trainer = Trainer(model, nn.CrossEntropyLoss(), loader, trainer_cfg, run_dir,
                      validate=ClassificationValidator(val, data.batch_size))
    trainer.fit()
    test_metrics = classification_metrics(trainer.eval_model,
                                          DataLoader(test, batch_size=data.batch_size),
                                          trainer.acc.device)
    return {f"test_{k}": v for k, v in test_metrics.items()}


def run_segmentation(model: nn.Module, section: SegmentationSection, trainer_cfg: TrainerConfig,
                     run_dir: Path) -> dict[str, float]:
    """Train with kanseg's loaders and loss; the final model's validation Dice."""
    data = section.data
    spec = label_spec(data)
    train_loader, val_loader = build_loaders(data)
    loss = build_loss(section.loss, overlapping_labels=spec.mode == "regions")
    names = spec.names if spec.activation == "sigmoid" else spec.names[1:]
    validator = SegmentationValidator(val_loader, names, spec.activation, data.patch_size)
    trainer = Trainer(model, loss, train_loader, trainer_cfg, run_dir, validate=validator)
    trainer.fit()  # validates after the last epoch: its row holds the final model's Dice
    return {k: v for k, v in trainer.rows[-1].items() if k.startswith("val_")}
