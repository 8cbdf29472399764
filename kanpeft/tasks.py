"""What ``kanpeft`` runs: fine-tune a pretrained backbone on a classification or segmentation
task with one method, merge a saved adapter, and count the trainable parameters of every method.

``method`` is one of kanpeft's methods or a baseline: ``full`` (everything trains) or ``head``
(only the new head / decoder trains). The pieces: :mod:`.config` (the YAML schema),
:mod:`.backbones` (loading any backbone), :mod:`.models` (head / U-Net / new output),
:mod:`.runner` (training), :mod:`.data` and :mod:`.metrics` (classification).
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from kanseg.data import label_spec
from kanseg.engine.trainer import seed_everything
from kanseg.files import atomic_write, atomic_write_text
from kanseg.schema import to_dict

from .api import load_adapter, merge, save_adapter, trainable_report
from .backbones import load_backbone
from .config import (BASELINES, TASK_CONFIG_NAME, FinetuneConfig, PeftSection, load_config,
                     save_task_config)
from .methods import METHODS
from .models import new_classifier, segmentation_model, with_new_output
from .runner import attach_method, peak_memory_mb, run_classification, run_segmentation

log = logging.getLogger("kanseg")


def build_task(cfg: FinetuneConfig) -> tuple[nn.Module, list[str]]:
    """The model to fine-tune (backbone plus new head / decoder, not yet prepared) and the
    names of its new modules."""
    backbone = load_backbone(cfg.backbone)
    if cfg.task == "classification":
        return backbone, new_classifier(backbone, cfg.num_classes)
    seg = cfg.segmentation
    return segmentation_model(backbone, label_spec(seg.data).out_channels, seg.decoder_channels,
                              seg.data.patch_size)


def save_state(model: nn.Module, path: Path) -> None:
    """The model's whole state dict as safetensors (atomically)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def finetune(cfg: FinetuneConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run one fine-tuning: load the backbone, attach the method, train, evaluate, save the
    adapter (or the full model for the baselines) and ``results.json`` in ``run_dir``."""
    run_dir = Path(run_dir or cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    model, new_modules = build_task(cfg)
    model = attach_method(model, cfg.peft, new_modules)
    report = trainable_report(model, depth=1, show=False)
    log.info("method %s: %d trainable of %d parameters (%.2f%%)", cfg.peft.method,
             report.trainable, report.total, 100 * report.ratio)
    start = time.perf_counter()
    if cfg.task == "classification":
        metrics = run_classification(model, cfg.classification, cfg.trainer, run_dir)
    else:
        metrics = run_segmentation(model, cfg.segmentation, cfg.trainer, run_dir)
    wall = time.perf_counter() - start
    if cfg.peft.method in BASELINES:
        save_state(model, run_dir / "model.safetensors")
    else:
        save_adapter(model, run_dir / "adapter")
        save_task_config(cfg, run_dir / "adapter")
    results = {"task": cfg.task, "method": cfg.peft.method, "trainable": report.trainable,
               "total": report.total, "ratio": report.ratio, **metrics,
               "wall_s": round(wall, 1), "peak_mem_mb": round(peak_memory_mb(), 1),
               "config": to_dict(cfg)}
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def merge_adapter(adapter: str | Path, output: str | Path, backbone: str | None = None,
                  force: bool = False) -> Path:
    """Load ``adapter`` onto its backbone, merge and write the plain model to ``output``.

    With a ``finetune.yaml`` beside the adapter (written by :func:`finetune`) the task model
    (new head / U-Net decoder) is rebuilt first; ``backbone`` overrides its backbone source.
    A merged VGG-KAN is written in torch-conv-kan's checkpoint format, another kanseg network
    as a kanseg model folder (both ``config.json`` + ``model.safetensors``, usable as a backbone
    again); other models (a U-Net on a backbone) as ``model.safetensors`` + ``finetune.yaml``.
    A backbone whose weights differ from the adapter's base is refused unless ``force``.
    """
    from kanseg.models import VGGKAN, save_model
    from kanseg.models.torch_conv_kan import save_torch_conv_kan

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
    if describe_merged(merged):
        (save_torch_conv_kan if isinstance(merged, VGGKAN) else save_model)(merged, output)
        return output
    output.mkdir(parents=True, exist_ok=True)
    save_state(merged, output / "model.safetensors")
    if cfg is not None:
        save_task_config(cfg, output)
    return output


def describe_merged(model: nn.Module) -> bool:
    """Record a merged kanseg network's degree in its ``model_config`` (extra degrees raise it);
    False when the model has no ``model_config`` or its KAN layers differ in degree."""
    from kanseg.layers import KANBottleneckConv, KANConv

    config = getattr(model, "model_config", None)
    degrees = {m.basis.degree for m in model.modules()
               if isinstance(m, (KANConv, KANBottleneckConv))}
    if not config or len(degrees) > 1:
        return False
    if degrees and None not in degrees:
        config["degree"] = degrees.pop()
    return True


def method_table(backbone: str, num_classes: int = 2,
                 options: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Trainable-parameter counts of every method (and the baselines) for ``backbone`` with a
    new ``num_classes`` output (a head, or a segmentation network's output layers);
    ``share_of_full`` compares with full fine-tuning."""
    pretrained = load_backbone(backbone)
    rows = []
    for method in [*BASELINES, *METHODS]:
        model, new_modules = with_new_output(copy.deepcopy(pretrained), num_classes)
        peft = PeftSection(method, dict((options or {}).get(method, {})))
        try:
            prepared = attach_method(model, peft, new_modules)
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
