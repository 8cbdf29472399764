"""Learning-rate schedules: linear warmup, then cosine, poly or constant (a ``LambdaLR``)."""
from __future__ import annotations

import math
from typing import Callable, Optional

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str,
              min_ratio: float = 0.0, power: float = 0.9, time_progress: float = 0.0) -> float:
    """Multiplier of the base lr after ``step`` optimiser steps.

    The decay follows the progress after warmup, ``(step - warmup) / (total - warmup)``, or
    ``time_progress`` (the share of a time budget spent) when that is further along.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, max(0.0, (step - warmup_steps) / span, time_progress))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * t))
    elif schedule == "poly":
        decay = (1.0 - t) ** power
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected cosine, poly or constant")
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(optimizer: Optimizer, total_steps: int, warmup_steps: int, schedule: str,
                    min_ratio: float = 0.0,
                    time_progress: Optional[Callable[[], float]] = None) -> LambdaLR:
    """Per-optimiser-step scheduler over ``total_steps``.

    ``time_progress`` (a budget horizon) returns the share of the time budget spent so far;
    the lr then decays with steps or time, whichever is further along, and reaches its end
    value when the budget runs out even if ``total_steps`` would never be reached.
    """
    def factor(step: int) -> float:
        spent = time_progress() if time_progress is not None else 0.0
        return lr_factor(step, total_steps, warmup_steps, schedule, min_ratio,
                         time_progress=spent)

    return LambdaLR(optimizer, factor)
