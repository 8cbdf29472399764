"""Attach / load LoRA through HF peft."""
from __future__ import annotations

from pathlib import Path

from peft import PeftModel, get_peft_model
from torch import nn

from ..common import freeze_except
from .config import KanLoraConfig, load_kan_lora_config, to_peft_config


def prepare(model: nn.Module, config: KanLoraConfig) -> PeftModel:
    """``peft.get_peft_model`` with the KAN targets of ``config`` (the base model is frozen)."""
    peft_config = to_peft_config(model, config)
    freeze_except(model, config)  # peft freezes too; this also freezes BatchNorm statistics
    return get_peft_model(model, peft_config)


def load(model: nn.Module, directory: str | Path, is_trainable: bool = False) -> PeftModel:
    """``PeftModel.from_pretrained`` for a KAN model, with a clear error on a mismatch."""
    config = load_kan_lora_config(directory)
    try:
        return PeftModel.from_pretrained(model, str(directory), config=config,
                                         is_trainable=is_trainable)
    except (ValueError, RuntimeError, KeyError) as err:
        raise ValueError(f"LoRA adapter {directory} does not fit this backbone: {err}") from None
