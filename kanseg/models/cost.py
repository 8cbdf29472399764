"""What a segmentation network costs: parameters, forward FLOPs per patch, training patches/s.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode`, which counts matrix
multiplications and convolutions (2 FLOPs per multiply-add) and not elementwise work: for a
KAN convolution that is the fused convolution over the expanded channel stack, not the basis
expansion, norms or activations. The forward pass is counted on one sample in eval mode
without autograd, as at inference (deep-supervision heads do not run; KAN layers run their plain
convolution rather than the recomputing autograd Function of training, whose convolution the
dispatcher-level counter sees all the same).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .memory_format import to_channels_last


def build_model(name_or_model: str | nn.Module, spatial_dims: int, in_channels: int,
                out_channels: int, **model_kwargs: Any) -> nn.Module:
    """The module itself, or ``create_model(name, spatial_dims, in/out_channels, **kwargs)``."""
    if isinstance(name_or_model, nn.Module):
        return name_or_model
    from .registry import create_model

    return create_model(name_or_model, spatial_dims=spatial_dims, in_channels=in_channels,
                        out_channels=out_channels, **model_kwargs)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def forward_gflops(model: nn.Module, example: Tensor) -> float:
    """Forward GFLOPs of ``model`` on ``example`` (eval mode, no autograd)."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example)
    model.train(was_training)
    return counter.get_total_flops() / 1e9


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _outputs(output: Tensor | Sequence[Tensor] | dict[str, Tensor]) -> list[Tensor]:
    """All output tensors (deep supervision returns a list; some models a dict)."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        return list(output.values())
    return list(output)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Tensor) -> None:
    """One training step: forward, mean-square loss over every output, backward, step."""
    optimizer.zero_grad(set_to_none=True)
    loss = sum(out.float().square().mean() for out in _outputs(model(batch)))
    loss.backward()
    optimizer.step()


def train_patches_per_s(model: nn.Module, batch: Tensor, steps: int = 3) -> float:
    """Training patches/s: ``len(batch)`` over the median time of ``steps`` timed train steps,
    after one untimed warm-up step (AdamW, train mode)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(steps + 1):
        _synchronize(batch.device)
        start = time.perf_counter()
        train_step(model, optimizer, batch)
        _synchronize(batch.device)
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    return len(batch) / statistics.median(times)


def model_cost(name_or_model: str | nn.Module, patch: Sequence[int], in_channels: int,
               out_channels: int, batch: int = 2, steps: int = 3, device: str = "cpu",
               channels_last: bool = False, **model_kwargs: Any) -> dict[str, Any]:
    """Parameters, forward GFLOPs per patch and training patches/s of a network.

    ``name_or_model`` is a registered model name (built with ``spatial_dims = len(patch)``,
    ``in_channels``, ``out_channels`` and ``model_kwargs``) or a module. The speed is measured
    on ``device`` with random ``batch x in_channels x patch`` inputs; the model is trained by
    the measurement (pass a copy if its weights matter). ``channels_last``: its weights
    stored channels-last (:func:`~kanseg.models.memory_format.to_channels_last`), as
    ``trainer.channels_last`` trains it.
    """
    patch = [int(p) for p in patch]
    target = torch.device(device)
    model = build_model(name_or_model, len(patch), in_channels, out_channels,
                        **model_kwargs).to(target)
    if channels_last:
        to_channels_last(model)
    example = torch.randn(batch, in_channels, *patch, device=target)
    return {"params": count_params(model),
            "gflops": forward_gflops(model, example[:1]),
            "patches_per_s": train_patches_per_s(model, example, steps),
            "patch": patch, "batch": batch, "device": str(target)}


__all__ = ["build_model", "count_params", "forward_gflops", "model_cost", "train_patches_per_s",
           "train_step"]
