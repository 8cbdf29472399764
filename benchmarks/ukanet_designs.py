"""What each UKANet design choice costs: parameters, forward GFLOPs per patch and training
patches/s against MONAI UNet, measured in the same run.

Every design is a set of ``ukanet`` arguments (``kan_levels``, ``stem_stride``, ``degree``,
``bottleneck_convs``...). Training steps (forward, loss over every output, backward, AdamW) are
timed round-robin over all designs, ``--rounds`` times after a warm-up step each, so that load
from other processes hits all of them alike; the speed column is the median over rounds of the
design's patches/s over MONAI UNet's in the same round.

    python benchmarks/ukanet_designs.py                          # hippocampus patch, 3D
    python benchmarks/ukanet_designs.py --patch 256,256 --batch 8 --out-channels 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kanseg.models.cost import build_model, count_params, forward_gflops, train_step  # noqa: E402

BASELINE = ("monai_unet", {"width": 16, "depth": 3})
#: label -> ukanet arguments (width 16 throughout)
DESIGNS: dict[str, dict] = {
    "all KAN, depth 3 (earlier default)": {"depth": 3},
    "all KAN, stem stride 2, depth 2": {"depth": 2, "stem_stride": 2},
    "KAN at 1/4 + 1/8, stem stride 2": {"depth": 2, "stem_stride": 2, "kan_levels": [1, 2]},
    "KAN at 1/8, stem stride 2 (default without its refine head)": {
        "depth": 2, "stem_stride": 2, "kan_levels": [2]},
    "KAN at 1/8, degree 2": {"depth": 2, "stem_stride": 2, "kan_levels": [2], "degree": 2},
    "KAN at 1/8, bottleneck convs": {"depth": 2, "stem_stride": 2, "kan_levels": [2],
                                     "bottleneck_convs": True},
    "no KAN (plain residual), stem stride 2": {"depth": 2, "stem_stride": 2, "kan_levels": []},
    "KAN at 1/8, stem stride 1, depth 3": {"depth": 3, "kan_levels": [3]},
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch", default="40,56,40", help="patch size (default 40,56,40)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--out-channels", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (median; default 5)")
    args = p.parse_args(argv)
    patch = [int(v) for v in args.patch.split(",")]
    dims = len(patch)
    torch.manual_seed(0)
    models = {"MONAI UNet 16..128": build_model(BASELINE[0], dims, args.in_channels,
                                                 args.out_channels, **BASELINE[1])}
    for label, kwargs in DESIGNS.items():
        models[label] = build_model("ukanet", dims, args.in_channels, args.out_channels,
                                    width=16, **kwargs)
    batch = torch.randn(args.batch, args.in_channels, *patch)
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    for label, model in models.items():
        model.train()
        train_step(model, optimizers[label], batch)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.rounds):
        for label, model in models.items():
            start = time.perf_counter()
            train_step(model, optimizers[label], batch)
            times[label].append(time.perf_counter() - start)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    base = "MONAI UNet 16..128"
    print(f"patch {patch}, batch {args.batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    print("| design | params | GFLOPs/patch | patches/s | x MONAI UNet speed |")
    print("|---|---|---|---|---|")
    for label, model in models.items():
        gflops = forward_gflops(model, batch[:1])
        speed = args.batch / statistics.median(times[label])
        rel = statistics.median(b / t for t, b in zip(times[label], times[base]))
        print(f"| {label} | {count_params(model) / 1e6:.2f} M | {gflops:.2f} | {speed:.2f} | "
              f"{rel:.2f} |")


if __name__ == "__main__":
    main()
