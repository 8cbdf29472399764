"""LoRA for KAN networks through HF peft (custom LoRA layer for KANConv)."""
from .config import (KanLoraConfig, kan_lora_config, load_kan_lora_config, lora_targets,
                     register_kan_modules, to_peft_config)
from .layer import LoraKANConv
from .model import load, prepare

__all__ = ["KanLoraConfig", "LoraKANConv", "kan_lora_config", "load", "load_kan_lora_config",
           "lora_targets", "prepare", "register_kan_modules", "to_peft_config"]
