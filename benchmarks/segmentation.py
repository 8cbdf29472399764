"""Segmentation at equal wall-clock: KAN networks and MONAI baselines, same data and budget.

For a dataset config, every model variant is trained with ``kanseg train`` for the same
``trainer.max_minutes`` (the trainer validates when the budget runs out), for each seed. The
report gives per variant the final and best validation Dice (mean ± sd over seeds, overall and
per class), parameters, forward GFLOPs per patch (:mod:`kanseg.models.cost`), the median
training patches/s from ``metrics.csv`` and the optimiser steps done.

    python benchmarks/segmentation.py                                   # hippocampus, 10 min
    python benchmarks/segmentation.py --config configs/cxr_lung2d.yaml --minutes 8
    python benchmarks/segmentation.py --variant ukanet --variant monai_unet \\
        --variant ukanet_d2:model.degree=2,model.kan_levels=[2,3] --seeds 0 1 2

A variant is ``NAME`` (one of the defaults below) or ``NAME:key=value,key=value`` (config
overrides as for ``kanseg train --set``). Each run goes to ``OUT/<variant>-s<seed>``; a run
whose folder holds ``bench_run.json`` is finished and skipped, so an interrupted benchmark
resumes where it stopped (unfinished run folders are started again). The results are written
to ``OUT/results.json`` and ``OUT/results.md``. Runs take the whole machine: close other work,
the load average is recorded at start and end.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

#: default variants: overrides of the dataset config. "ukanet" is the config's own model; the
#: baselines pin their size, so that the config's KAN width/depth do not carry over to them
#: (monai_unet: channels 16..128, 2 residual units, the UNet of issue 9).
DEFAULT_VARIANTS: dict[str, list[str]] = {
    "ukanet": [],
    "monai_unet": ["model.name=monai_unet", "model.width=16", "model.depth=3"],
    "segresnet": ["model.name=segresnet", "model.width=16"],
    "dynunet": ["model.name=dynunet", "model.width=16", "model.depth=4"],
}
DONE = "bench_run.json"


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"name:a.b=1,c.d=[2,3]"`` -> ``("name", ["a.b=1", "c.d=[2,3]"])``; ``"name"`` -> a
    default variant. Commas inside values are kept (a new item starts at ``,key=``)."""
    name, sep, rest = text.partition(":")
    if not sep:
        if name not in DEFAULT_VARIANTS:
            raise argparse.ArgumentTypeError(
                f"unknown variant {name!r}: use one of {sorted(DEFAULT_VARIANTS)} or "
                "NAME:key=value,key=value")
        return name, DEFAULT_VARIANTS[name]
    overrides = [item for item in re.split(r",(?=[\w.]+=)", rest) if item]
    if not re.fullmatch(r"[\w.-]+", name) or any("=" not in o for o in overrides):
        raise argparse.ArgumentTypeError(
            f"a variant is NAME or NAME:key=value,key=value (e.g. unet:model.name=monai_unet), "
            f"got {text!r}")
    return name, overrides


def train_command(args: argparse.Namespace, run_dir: Path, seed: int,
                  overrides: Sequence[str]) -> list[str]:
    """The ``kanseg train`` command line of one run."""
    sets = [f"trainer.max_minutes={args.minutes}", f"trainer.seed={seed}",
            f"data.fold={args.fold}", *overrides]
    return [sys.executable, "-m", "kanseg.cli", "train", "--config", str(args.config),
            "--run-dir", str(run_dir), *[part for s in sets for part in ("--set", s)]]


def run_one(command: list[str], run_dir: Path, log_path: Path) -> dict[str, Any]:
    """Run ``command`` (output to ``log_path``); on success mark ``run_dir`` finished."""
    if run_dir.exists():  # an unfinished run of an earlier, interrupted benchmark
        shutil.rmtree(run_dir)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = rc = os.waitstatus_to_exitcode(status)
    record = {"returncode": rc, "wall_s": round(time.monotonic() - start, 1),
              "peak_rss_mb": round(usage.ru_maxrss / 1024),  # KiB on Linux
              "command": shlex.join(command), "log": str(log_path)}
    if rc == 0:
        (run_dir / DONE).write_text(json.dumps(record, indent=2))
    return record


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """The rows of ``run_dir/metrics.csv`` (one per epoch, the last one when time ran out)."""
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def run_summary(run_dir: Path) -> dict[str, Any]:
    """Final (last validation) and best Dice per column, median patches/s, steps of one run."""
    rows = read_metrics(run_dir)
    val_rows = [r for r in rows if r.get("val_dice_mean")]
    if not val_rows:
        raise ValueError(f"{run_dir}/metrics.csv holds no validation row")
    dice_keys = [k for k in val_rows[-1] if k.startswith("val_dice_")]
    return {"final": {k[len("val_dice_"):]: float(val_rows[-1][k]) for k in dice_keys},
            "best": {k[len("val_dice_"):]: max(float(r[k]) for r in val_rows)
                     for k in dice_keys},
            "patches_per_s": statistics.median(float(r["patches_per_s"]) for r in rows),
            "steps": int(rows[-1]["step"]), "train_time_s": float(rows[-1]["time_s"]),
            "validations": len(val_rows)}


def model_cost_of_run(run_dir: Path) -> dict[str, float]:
    """Parameters and forward GFLOPs per patch of the network in the run's resolved config."""
    from kanseg.config import load_config
    from kanseg.models import resolved_config
    from kanseg.models.cost import count_params, forward_gflops

    cfg = load_config(run_dir / "config.yaml")
    model = cfg.model.build()
    example = torch.randn(1, resolved_config(model)["in_channels"], *cfg.data.patch_size)
    return {"params": count_params(model), "gflops": forward_gflops(model, example),
            "patch": list(cfg.data.patch_size), "batch": cfg.data.batch_size}


def mean_sd(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample sd (0 for a single value)."""
    return {"mean": statistics.mean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± sd over the finished runs of one variant."""
    done = [r for r in runs if "final" in r]
    if not done:
        return {}
    return {kind: {k: mean_sd([r[kind][k] for r in done]) for k in done[0][kind]}
            for kind in ("final", "best")} | {
        "patches_per_s": statistics.median(r["patches_per_s"] for r in done),
        "steps": statistics.median(r["steps"] for r in done), "finished": len(done),
        "peak_rss_mb": max((r.get("peak_rss_mb", 0) for r in done), default=0)}


def fmt(stat: dict[str, float] | None, digits: int = 3) -> str:
    """``mean ± sd`` of a :func:`mean_sd` result (the sd only with more than one value)."""
    if not stat:
        return "n/a"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['sd']:.{digits}f}" if stat["n"] > 1 else "")


def markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table with the conditions of the run."""
    variants = report["variants"]
    classes = next((list(v["summary"]["final"]) for v in variants.values() if v["summary"]), [])
    classes = [c for c in classes if c != "mean"]
    env = report["environment"]
    lines = [
        f"Equal wall-clock segmentation benchmark: `{report['config']}`, fold {report['fold']}, "
        f"{report['minutes']} min per run, seeds {report['seeds']}.",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}; {env['cpus']} CPUs, {env['device']}, torch {env['torch']}",
        f"- load average (1/5/15 min) at start {env['load_start']}, at end {env['load_end']}",
        "",
        "| variant | params (M) | GFLOPs/patch | patches/s | steps | final Dice | best Dice | "
        + " | ".join(f"final {c}" for c in classes) + " |",
        "|" + "---|" * (7 + len(classes)),
    ]
    for name, v in variants.items():
        s, cost = v["summary"], v.get("cost") or {}
        params = f"{cost['params'] / 1e6:.3f}" if cost else "n/a"
        gflops = f"{cost['gflops']:.3f}" if cost else "n/a"
        speed = f"{s['patches_per_s']:.2f}" if s else "n/a"
        steps = f"{s['steps']:.0f}" if s else "n/a"
        per_class = [fmt(s["final"].get(c)) if s else "n/a" for c in classes]
        lines.append(f"| {name} | {params} | {gflops} | {speed} | {steps} | "
                     f"{fmt(s['final']['mean']) if s else 'n/a'} | "
                     f"{fmt(s['best']['mean']) if s else 'n/a'} | " + " | ".join(per_class) + " |")
    lines += ["", "Dice: validation Dice (mean over classes) at the end of the budget (final) and "
              "the best validation of the run (best), mean ± sd over seeds; patches/s and steps: "
              "median over seeds; GFLOPs: forward convolutions/matmuls of one patch.", ""]
    for name, v in variants.items():
        failed = [r for r in v["runs"] if "final" not in r]
        for r in failed:
            lines.append(f"- {name} seed {r['seed']} failed: see `{r.get('log')}`")
    return "\n".join(lines) + "\n"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine()


def benchmark_variant(args: argparse.Namespace, name: str, overrides: list[str],
                      counter: list[int], total: int) -> dict[str, Any]:
    """Train (or reuse) every seed of one variant; its runs, summary and cost."""
    runs = []
    for seed in args.seeds:
        counter[0] += 1
        run_dir = args.out / f"{name}-s{seed}"
        label = f"[{counter[0]}/{total}] {name} seed {seed}"
        if (run_dir / DONE).is_file():
            record = json.loads((run_dir / DONE).read_text())
            print(f"{label}: finished earlier:", end=" ", flush=True)
        else:
            print(f"{label}: training {args.minutes} min ...", end=" ", flush=True)
            record = run_one(train_command(args, run_dir, seed, overrides), run_dir,
                             args.out / "logs" / f"{name}-s{seed}.log")
        run = {"seed": seed, "run_dir": str(run_dir), **record}
        if record["returncode"] == 0:
            run |= run_summary(run_dir)
            print(f"{run['steps']} steps, {run['patches_per_s']:.2f} patches/s, final Dice "
                  f"{run['final']['mean']:.3f} ({record['wall_s']:.0f} s)", flush=True)
        else:
            print(f"failed (exit {record['returncode']}): see {record['log']}", flush=True)
        runs.append(run)
    finished = [r for r in runs if "final" in r]
    cost = model_cost_of_run(Path(finished[0]["run_dir"])) if finished else None
    return {"overrides": overrides, "runs": runs, "summary": summarise(runs), "cost": cost}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/msd_hippocampus.yaml"),
                   help="dataset config (default configs/msd_hippocampus.yaml)")
    p.add_argument("--variant", dest="variants", action="append", type=parse_variant,
                   metavar="NAME[:key=value,...]",
                   help=f"model variant (repeatable; default: {', '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default 0 1 2")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="training budget per run (trainer.max_minutes; default 10)")
    p.add_argument("--fold", type=int, default=0, help="validation fold (default 0)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_segmentation"),
                   help="output folder (default runs/bench_segmentation)")
    args = p.parse_args(argv)
    args.variants = dict(args.variants or DEFAULT_VARIANTS.items())
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    load_start = load_average()
    print(f"load average {load_start} on {os.cpu_count()} CPUs")
    if os.getloadavg()[0] > 0.5:
        print("warning: the machine is busy (1-min load average > 0.5): speeds and the work "
              "done in the budget will be lower than on an idle machine", flush=True)
    report: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/segmentation.py",
                               *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "config": str(args.config),
        "minutes": args.minutes, "fold": args.fold, "seeds": args.seeds, "variants": {}}
    counter, total = [0], len(args.variants) * len(args.seeds)
    for name, overrides in args.variants.items():
        report["variants"][name] = benchmark_variant(args, name, overrides, counter, total)
    report["environment"] = {"cpus": os.cpu_count(), "device": device_name(),
                             "torch": torch.__version__, "load_start": load_start,
                             "load_end": load_average()}
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (args.out / "results.md").write_text(text)
    print(f"\n{text}\nwrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    failed = sum(1 for v in report["variants"].values() for r in v["runs"] if "final" not in r)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
