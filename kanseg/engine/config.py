"""Typed config sections of the trainer and the loss (validated by :mod:`kanseg.schema`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional


@dataclass
class TrainerConfig:
    """How to optimise: budget, optimiser, schedule, precision, checkpoints and logging.

    ``compile: true`` runs the training forward through ``torch.compile`` (inductor); validation
    and checkpoints use the plain module. Where compilation cannot run (no C++ compiler on CPU,
    no Triton on GPU) the trainer logs a warning and trains eagerly.
    ``channels_last: true`` stores the model's 4D / 5D weights channels-last
    (``torch.channels_last`` / ``channels_last_3d``), so its convolutions, and the activations
    between them, run channels-last: on CPU (oneDNN) 3D convolutions with few channels at full
    resolution run several times faster that way (``benchmarks/README.md``). The math and the
    saved weights are the same either way.
    ``init_from``: a run folder (its best checkpoint), checkpoint folder or safetensors file
    whose matching tensors initialise the model (transfer); the others are reported, and
    ``init_strict: true`` makes any difference an error. Ignored when resuming.
    ``schedule_horizon``: the span the lr schedule decays over. ``epochs`` (the default) is
    ``max_epochs``, so the lr of a step is the same whatever the machine's speed. ``budget``
    also follows the share of ``max_minutes`` spent, whichever is further along, so a run that
    the clock stops still ends with the lr annealed (budgeted training; the lr then depends on
    the machine's speed, as the step where the clock stops already does).
    """

    max_epochs: int = 100
    max_minutes: Optional[float] = None
    optimizer: Literal["adamw", "sgd", "lion"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-5
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    warmup_steps: Optional[int] = None
    schedule: Literal["cosine", "poly", "constant"] = "cosine"
    schedule_horizon: Literal["epochs", "budget"] = "epochs"
    min_lr_ratio: float = 0.0
    grad_clip: Optional[float] = 1.0
    grad_accum: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    ema: Optional[float] = None
    seed: int = 0
    deterministic: bool = False
    compile: bool = False
    channels_last: bool = False
    init_from: Optional[str] = None
    init_strict: bool = False
    val_every: int = 1
    ckpt_every_steps: Optional[int] = None
    keep_last: int = 2
    monitor: str = "dice_mean"
    monitor_mode: Literal["max", "min"] = "max"
    nan_max_consecutive: int = 10
    log_every: int = 10
    wandb: bool = False

    def __post_init__(self) -> None:
        for name in ("max_epochs", "grad_accum", "val_every", "keep_last", "nan_max_consecutive",
                     "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ValueError(f"ema must be a decay in (0, 1) or null, got {self.ema}")
        if self.ckpt_every_steps is not None and self.ckpt_every_steps < 1:
            raise ValueError(f"ckpt_every_steps must be >= 1 or null, got {self.ckpt_every_steps}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0 or null, got {self.max_minutes}")
        if self.schedule_horizon == "budget" and self.max_minutes is None:
            raise ValueError("schedule_horizon: budget needs a time budget; set max_minutes "
                             "or use schedule_horizon: epochs")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class LossConfig:
    """Segmentation loss; ``activation: auto`` is sigmoid for dice_bce, softmax for dice_ce and
    follows the label mode (overlapping regions -> sigmoid) for the focal and Tversky losses.
    ``tversky``: MONAI's Tversky loss, ``tversky_alpha`` weighting false positives and
    ``tversky_beta`` false negatives (0.5 / 0.5 is Dice). ``lambda_dice`` weights the Dice term
    and ``lambda_voxel`` the voxel-wise term of dice_ce (cross-entropy), dice_bce (binary
    cross-entropy) and dice_focal (focal); the old name ``lambda_ce`` still works, with a
    deprecation warning."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"lambda_ce": "lambda_voxel"}

    name: Literal["dice_ce", "dice_bce", "focal", "dice_focal", "tversky"] = "dice_ce"
    activation: Literal["auto", "sigmoid", "softmax"] = "auto"
    include_background: bool = True
    lambda_dice: float = 1.0
    lambda_voxel: float = 1.0
    gamma: float = 2.0
    tversky_alpha: float = 0.3
    tversky_beta: float = 0.7
    deep_supervision_weights: Optional[list[float]] = None
