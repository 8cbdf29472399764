"""The kanpeft Python API: prepare, merge, trainable_report, save_adapter, load_adapter."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from kanseg.files import atomic_write_text
from kanseg.schema import from_dict

from .methods import METHODS
from .methods import tuner
from .methods.common import AdapterConfig, kan_layers, release_norm_statistics


def method_config(method: str, options: dict[str, Any] | AdapterConfig | None = None) -> AdapterConfig:
    """Validated config of ``method`` from keyword options (errors name the option)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    cls = METHODS[method].config_cls
    if isinstance(options, cls):
        return options
    return from_dict(cls, dict(options or {}), f"{method} options")


def prepare(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Freeze ``model`` and attach one PEFT ``method`` ("basis", "scales" or "lora").

    Options common to all methods: ``target_modules`` (regexes of KAN layer names),
    ``train_norm`` and ``trainable_modules`` (e.g. ``["classifier"]`` for a new head); see the
    method's config class for the rest. Returns the model to train (a ``peft.PeftModel`` for LoRA).
    """
    config = method_config(method, options)
    return METHODS[method].prepare(model, config)


def merge(prepared: nn.Module) -> nn.Module:
    """Fold the adapter into a plain model of the original classes (no adapter modules left)."""
    if isinstance(prepared, PeftModel):
        merged = prepared.merge_and_unload()
        for p in merged.parameters():
            p.requires_grad_(True)
        release_norm_statistics(merged)
        return merged
    if not tuner.adapter_layers(prepared):
        raise ValueError("merge: the model has no kanpeft adapters (prepare() it first)")
    return tuner.merge_model(prepared)


def kan_layer_names(model: nn.Module) -> list[str]:
    """Names of the KAN layers a method can adapt (what ``target_modules`` patterns match)."""
    return [name for name, _ in kan_layers(model)]


BASE_FILE = "kanpeft_base.json"


def _tensor_hash(tensor: torch.Tensor) -> str:
    """Short SHA-256 of a tensor's dtype, shape and bytes."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:16]


def base_fingerprint(prepared: nn.Module) -> list[str]:
    """Hashes of a prepared model's frozen parameters: the base weights its adapter needs
    (not peft's ``original_module`` copies of the modules it trains, e.g. a new head)."""
    return sorted({_tensor_hash(p) for name, p in prepared.named_parameters()
                   if not p.requires_grad and ".original_module." not in f".{name}"})


def save_adapter(prepared: nn.Module, directory: str | Path) -> Path:
    """Save only the adapter (and the trained head / norms): safetensors + JSON config, and
    ``kanpeft_base.json``, the fingerprint of the base weights. LoRA adapters use peft's
    layout (``save_pretrained``)."""
    directory = Path(directory)
    if isinstance(prepared, PeftModel):
        prepared.save_pretrained(str(directory))
    else:
        tuner.save(prepared, directory)
    atomic_write_text(directory / BASE_FILE,
                      json.dumps({"frozen_parameter_sha256": base_fingerprint(prepared)}) + "\n")
    return directory


def check_base(prepared: nn.Module, directory: str | Path) -> None:
    """Refuse a model with the adapter of ``directory`` loaded when its base weights are not
    those the adapter was trained on (adapters saved without a fingerprint are not checked)."""
    path = Path(directory) / BASE_FILE
    if not path.is_file():
        return
    recorded = json.loads(path.read_text()).get("frozen_parameter_sha256", [])
    own = {_tensor_hash(p) for p in prepared.parameters()}
    differ = [h for h in recorded if h not in own]
    if differ:
        raise ValueError(f"adapter {directory} was trained on another base: {len(differ)} of "
                         f"the {len(recorded)} base tensors it records ({path.name}) are not in "
                         "this backbone; use the backbone it was trained on, or --force "
                         "(force=True) to merge anyway")


def adapter_method(directory: str | Path) -> str:
    """The method of a saved adapter folder."""
    meta = tuner.read_config(directory)
    if meta.get("peft_type") == "LORA":
        return "lora"
    if meta.get("kanpeft_method") in METHODS:
        return meta["kanpeft_method"]
    raise ValueError(f"{Path(directory) / tuner.CONFIG_NAME} is neither a kanpeft nor a peft LoRA "
                     "adapter config")


def load_adapter(model: nn.Module, directory: str | Path, force: bool = False) -> nn.Module:
    """Attach a saved adapter to a fresh backbone; a backbone of another architecture is
    refused, and one with other weights than the adapter's base unless ``force``."""
    prepared = METHODS[adapter_method(directory)].load(model, directory)
    if not force:
        check_base(prepared, directory)
    return prepared


@dataclass
class TrainableReport:
    """Trainable / total parameter counts, per top-level block and in total."""

    rows: list[tuple[str, int, int]] = field(default_factory=list)
    trainable: int = 0
    total: int = 0

    @property
    def ratio(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        width = max([len(n) for n, _, _ in self.rows] + [5])
        lines = [f"{'layer':<{width}}  {'trainable':>11}  {'total':>11}  {'ratio':>7}"]
        for name, t, a in self.rows + [("TOTAL", self.trainable, self.total)]:
            lines.append(f"{name:<{width}}  {t:>11,}  {a:>11,}  {t / a if a else 0:>7.2%}")
        return "\n".join(lines)


def _layer_key(name: str, depth: int) -> str:
    parts = [p for p in name.split(".")[:-1] if p not in ("base_model", "model", "base_layer")]
    return ".".join(parts[:depth]) or "<root>"


def trainable_report(model: nn.Module, depth: int = 2, show: bool = True) -> TrainableReport:
    """Count trainable and total parameters per layer (module names cut at ``depth`` parts) and
    in total; prints a table unless ``show=False``. Parameters shared between modules count once."""
    report = TrainableReport()
    per_layer: dict[str, list[int]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        row = per_layer.setdefault(_layer_key(name, depth), [0, 0])
        row[1] += p.numel()
        report.total += p.numel()
        if p.requires_grad:
            row[0] += p.numel()
            report.trainable += p.numel()
    report.rows = [(n, t, a) for n, (t, a) in per_layer.items()]
    if show:
        print(report)
    return report
