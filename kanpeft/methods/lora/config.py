"""Configuration of the LoRA method (translated to an HF peft ``LoraConfig``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import LoraConfig
from torch import nn

from kanseg.layers import KANBottleneckConv, KANConv

from ..common import AdapterConfig, matches, norm_module_names
from .layer import LoraKANConv


@dataclass
class KanLoraConfig(AdapterConfig):
    """LoRA of rank ``r`` (scaling ``alpha / r``) on every selected KANConv (bottleneck cores
    included) and on the 1x1 projections of bottleneck layers."""

    r: int = 4
    alpha: float = 8.0

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")


def register_kan_modules(config: LoraConfig) -> LoraConfig:
    """Teach a peft ``LoraConfig`` to wrap :class:`KANConv` (peft's custom-module API)."""
    config._register_custom_module({KANConv: LoraKANConv})
    return config


def kan_lora_config(**kwargs: Any) -> LoraConfig:
    """A peft ``LoraConfig`` that can target KAN convolutions; takes LoraConfig's arguments."""
    return register_kan_modules(LoraConfig(**kwargs))


def load_kan_lora_config(directory: str | Path) -> LoraConfig:
    """``LoraConfig.from_pretrained`` plus the KAN registration (pass it as
    ``PeftModel.from_pretrained(model, directory, config=...)``)."""
    return register_kan_modules(LoraConfig.from_pretrained(str(directory)))


def lora_targets(model: nn.Module, patterns: list[str] | None = None) -> list[str]:
    """Names of the KANConvs (bottleneck cores included) and bottleneck projections to adapt
    (peft 0.21 cannot merge LoRA on grouped convs nor on 1x1x1 Conv3d, so those projections are
    left out)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, KANBottleneckConv) and matches(name, patterns):
            projections = (["inner_proj", "out_proj"]
                           if module.groups == 1 and module.spatial_dims < 3 else [])
            names += [f"{name}.core"] + [f"{name}.{p}" for p in projections]
        elif isinstance(module, KANConv) and matches(name, patterns) and name not in names:
            names.append(name)
    return names


def to_peft_config(model: nn.Module, config: KanLoraConfig) -> LoraConfig:
    """The peft ``LoraConfig`` for ``model`` that ``config`` describes."""
    targets = lora_targets(model, config.target_modules)
    if not targets:
        raise ValueError(f"no KAN layer of the model matches target_modules={config.target_modules!r}")
    norms = norm_module_names(model) if config.train_norm else []
    inside = [n for n in norms if any(n.startswith(t + ".") for t in targets)]
    if inside:
        raise ValueError(
            f"train_norm=True with lora: norm layers {inside[:3]}... sit inside LoRA-wrapped KAN "
            "layers, which peft cannot also save (modules_to_save); use the scales or basis "
            "method, or LoRA without train_norm"
        )
    to_save = list(config.trainable_modules) + norms
    return kan_lora_config(r=config.r, lora_alpha=config.alpha, target_modules=targets,
                           modules_to_save=to_save or None)
