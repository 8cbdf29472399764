"""Channels-last storage of a network's weights (``trainer.channels_last``,
``kanseg models --cost --channels-last``).

With its 4D / 5D weights stored channels-last, a network's convolutions write channels-last
outputs, so the activations between them stay channels-last too: on CPU, oneDNN's 3D
convolutions with few channels at full resolution run several times faster that way.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model`` with its 4D and 5D parameters and buffers stored channels-last (in place)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.dim() in CHANNELS_LAST:
            tensor.data = tensor.data.contiguous(memory_format=CHANNELS_LAST[tensor.dim()])
    return model
