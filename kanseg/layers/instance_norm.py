"""Instance norm computed as a group norm with one group per channel.

Without running statistics, ``nn.InstanceNormNd`` and ``F.group_norm(x, C, ...)`` compute the
same thing (per sample and channel: biased variance, ``eps`` inside the square root, per-channel
affine), but aten's instance norm runs batch norm over a ``(1, B * C, *S)`` view with the affine
parameters repeated ``B`` times, and on CPU that takes 2x the time of the group norm kernel
forward + backward (4x forward alone). These subclasses keep the class names, parameters,
state-dict keys and ``isinstance`` checks of ``torch.nn``'s and only change how the forward is
computed. They run torch's forward with running statistics, for an input without batch
dimension or with another channel count (allowed without affine), and while tracing (TorchScript,
ONNX export: there torch's becomes ONNX's InstanceNormalization).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _GroupNormForward:
    """Forward of an ``nn.InstanceNormNd`` through ``F.group_norm``."""

    def forward(self, x: Tensor) -> Tensor:
        if (self.track_running_stats or x.dim() == self._get_no_batch_dim()
                or x.shape[1] != self.num_features or torch.jit.is_tracing()):
            return super().forward(x)
        return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)


class InstanceNorm1d(_GroupNormForward, nn.InstanceNorm1d):
    """``nn.InstanceNorm1d`` computed by ``F.group_norm`` (see the module docstring)."""


class InstanceNorm2d(_GroupNormForward, nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` computed by ``F.group_norm`` (see the module docstring)."""


class InstanceNorm3d(_GroupNormForward, nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` computed by ``F.group_norm`` (see the module docstring)."""
