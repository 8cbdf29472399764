"""Segmentation losses from the config: MONAI's Dice+CE / Dice+BCE / focal, deep supervision."""
from __future__ import annotations

import torch
from monai.losses import (DeepSupervisionLoss, DiceCELoss, DiceFocalLoss, DiceLoss, FocalLoss,
                          TverskyLoss)
from torch import nn

from .config import LossConfig


class DiceBCELoss(nn.Module):
    """Sigmoid Dice + binary cross-entropy per channel, for overlapping (multi-label) regions.
    (MONAI's ``DiceCELoss(sigmoid=True)`` uses softmax CE when there are several channels.)"""

    def __init__(self, include_background: bool = True, lambda_dice: float = 1.0,
                 lambda_bce: float = 1.0) -> None:
        super().__init__()
        self.dice = DiceLoss(include_background=include_background, sigmoid=True)
        self.bce = nn.BCEWithLogitsLoss()
        self.lambda_dice, self.lambda_bce = lambda_dice, lambda_bce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (self.lambda_dice * self.dice(logits, target)
                + self.lambda_bce * self.bce(logits, target.to(logits.dtype)))


def resolve_activation(cfg: LossConfig, overlapping_labels: bool) -> str:
    """``sigmoid`` (overlapping regions) or ``softmax`` (exclusive classes) for ``cfg``;
    a loss whose activation does not fit the labels is rejected."""
    if cfg.activation != "auto":
        activation = cfg.activation
    elif cfg.name == "dice_bce":
        activation = "sigmoid"
    elif cfg.name == "dice_ce":
        activation = "softmax"
    else:
        activation = "sigmoid" if overlapping_labels else "softmax"
    if cfg.name == "dice_bce" and activation != "sigmoid":
        raise ValueError("loss.name 'dice_bce' needs loss.activation sigmoid (or auto)")
    if cfg.name == "dice_ce" and activation != "softmax":
        raise ValueError("loss.name 'dice_ce' needs loss.activation softmax (or auto)")
    if not overlapping_labels and activation == "sigmoid":
        raise ValueError(
            f"loss.name '{cfg.name}' uses sigmoid, but the labels are exclusive classes: use "
            "loss.name dice_ce (or a focal loss with softmax), or set data.label_mode: regions")
    if overlapping_labels and activation == "softmax":
        raise ValueError(
            f"loss.name '{cfg.name}' uses softmax, but the labels are overlapping regions "
            "(e.g. BraTS TC/WT/ET): use loss.name dice_bce, or a focal loss with sigmoid")
    return activation


def build_loss(cfg: LossConfig, overlapping_labels: bool = False) -> nn.Module:
    """Loss taking logits ``(B, C, *S)`` (or a list of them, finest first, for deep supervision)
    and labels: class indices ``(B, 1, *S)`` for softmax, multi-hot ``(B, C, *S)`` for sigmoid."""
    sigmoid = resolve_activation(cfg, overlapping_labels) == "sigmoid"
    act = dict(sigmoid=sigmoid, softmax=not sigmoid, to_onehot_y=not sigmoid,
               include_background=cfg.include_background)
    loss: nn.Module
    if cfg.name == "dice_bce":
        loss = DiceBCELoss(cfg.include_background, cfg.lambda_dice, cfg.lambda_voxel)
    elif cfg.name == "dice_ce":
        loss = DiceCELoss(**act, lambda_dice=cfg.lambda_dice, lambda_ce=cfg.lambda_voxel)
    elif cfg.name == "dice_focal":
        loss = DiceFocalLoss(**act, gamma=cfg.gamma, lambda_dice=cfg.lambda_dice,
                             lambda_focal=cfg.lambda_voxel)
    elif cfg.name == "tversky":
        loss = TverskyLoss(**act, alpha=cfg.tversky_alpha, beta=cfg.tversky_beta)
    else:
        loss = FocalLoss(include_background=cfg.include_background, to_onehot_y=not sigmoid,
                         gamma=cfg.gamma, use_softmax=not sigmoid)
    weights = cfg.deep_supervision_weights
    return DeepSupervisionLoss(loss, weight_mode="exp", weights=list(weights) if weights else None)
