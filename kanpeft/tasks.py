"""Fine-tuning tasks on the shared trainer: classification and segmentation with a pretrained
KAN backbone (a torch-conv-kan checkpoint folder or hub id) and one kanpeft method.

``method`` is one of kanpeft's methods or a baseline: ``full`` (everything trains) or ``head``
(only the new head / decoder trains).
"""
from __future__ import annotations

import json
import logging
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch
import yaml
from monai.metrics import compute_roc_auc
from segmentation_models_pytorch.base import SegmentationHead
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kanseg.data import DataConfig, build_loaders, label_spec
from kanseg.engine.config import LossConfig, TrainerConfig
from kanseg.engine.losses import build_loss
from kanseg.engine.trainer import Trainer, seed_everything
from kanseg.engine.validation import SegmentationValidator
from kanseg.schema import ConfigError, from_dict, to_dict

from .api import prepare, save_adapter, trainable_report
from .methods import METHODS
from .methods.common import freeze_except, AdapterConfig

log = logging.getLogger("kanseg")
BASELINES = ("full", "head")


# ---------------------------------------------------------------------------- config
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
    """Data (kanseg's 2D data config), loss and the smp U-Net decoder widths."""

    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    decoder_channels: list[int] = field(default_factory=lambda: [64, 32, 16, 8])


@dataclass
class FinetuneConfig:
    """One fine-tuning run (see ``configs/peft_pneumonia.yaml``)."""

    task: Literal["classification", "segmentation"] = "classification"
    backbone: str = ""
    num_classes: int = 2
    peft: PeftSection = field(default_factory=PeftSection)
    classification: ClassificationData = field(default_factory=ClassificationData)
    segmentation: SegmentationSection = field(default_factory=SegmentationSection)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output_dir: str = "runs/peft"


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """Read a YAML fine-tuning config; ``overrides`` are ``dotted.key=yaml_value`` strings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return from_dict(FinetuneConfig, data, str(path))


# ---------------------------------------------------------------------------- models
def load_backbone(source: str) -> nn.Module:
    """A pretrained KAN network from a torch-conv-kan checkpoint folder or hub id."""
    from kanseg.models.torch_conv_kan import load_torch_conv_kan

    if not source:
        raise ConfigError("backbone: give a torch-conv-kan checkpoint folder or hub id")
    return load_torch_conv_kan(source)


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Replace the last ``nn.Linear`` of ``model`` by a new one with ``num_classes`` outputs;
    returns its module name (the module to train)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the backbone has no nn.Linear classification head to replace")
    name = linears[-1]
    old = model.get_submodule(name)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Linear(old.in_features, num_classes))
    return name


class FeatureUNet(nn.Module):
    """A 2D U-Net: a pretrained KAN backbone (``forward_features`` maps at strides 1, 2, 4...,
    as VGG-KAN and ResKANet provide) as the encoder; smp's ``UnetDecoder`` and
    ``SegmentationHead`` as decoder and head. The backbone's classifier is dropped."""

    def __init__(self, backbone: nn.Module, num_classes: int, decoder_channels: Sequence[int]):
        super().__init__()
        if not hasattr(backbone, "forward_features") or not hasattr(backbone, "feature_channels"):
            raise ValueError("segmentation needs a backbone with forward_features / "
                             "feature_channels (VGG-KAN, ResKANet)")
        backbone.classifier = None
        self.encoder = backbone
        channels = list(backbone.feature_channels)
        self.depth = len(channels) - 1
        if len(decoder_channels) != self.depth:
            raise ConfigError(f"segmentation.decoder_channels needs {self.depth} entries for "
                              f"this backbone ({self.depth} down-sampling stages), got "
                              f"{list(decoder_channels)}")
        self.decoder = UnetDecoder(channels, list(decoder_channels), n_blocks=self.depth)
        self.head = SegmentationHead(decoder_channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        pad = [(-s) % 2**self.depth for s in size]
        x = nn.functional.pad(x, [0, pad[1], 0, pad[0]])
        y = self.head(self.decoder(self.encoder.forward_features(x)))
        return y[..., : size[0], : size[1]]


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


# ---------------------------------------------------------------------------- data
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


@torch.no_grad()
def classification_metrics(model: nn.Module, loader: DataLoader, device: torch.device
                           ) -> dict[str, float]:
    """Accuracy and ROC AUC (one-vs-rest mean for several classes, MONAI) on ``loader``."""
    model.eval()
    probs, labels = [], []
    for x, y in loader:
        probs.append(model(x.to(device)).float().softmax(1).cpu())
        labels.append(y)
    p, y = torch.cat(probs), torch.cat(labels)
    accuracy = float((p.argmax(1) == y).float().mean())
    onehot = nn.functional.one_hot(y, p.shape[1]).float()
    auc = float(compute_roc_auc(p, onehot, average="macro")) if p.shape[1] > 1 else float("nan")
    return {"accuracy": accuracy, "auc": auc}


class ClassificationValidator:
    """Trainer callback: accuracy / AUC on a validation set."""

    def __init__(self, dataset: TensorDataset, batch_size: int):
        self.loader = DataLoader(dataset, batch_size=batch_size)

    def __call__(self, model: nn.Module, acc) -> dict[str, float]:
        return classification_metrics(model, self.loader, acc.device)


# ---------------------------------------------------------------------------- runs
def peak_memory_mb() -> float:
    """Peak resident memory of this process (MB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def build_task(cfg: FinetuneConfig) -> tuple[nn.Module, list[str], Any]:
    """Model with the new head / decoder (not yet prepared), the names of the new modules and
    the task's data (datasets or loaders)."""
    backbone = load_backbone(cfg.backbone)
    if cfg.task == "classification":
        head = replace_head(backbone, cfg.num_classes)
        return backbone, [head], cfg.classification
    spec = label_spec(cfg.segmentation.data)
    model = FeatureUNet(backbone, spec.out_channels, cfg.segmentation.decoder_channels)
    return model, ["decoder", "head"], cfg.segmentation


def finetune(cfg: FinetuneConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run one fine-tuning: load the backbone, attach the method, train, evaluate, save the
    adapter (or the full model for the baselines) and ``results.json`` in ``run_dir``."""
    run_dir = Path(run_dir or cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    model, new_modules, data = build_task(cfg)
    model = attach_method(model, cfg.peft, new_modules)
    report = trainable_report(model, depth=1, show=False)
    log.info("method %s: %d trainable of %d parameters (%.2f%%)", cfg.peft.method,
             report.trainable, report.total, 100 * report.ratio)
    start = time.perf_counter()
    if cfg.task == "classification":
        metrics = _run_classification(model, data, cfg.trainer, run_dir)
    else:
        metrics = _run_segmentation(model, data, cfg.trainer, run_dir)
    wall = time.perf_counter() - start
    if cfg.peft.method in BASELINES:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(run_dir / "model.safetensors"))
    else:
        save_adapter(model, run_dir / "adapter")
        save_task_config(cfg, run_dir / "adapter")
    results = {"task": cfg.task, "method": cfg.peft.method, "trainable": report.trainable,
               "total": report.total, "ratio": report.ratio, **metrics,
               "wall_s": round(wall, 1), "peak_mem_mb": round(peak_memory_mb(), 1),
               "config": to_dict(cfg)}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _run_classification(model: nn.Module, data: ClassificationData, trainer_cfg: TrainerConfig,
                        run_dir: Path) -> dict[str, float]:
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
    final = trainer.eval_model
    test_metrics = classification_metrics(final, DataLoader(test, batch_size=data.batch_size),
                                          trainer.acc.device)
    return {f"test_{k}": v for k, v in test_metrics.items()}


def _run_segmentation(model: nn.Module, section: SegmentationSection, trainer_cfg: TrainerConfig,
                      run_dir: Path) -> dict[str, float]:
    data = section.data
    spec = label_spec(data)
    train_loader, val_loader = build_loaders(data)
    loss = build_loss(section.loss, overlapping_labels=spec.mode == "regions")
    names = spec.names if spec.activation == "sigmoid" else spec.names[1:]
    validator = SegmentationValidator(val_loader, names, spec.activation, data.patch_size)
    trainer = Trainer(model, loss, train_loader, trainer_cfg, run_dir, validate=validator)
    trainer.fit()  # validates after the last epoch: its row holds the final model's Dice
    return {k: v for k, v in trainer.rows[-1].items() if k.startswith("val_")}


# ---------------------------------------------------------------------------- merge / methods
TASK_CONFIG_NAME = "finetune.yaml"


def save_task_config(cfg: FinetuneConfig, directory: Path) -> None:
    """Record how the fine-tuned model was built next to its adapter (used by merge)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TASK_CONFIG_NAME).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def merge_adapter(adapter: str | Path, output: str | Path, backbone: str | None = None,
                  force: bool = False) -> Path:
    """Load ``adapter`` onto its backbone, merge and write the plain model to ``output``.

    With a ``finetune.yaml`` beside the adapter (written by :func:`finetune`) the task model
    (new head / U-Net decoder) is rebuilt first; ``backbone`` overrides its backbone source.
    A VGG-KAN classifier is written in torch-conv-kan's checkpoint format (``config.json`` +
    ``model.safetensors``); other models as ``model.safetensors`` + ``finetune.yaml``.
    A backbone whose weights differ from the adapter's base is refused unless ``force``.
    """
    from kanseg.models import VGGKAN
    from kanseg.models.torch_conv_kan import save_torch_conv_kan

    from .api import load_adapter, merge

    adapter, output = Path(adapter), Path(output)
    if not adapter.is_dir():
        raise FileNotFoundError(f"adapter folder {adapter} does not exist (expected a folder "
                                "written by `kanpeft finetune` or save_adapter)")
    task_file = adapter / TASK_CONFIG_NAME
    cfg = load_config(task_file) if task_file.is_file() else None
    if cfg is not None:
        if backbone:
            cfg.backbone = backbone
        model = build_task(cfg)[0]
    elif backbone:
        model = load_backbone(backbone)
    else:
        raise ValueError(f"{adapter} has no {TASK_CONFIG_NAME}: pass --backbone")
    merged = merge(load_adapter(model, adapter, force=force))
    if isinstance(merged, VGGKAN):
        describe_merged(merged)
        save_torch_conv_kan(merged, output)
    else:
        from safetensors.torch import save_file

        output.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in merged.state_dict().items()},
                  str(output / "model.safetensors"))
        if cfg is not None:
            save_task_config(cfg, output)
    return output


def describe_merged(model: nn.Module) -> None:
    """Update a merged VGG-KAN's recorded constructor options (``model_config``: degree after
    extra degrees, classes of the new head) so that it saves in torch-conv-kan's format."""
    from kanseg.layers import KANBottleneckConv, KANConv

    config = dict(getattr(model, "model_config", None) or {})
    degrees = {m.basis.degree for m in model.modules() if isinstance(m, (KANConv, KANBottleneckConv))}
    if len(degrees) != 1:
        raise ValueError(f"the merged layers have different degrees {sorted(degrees)}: "
                         "torch-conv-kan's format needs one degree for the whole network")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    config.update(degree=degrees.pop(), num_classes=linears[-1].out_features if linears else 0)
    model.model_config = config


def method_table(backbone: str, num_classes: int = 2,
                 options: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Trainable-parameter counts of every method (and the baselines) for a classifier made of
    ``backbone`` with a new ``num_classes`` head; ``share_of_full`` compares with full FT."""
    rows = []
    for method in [*BASELINES, *METHODS]:
        model = load_backbone(backbone)
        head = replace_head(model, num_classes)
        peft = PeftSection(method, dict((options or {}).get(method, {})))
        try:
            prepared = attach_method(model, peft, [head])
        except ValueError as err:
            rows.append({"method": method, "error": str(err)})
            continue
        report = trainable_report(prepared, show=False)
        summary = METHODS[method].summary if method in METHODS else (
            "every parameter trains" if method == "full" else "only the new head trains")
        rows.append({"method": method, "trainable": report.trainable, "total": report.total,
                     "ratio": report.ratio, "summary": summary})
    for row in rows:  # rows[0] is full fine-tuning
        if "trainable" in row:
            row["share_of_full"] = row["trainable"] / rows[0]["trainable"]
    return rows
