#!/usr/bin/env python
"""The demo (`make demo`): synthetic BraTS-like data -> train -> infer held-out cases ->
evaluate -> report. Sized for a 2-core CPU (about 10-15 minutes); needs no download.

Every step is the `kanseg` command a user would type (run in this process to save start-up
time), so the printed commands can be re-run one by one.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kanseg.cli import main as kanseg  # noqa: E402

REGIONS = ("TC", "WT", "ET")
TARGET = 0.80


def step(title: str, argv: list[str]) -> None:
    """Print and run one ``kanseg`` command; stop the demo if it fails."""
    print(f"\n=== {title}\n$ kanseg {shlex.join(argv)}", flush=True)
    start = time.monotonic()
    code = kanseg(argv)
    if code:
        sys.exit(f"demo: `kanseg {argv[0]}` failed with exit code {code}")
    print(f"--- {title}: {time.monotonic() - start:.0f} s", flush=True)


def synth(folder: Path, cases: int, size: int, seed: int) -> None:
    if folder.is_dir() and len([p for p in folder.iterdir() if p.is_dir()]) >= cases:
        print(f"\n=== synthetic data: re-using {folder}")
        return
    step(f"synthesise {cases} cases in {folder}",
         ["data", "synth", "--out", str(folder), "--cases", str(cases), "--size", str(size),
          "--seed", str(seed)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "demo_data",
                        help="folder for the synthetic data (default demo_data/)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="run folder (default runs/demo3d-<time>)")
    parser.add_argument("--cases", type=int, default=24, help="training + validation cases")
    parser.add_argument("--heldout", type=int, default=6, help="held-out test cases")
    parser.add_argument("--size", type=int, default=64, help="synthetic volume edge (voxels)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a key of configs/demo3d.yaml")
    args = parser.parse_args(argv)
    start = time.monotonic()
    train_root, test_root = args.data / "synth", args.data / "heldout"
    run = args.run_dir or REPO / "runs" / f"demo3d-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    pred, report = run / "predictions", run / "evaluation"

    synth(train_root, args.cases, args.size, seed=0)
    synth(test_root, args.heldout, args.size, seed=1)  # other seed: unseen cases
    overrides = [f"data.root={train_root}", *args.overrides]
    step("train", ["train", "--config", str(REPO / "configs" / "demo3d.yaml"), "--run-dir",
                   str(run), *[a for o in overrides for a in ("--set", o)]])
    step("infer the held-out cases", ["infer", "--checkpoint", str(run), "--input",
                                      str(test_root), "--layout", "brats2021", "--output",
                                      str(pred)])
    step("evaluate", ["evaluate", "--pred", str(pred), "--label", str(test_root), "--layout",
                      "brats2021", "--config", str(run / "config.yaml"), "--output", str(report)])

    summary = json.loads((report / "summary.json").read_text())
    dice = {r: summary["labels"][r]["dice"]["mean"] for r in REGIONS}
    mean = sum(dice.values()) / len(dice)
    print(f"\n=== demo finished in {(time.monotonic() - start) / 60:.1f} min")
    print(f"held-out Dice ({summary['cases_scored']} cases): "
          + ", ".join(f"{r} {d:.3f}" for r, d in dice.items()) + f"; mean {mean:.3f}")
    print(f"run folder        {run}  (config.yaml, metrics.csv, train.log, tb/, checkpoints/)")
    print(f"learning curves   {run / 'loss.png'}, {run / 'dice.png'}")
    print(f"NIfTI predictions {pred}/<case>.nii.gz (open with the images in ITK-SNAP/Slicer)")
    print(f"evaluation        {report / 'metrics.csv'}, {report / 'summary.json'}")
    print(f"pictures          {report / 'boxplot.png'}, {report / 'overlays'}/")
    print(f"TensorBoard       tensorboard --logdir {run / 'tb'}")
    if mean < TARGET:
        print(f"mean region Dice {mean:.3f} is below the demo target {TARGET:.2f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
