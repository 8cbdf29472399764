"""``kanseg evaluate``: Dice / HD95 of predicted label maps against ground truth."""
from __future__ import annotations

import argparse
from pathlib import Path

from .infer import LAYOUTS

EXAMPLES = """\
examples:
  kanseg evaluate --pred pred/ --label labels/ --output eval/
  kanseg evaluate --pred pred/ --label demo_data/synth --layout brats2021 --output eval/
  kanseg evaluate --pred pred/ --label labelsTr/ --config runs/msd/config.yaml --output eval/

Cases are matched by name: PRED/<case>.nii.gz with LABEL/<case>.nii.gz, or with the cases of
the dataset root LABEL in --layout (then images are used as overlay backgrounds). Scored
labels: the classes (and BraTS regions TC/WT/ET) of --config or a BraTS --layout, else every
label value present. Writes OUTPUT/metrics.csv (case, label, dice, hd95 in mm, voxel counts,
status), OUTPUT/summary.json (mean/std/median per label, problems), OUTPUT/boxplot.png and
OUTPUT/overlays/{worst,best}N_<case>.png. Missing or mismatched cases, and label values
outside the declared labels, are listed per case; the exit code is 1 when no case was scored.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="per-case Dice / HD95 per class and region, CSV + JSON + plots",
        description="Score predictions against ground truth with MONAI's DiceMetric and "
                    "HausdorffDistanceMetric (95th percentile, voxel spacing from the header).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", required=True, type=Path, help="folder of <case>.nii.gz predictions")
    p.add_argument("--label", required=True, type=Path,
                   help="folder of <case>.nii.gz labels, or a dataset root with --layout")
    p.add_argument("--output", required=True, type=Path, help="folder for the reports")
    p.add_argument("--layout", choices=LAYOUTS, help="read --label as a dataset root")
    p.add_argument("--config", type=Path,
                   help="config (e.g. the run's config.yaml) whose data section names the labels")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate

    data_cfg = None
    if args.config is not None:
        from ..config import load_config

        data_cfg = load_config(args.config, validate_model=False).data
    summary = evaluate(args.pred, args.label, args.output, layout=args.layout,
                       data_cfg=data_cfg, plots=not args.no_plots)
    for name, stats in summary["labels"].items():
        dice, hd = stats["dice"], stats["hd95"]
        print(f"  {name:>12}: Dice {_fmt(dice['mean'])} ± {_fmt(dice['std'])}   "
              f"HD95 {_fmt(hd['mean'])} ± {_fmt(hd['std'])}   (n={dice['n']})")
    for problem in summary["problems"]:
        print(f"  problem: {problem['case']}: {problem['status']}")
    print(f"scored {summary['cases_scored']} case(s), mean Dice {_fmt(summary['mean_dice'])}; "
          f"{len(summary['problems'])} problem(s). Reports in {args.output}: metrics.csv, "
          f"summary.json, boxplot.png, overlays/")
    if not summary["cases_scored"]:
        raise ValueError(f"no case was scored ({len(summary['problems'])} problem(s) above)")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
