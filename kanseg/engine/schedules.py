"""Learning-rate schedules: linear warmup, then cosine, poly or constant (a ``LambdaLR``)."""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str,
              min_ratio: float = 0.0, power: float = 0.9) -> float:
    """Multiplier of the base lr after ``step`` optimiser steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * t))
    elif schedule == "poly":
        decay = (1.0 - t) ** power
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected cosine, poly or constant")
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(optimizer: Optimizer, total_steps: int, warmup_steps: int, schedule: str,
                    min_ratio: float = 0.0) -> LambdaLR:
    """Per-optimiser-step scheduler over ``total_steps``."""
    return LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, schedule,
                                                   min_ratio))
