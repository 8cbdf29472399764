"""Benchmark a PEFT-adapted KAGN layer against the unadapted layer: forward + backward time.

The unadapted layer trains every weight; each adapted copy (``kanpeft.prepare``) has a frozen
base and a trainable adapter and runs the layer's own forward with substituted tensors. All
run round-robin in the same process on one input that requires grad (as inside a network).
Like the command-line programs and ``benchmarks/layers.py``, it keeps freed memory in the
process (:mod:`kanseg.allocator`; ``KANSEG_ALLOCATOR=system`` keeps glibc's defaults).
The table gives the median milliseconds and the median per-round ratios to the unadapted layer
and to the unadapted layer of the adapted one's degree (an unadapted layer one degree higher,
timed beside them, is the baseline of ``basis +1 degree``: the adapter's own overhead).

Run ``python benchmarks/peft_layer.py --help``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import kanpeft
from kanseg.allocator import keep_freed_memory
from kanseg.layers import create_kan_conv

#: row name -> (method, options)
ADAPTERS = {
    "scales": ("scales", {}),
    "lora r=4": ("lora", {"r": 4}),
    "basis": ("basis", {"degrees": [1], "extra_degrees": 0}),
    "basis +1 degree": ("basis", {"degrees": [1], "extra_degrees": 1}),
}


def unadapted(extra_degrees: int) -> str:
    """Row name of the unadapted layer ``extra_degrees`` above the benchmark's degree."""
    return f"unadapted +{extra_degrees} degree" if extra_degrees else "unadapted"


def candidates(dims: int, channels: int, degree: int, bottleneck: bool) -> dict[str, nn.Module]:
    """The unadapted KAGN layers (of the degree and of each adapter's higher degree) and one
    adapted copy per row of :data:`ADAPTERS`."""
    def layer(degree: int) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(create_kan_conv("kagn", dims, channels, channels, 3, padding=1,
                                             degree=degree, bottleneck=bottleneck))

    extras = sorted({options.get("extra_degrees", 0) for _, options in ADAPTERS.values()})
    runs = {unadapted(extra): layer(degree + extra) for extra in extras}
    for name, (method, options) in ADAPTERS.items():
        runs[name] = kanpeft.prepare(copy.deepcopy(runs["unadapted"]), method, **options)
    return runs


def baseline(name: str) -> str:
    """The unadapted row of the same degree as row ``name``."""
    if name in ADAPTERS:
        return unadapted(ADAPTERS[name][1].get("extra_degrees", 0))
    return name


def synchronize() -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step(module: nn.Module, x: torch.Tensor) -> float:
    """Seconds of one forward + backward of ``module`` on ``x``."""
    synchronize()
    start = time.perf_counter()
    module(x).sum().backward()
    synchronize()
    elapsed = time.perf_counter() - start
    module.zero_grad(set_to_none=True)
    x.grad = None
    return elapsed


def measure(runs: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds per candidate and round, timed round-robin after one warm-up call each."""
    for module in runs.values():
        step(module, x)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, module in runs.items():
            times[name].append(step(module, x))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, choices=(1, 2, 3), default=2)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="spatial side of the input")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--degree", type=int, default=3)
    parser.add_argument("--bottleneck", action="store_true", help="bottleneck KAGN layers")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (medians)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    allocator = "keeps freed memory" if keep_freed_memory() else "system default"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    torch.set_default_device(args.device)
    runs = candidates(args.dims, args.channels, args.degree, args.bottleneck)
    shape = (args.batch, args.channels) + (args.size,) * args.dims
    x = torch.randn(shape, requires_grad=True)
    times = measure(runs, x, args.repeats)
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"cpu, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {device}; KAGN degree {args.degree}, "
          f"{'bottleneck, ' if args.bottleneck else ''}input {tuple(shape)}, "
          f"repeats={args.repeats}, allocator: {allocator}")
    print("| layer | fwd+bwd ms | x unadapted | x unadapted of its degree |\n|---|---|---|---|")
    for name, seconds in times.items():
        ratios = [statistics.median(a / b for a, b in zip(seconds, times[reference]))
                  for reference in ("unadapted", baseline(name))]
        print(f"| {name} | {1e3 * statistics.median(seconds):.2f} | "
              + " | ".join(f"{r:.2f}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
