"""Validation on full volumes: MONAI sliding-window inference and Dice per class/region."""
from __future__ import annotations

from typing import Sequence

import torch
from accelerate import Accelerator
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .trainer import BatchSplitter, default_split


def discretize(logits: torch.Tensor, activation: str, threshold: float = 0.5) -> torch.Tensor:
    """Binary masks ``(B, C, *S)``: thresholded sigmoid, or one-hot argmax for softmax."""
    if activation == "sigmoid":
        return (torch.sigmoid(logits.float()) > threshold).float()
    return one_hot(logits.argmax(1, keepdim=True), logits.shape[1])


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, 1, *S)`` class indices -> ``(B, C, *S)`` float one-hot."""
    return F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).float()


class SegmentationValidator:
    """Callable ``(model, accelerator) -> {"dice_<name>": ..., "dice_mean": ...}``.

    Cases are sharded over processes and gathered. ``names`` label the evaluated channels:
    every channel for sigmoid outputs, the foreground classes (channel 1..C-1) for softmax.
    Dice of a class absent from both prediction and label counts as 1 (BraTS convention).
    """

    def __init__(self, loader: DataLoader, names: Sequence[str], activation: str,
                 roi_size: Sequence[int], sw_batch_size: int = 1, overlap: float = 0.5,
                 mode: str = "gaussian", threshold: float = 0.5,
                 split_batch: BatchSplitter = default_split) -> None:
        self.loader, self.names, self.activation = loader, list(names), activation
        self.roi_size, self.sw_batch_size, self.overlap = list(roi_size), sw_batch_size, overlap
        self.mode, self.threshold, self.split_batch = mode, threshold, split_batch
        self._prepared: DataLoader | None = None

    def __call__(self, model: nn.Module, acc: Accelerator) -> dict[str, float]:
        if self._prepared is None:
            self._prepared = acc.prepare_data_loader(self.loader)
        scores = []
        for batch in tqdm(self._prepared, desc="validate", leave=False,
                          disable=not acc.is_main_process, dynamic_ncols=True):
            image, label = self.split_batch(batch)
            with acc.autocast():
                logits = sliding_window_inference(
                    image, self.roi_size, self.sw_batch_size, model, overlap=self.overlap,
                    mode=self.mode)
            scores.append(self.case_dice(logits, label))
        dice = acc.gather_for_metrics(torch.cat(scores)).cpu()
        per_class = dice.mean(0)
        metrics = {f"dice_{n}": float(v) for n, v in zip(self.names, per_class)}
        metrics["dice_mean"] = float(per_class.mean())
        return metrics

    def case_dice(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Dice ``(B, n_names)`` of one batch of full volumes."""
        pred = discretize(logits, self.activation, self.threshold)
        if self.activation == "softmax":
            target = one_hot(label, logits.shape[1])
            pred, target = pred[:, 1:], target[:, 1:]
        else:
            target = label.float()
        if pred.shape[1] != len(self.names):
            raise ValueError(f"the model predicts {pred.shape[1]} evaluated channels but the "
                             f"labels name {len(self.names)}: {self.names}")
        metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
        return metric(pred, target).float()
