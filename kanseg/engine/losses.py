"""Segmentation losses from the config: MONAI's Dice+CE / Dice+BCE / focal, deep supervision."""
from __future__ import annotations

from torch import nn
from monai.losses import DeepSupervisionLoss, DiceCELoss, DiceFocalLoss, FocalLoss

from .config import LossConfig


def resolve_activation(cfg: LossConfig, overlapping_labels: bool) -> str:
    """``sigmoid`` or ``softmax`` for ``cfg``; rejects softmax on overlapping label regions."""
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
    if cfg.name in ("dice_ce", "dice_bce"):
        loss = DiceCELoss(**act, lambda_dice=cfg.lambda_dice, lambda_ce=cfg.lambda_ce)
    elif cfg.name == "dice_focal":
        loss = DiceFocalLoss(**act, gamma=cfg.gamma, lambda_dice=cfg.lambda_dice,
                             lambda_focal=cfg.lambda_ce)
    else:
        loss = FocalLoss(include_background=cfg.include_background, to_onehot_y=not sigmoid,
                         gamma=cfg.gamma, use_softmax=not sigmoid)
    weights = cfg.deep_supervision_weights
    return DeepSupervisionLoss(loss, weight_mode="exp", weights=list(weights) if weights else None)
