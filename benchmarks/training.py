"""Training benchmarks of the demo UKANet-3D (``configs/demo3d.yaml``).

1. Throughput (patches/s) of a training step (forward, loss, backward, AdamW) of the demo
   UKANet-3D vs MONAI ``SegResNet`` and ``UNet`` with the closest parameter counts (picked by
   ``benchmarks/inference.py``), same patch size and batch, random inputs.
2. Memory of one training step of the demo model with the memory-lean layer option
   (``recompute=True``) on vs off, each in a fresh process: the bytes autograd saves for
   backward, and the peak growth of the process memory during the step (CPU: resident set
   sampled every millisecond; CUDA: peak allocated).
3. The share of step time spent waiting for data, from a real 1-epoch ``kanseg train`` run on
   the synthetic set (``metrics.csv: data_wait_frac``).

    python benchmarks/training.py --data demo_data/synth            # all three
    python benchmarks/training.py --steps 3 --skip-data              # 1 and 2 only
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from inference import closest, n_params  # noqa: E402  (shared with the other benchmarks)
from layers import saved_bytes  # noqa: E402
from monai.networks.nets import SegResNet, UNet  # noqa: E402

from kanseg.config import load_config  # noqa: E402
from kanseg.engine.losses import build_loss  # noqa: E402

CONFIG = REPO / "configs" / "demo3d.yaml"


def batch_for(cfg, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = cfg.data.batch_size * cfg.data.samples_per_case
    shape = (n, *cfg.data.patch_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape[0], cfg.model.kwargs["in_channels"], *shape[1:], generator=gen)
    y = (torch.rand(shape[0], cfg.model.kwargs["out_channels"], *shape[1:], generator=gen) > 0.9)
    return x.to(device), y.float().to(device)


def train_step(model, loss_fn, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    opt.step()


def candidates(cfg, in_ch: int, out_ch: int) -> dict:
    """The demo model and MONAI baselines with the closest parameter counts."""
    kan = cfg.model.build()
    target = n_params(kan)
    segres, f = closest(lambda w: SegResNet(3, init_filters=w, in_channels=in_ch,
                                            out_channels=out_ch, norm=("GROUP", {"num_groups": 4})),
                        range(4, 65, 4), target)
    unet, c = closest(lambda w: UNet(3, in_ch, out_ch, channels=[w * 2**i for i in range(5)],
                                     strides=[2, 2, 2, 2], num_res_units=2), range(2, 65), target)
    return {"UKANet-3D": (kan, "demo3d (KAGN deg 2, width 8, depth 2)"),
            "SegResNet": (segres, f"init_filters={f}, 4 groups"),
            "UNet": (unet, f"channels={c}..{16 * c}, 2 res units")}


def throughput(cfg, device: str, steps: int) -> list[dict]:
    loss_fn = build_loss(cfg.loss, overlapping_labels=True)
    x, y = batch_for(cfg, device)
    rows = []
    for name, (model, variant) in candidates(cfg, x.shape[1], y.shape[1]).items():
        model = model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        train_step(model, loss_fn, opt, x, y)  # warm-up
        times = []
        for _ in range(steps):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_step(model, loss_fn, opt, x, y)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        step_s = statistics.median(times)
        rows.append({"model": name, "variant": variant, "params_m": n_params(model) / 1e6,
                     "step_s": step_s, "patches_per_s": len(x) / step_s})
        print(f"{name:10s} {variant:32s} {n_params(model) / 1e6:6.2f} M  "
              f"{step_s:7.2f} s/step  {len(x) / step_s:6.2f} patches/s", flush=True)
    return rows


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(recompute: bool, device: str) -> tuple[float, float]:
    """(MB saved for backward, MB of peak memory growth) of one training step."""
    cfg = load_config(CONFIG, [f"model.recompute={str(recompute).lower()}"])
    model = cfg.model.build().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = batch_for(cfg, device)
    loss_fn = build_loss(cfg.loss, overlapping_labels=True)
    train_step(model, loss_fn, opt, x, y)  # allocate optimizer state and allocator pools
    saved = saved_bytes(lambda: loss_fn(model(x), y)) / 2**20
    opt.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(model, loss_fn, opt, x, y)
        return saved, (torch.cuda.max_memory_allocated() - base) / 2**20
    base, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    train_step(model, loss_fn, opt, x, y)
    done.set()
    sampler.join()
    return saved, max(peak[0], _rss_mb()) - base


def peak_memory(device: str) -> dict[str, dict[str, float]]:
    out = {}
    for flag in ("off", "on"):
        res = subprocess.run([sys.executable, __file__, "--memory-child", flag, "--device", device],
                             capture_output=True, text=True, encoding="utf-8", errors="replace", check=True)
        saved, peak = (float(v) for v in res.stdout.strip().splitlines()[-1].split())
        out[flag] = {"saved_for_backward_mb": saved, "peak_growth_mb": peak}
        print(f"recompute {flag:3s}: {saved:7.1f} MB saved for backward, peak memory "
              f"+{peak:.0f} MB during one step", flush=True)
    return out


def data_wait(data: Path, minutes: float) -> dict[str, float]:
    """Run one epoch of the real pipeline and read its data-wait share and throughput."""
    from kanseg.cli import main as kanseg

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        kanseg(["train", "--config", str(CONFIG), "--run-dir", str(run), "--set",
                f"data.root={data}", "--set", "trainer.max_epochs=1", "--set",
                f"trainer.max_minutes={minutes}"])
        row = list(csv.DictReader(open(run / "metrics.csv")))[0]
    result = {k: float(row[k]) for k in ("data_wait_frac", "patches_per_s")}
    print(f"real pipeline: {result['patches_per_s']:.2f} patches/s, "
          f"{100 * result['data_wait_frac']:.1f}% of step time waiting for data", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--data", type=Path, default=REPO / "demo_data" / "synth",
                        help="synthetic set for the data-wait measurement")
    parser.add_argument("--minutes", type=float, default=3.0, help="cap of the 1-epoch run")
    parser.add_argument("--skip-data", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--memory-child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(*memory_child(args.memory_child == "on", args.device))
        return 0
    cfg = load_config(CONFIG)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {args.device}; patch "
          f"{cfg.data.patch_size} x {cfg.data.batch_size * cfg.data.samples_per_case}", flush=True)
    results = {"throughput": throughput(cfg, args.device, args.steps),
               "peak_memory_mb": peak_memory(args.device)}
    if not args.skip_data:
        results["data"] = data_wait(args.data, args.minutes)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
