"""How a grouped convolution executes: one grouped call, or one dense call on a block-diagonal
weight (oneDNN's grouped 3D convolutions on CPU can be several times slower than a dense one
with ``groups`` times the arithmetic).

* ``"heuristic"`` (the default) decides from the device, the number of spatial dims,
  ``groups`` and whether autograd is on, so a run (and its resume) never depends on timing
  noise: dense for 3D convolutions on CPU with ``2 <= groups <= DENSE_MAX_GROUPS`` under
  autograd (oneDNN's grouped 3D backward is the slow part), grouped otherwise (also for
  no-grad forwards: inference and validation).
* ``"auto"`` (opt-in) measures both once per (device, dtype, shapes, geometry) and caches the
  faster in a plain dict keyed by strings and ints; the choice may differ between runs.
* ``"grouped"`` / ``"dense"`` force one.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from .factories import conv_function

STRATEGIES = ("heuristic", "auto", "grouped", "dense")
DENSE_MAX_GROUPS = 8
_DECISIONS: dict[tuple, str] = {}


def block_diagonal(weight: Tensor, groups: int) -> Tensor:
    """Dense ``(O, I, *k)`` weight equal to the grouped ``(O, I / groups, *k)`` one."""
    out_ch, in_per_group, *k = weight.shape
    blocks = weight.view(groups, out_ch // groups, 1, in_per_group, *k)
    eye = torch.eye(groups, dtype=weight.dtype, device=weight.device)
    mask = eye.view(groups, 1, groups, 1, *([1] * len(k)))
    return (blocks * mask).reshape(out_ch, groups * in_per_group, *k)


def _best_times(fns: list[Callable[[], None]], repeats: int = 3) -> list[float]:
    """Best wall time of each function, run round-robin after one warm-up call each."""
    for fn in fns:
        fn()  # warm-up (oneDNN primitive creation)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def _measure(input_shape: tuple[int, ...], weight_shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device, geometry: tuple, groups: int) -> str:
    conv = conv_function(len(input_shape) - 2)
    x = torch.randn(input_shape, dtype=dtype, device=device, requires_grad=True)
    weight = torch.randn(weight_shape, dtype=dtype, device=device)

    def run(w: Tensor, g: int) -> None:
        conv(x, w.requires_grad_(), None, *geometry, g).sum().backward()

    with torch.enable_grad(), torch.autocast(device.type, enabled=False):
        grouped, dense = _best_times([lambda: run(weight.clone(), groups),
                                      lambda: run(block_diagonal(weight, groups), 1)])
    return "dense" if dense < 0.9 * grouped else "grouped"


def conv_strategy(requested: str, input_shape: tuple[int, ...], weight_shape: tuple[int, ...],
                  dtype: torch.dtype, device: torch.device, geometry: tuple, groups: int,
                  backward: bool = True) -> str:
    """``"grouped"`` or ``"dense"`` for convolving an input of ``input_shape`` with a grouped
    weight of ``weight_shape``; ``geometry`` is ``(stride, padding, dilation)``; ``backward``:
    whether autograd will run the convolution's backward.

    ``"heuristic"`` and ``"auto"`` choose ``"grouped"`` off CPU and for ``groups == 1``;
    ``"auto"`` also while tracing or compiling (unless that key was already measured).
    """
    if requested in ("grouped", "dense"):
        return requested
    if groups == 1 or device.type != "cpu":
        return "grouped"
    if requested == "heuristic":
        dense = backward and len(input_shape) == 5 and groups <= DENSE_MAX_GROUPS
        return "dense" if dense else "grouped"
    key = (device.type, str(dtype), tuple(input_shape), tuple(weight_shape), *geometry, groups)
    if key not in _DECISIONS:
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return "grouped"
        _DECISIONS[key] = _measure(tuple(input_shape), tuple(weight_shape), dtype, device,
                                   geometry, groups)
    return _DECISIONS[key]
