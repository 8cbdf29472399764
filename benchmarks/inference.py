"""Sliding-window inference time of a BraTS-sized volume: the brats3d UKANet vs MONAI baselines.

All models run through the same code path as ``kanseg infer`` (``kanseg.inference.Predictor``:
MONAI ``SlidingWindowInferer`` with the config's ROI, overlap, Gaussian blending and sw batch
size) on one random 4 x 240 x 240 x 155 volume. Baselines are MONAI ``SegResNet`` and ``UNet``
with widths chosen so that their parameter counts are closest to the KAN model's.

    python benchmarks/inference.py                     # median of 3 timed runs per model
    python benchmarks/inference.py --quick             # 1 timed run, no warm-up
    python benchmarks/inference.py --device cuda --json result.json
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from monai.networks.nets import SegResNet, UNet
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kanseg.config import load_config  # noqa: E402
from kanseg.data.layouts import input_channels, label_spec  # noqa: E402
from kanseg.inference import Predictor, resolve_device, settings_from_config  # noqa: E402
from kanseg.models import create_model  # noqa: E402


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def closest(build, widths, target: int) -> tuple[nn.Module, int]:
    """The model of ``build(width)`` whose parameter count is closest to ``target`` (log)."""
    def gap(w: int) -> float:
        with torch.device("meta"):
            count = n_params(build(w))
        return abs(math.log(count / target))
    width = min(widths, key=gap)
    return build(width), width


def models(cfg, in_ch: int, out_ch: int, source: str) -> dict[str, tuple[nn.Module, str]]:
    kwargs = {"spatial_dims": 3, "in_channels": in_ch, "out_channels": out_ch,
              **cfg.model.kwargs}
    kan = create_model(cfg.model.name, **kwargs)
    target = n_params(kan)
    segres, f = closest(lambda w: SegResNet(3, init_filters=w, in_channels=in_ch,
                                            out_channels=out_ch), range(8, 129, 8), target)
    unet, c = closest(lambda w: UNet(3, in_ch, out_ch, channels=[w * 2**i for i in range(5)],
                                     strides=[2, 2, 2, 2], num_res_units=2),
                      range(8, 65, 2), target)
    return {cfg.model.name: (kan, source), "SegResNet": (segres, f"init_filters={f}"),
            "UNet": (unet, f"channels={c}..{16 * c}, 2 res units")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "brats3d.yaml"))
    p.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model (median)")
    p.add_argument("--quick", action="store_true", help="1 timed run and no warm-up")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tta", action="store_true",
                   help="use the config's flip TTA (x8 cost in 3D); off by default")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--only", nargs="+", help="time only these models")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, validate_model=False)
    spec = label_spec(cfg.data)
    in_ch = cfg.model.kwargs.get("in_channels") or input_channels(cfg.data)
    settings = settings_from_config(cfg, device=args.device, tta_flips=args.tta)
    repeats = 1 if args.quick else args.repeats
    torch.manual_seed(0)
    volume = torch.randn(in_ch, *args.shape)
    print(f"volume {in_ch}x{'x'.join(map(str, args.shape))}, roi {list(settings.roi_size)}, "
          f"overlap {settings.overlap}, {settings.mode}, sw_batch_size "
          f"{settings.sw_batch_size}, TTA {settings.tta_flips}, device {args.device}, "
          f"threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print("| model | params | variant | median | runs |\n|---|---|---|---|---|")
    results = []
    for name, (model, note) in models(cfg, in_ch, spec.out_channels,
                                      Path(args.config).name).items():
        if args.only and name not in args.only:
            continue
        predictor = Predictor(model, spec, settings)
        times = []
        for i in range(repeats + (0 if args.quick else 1)):
            if resolve_device(settings.device).type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            predictor(volume)
            if resolve_device(settings.device).type == "cuda":
                torch.cuda.synchronize()
            if args.quick or i > 0:  # the first run is a warm-up
                times.append(time.perf_counter() - start)
        row = {"model": name, "params_M": round(n_params(model) / 1e6, 2), "note": note,
               "median_s": round(statistics.median(times), 2),
               "runs_s": [round(t, 2) for t in times]}
        results.append(row)
        print(f"| {name} | {row['params_M']} M | {note} | {row['median_s']} s | "
              f"{row['runs_s']} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
