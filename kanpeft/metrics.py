"""Classification metrics for ``kanpeft finetune``: accuracy and ROC AUC (MONAI), and the
trainer's validation callback."""
from __future__ import annotations

import torch
from monai.metrics import compute_roc_auc
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@torch.no_grad()
def classification_metrics(model: nn.Module, loader: DataLoader, device: torch.device
                           ) -> dict[str, float]:
    """Accuracy and ROC AUC (one-vs-rest mean for several classes, MONAI) on ``loader``."""
    model.eval()
    probs, labels = [], []
    for x, y in loader:
        probs.append(model(x.to(device)).float().softmax(1).cpu())
        labels.append(y)
    p, y = torch.cat(probs), torch.cat(labels)
    accuracy = float((p.argmax(1) == y).float().mean())
    onehot = nn.functional.one_hot(y, p.shape[1]).float()
    auc = float(compute_roc_auc(p, onehot, average="macro")) if p.shape[1] > 1 else float("nan")
    return {"accuracy": accuracy, "auc": auc}


class ClassificationValidator:
    """Trainer callback: accuracy / AUC on a validation set."""

    def __init__(self, dataset: TensorDataset, batch_size: int):
        self.loader = DataLoader(dataset, batch_size=batch_size)

    def __call__(self, model: nn.Module, acc) -> dict[str, float]:
        return classification_metrics(model, self.loader, acc.device)
