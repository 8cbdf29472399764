"""The kanpeft methods by name: each has a config dataclass, ``prepare`` and ``load``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import basis, lora, scales
from .common import AdapterConfig


@dataclass(frozen=True)
class Method:
    """One PEFT method: its options and how to attach / reload it."""

    name: str
    config_cls: type[AdapterConfig]
    prepare: Callable
    load: Callable
    summary: str


METHODS: dict[str, Method] = {
    "basis": Method("basis", basis.BasisConfig, basis.prepare, basis.load,
                    "deltas on the basis weights of chosen degrees + extra zero-initialised degrees"),
    "scales": Method("scales", scales.ScalesConfig, scales.prepare, scales.load,
                     "IA3/SSF-style per-channel and per-degree scales and a post-norm shift"),
    "lora": Method("lora", lora.KanLoraConfig, lora.prepare, lora.load,
                   "HF peft LoRA on the fused KAN conv weights and bottleneck projections"),
}

__all__ = ["METHODS", "Method"]
