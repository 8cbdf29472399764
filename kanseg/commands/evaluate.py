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
  kanseg evaluate --pred pred/ --label demo_data/synth --layout brats2021 --output eval/ --lesion-wise

Cases are matched by name: PRED/<case>.nii.gz with LABEL/<case>.nii.gz, or with the cases of
the dataset root LABEL in --layout (then images are used as overlay backgrounds). Scored
labels: the classes (and BraTS regions TC/WT/ET) of --config or a BraTS --layout, else every
label value present. Writes OUTPUT/metrics.csv (case, label, dice, hd95 in mm, voxel counts,
status), OUTPUT/summary.json (mean/std/median per label, problems), OUTPUT/boxplot.png and
OUTPUT/overlays/{worst,best}N_<case>.png. Missing or mismatched cases, and label values
outside the declared labels, are listed per case; the exit code is 1 when no case was scored.

--lesion-wise adds the BraTS 2023+ ranking metrics per label (lesion_dice, lesion_hd95 and
lesion counts in metrics.csv and summary.json): ground-truth lesions are 26-connected
components merged where their --lesion-dilation dilations touch; each is matched to the
predicted components overlapping its dilation; lesions of at most --lesion-min-volume (mm³)
are ignored; unmatched predicted components count as false positives (Dice 0, HD95 374).
Defaults are those of BraTS-GLI 2023 (dilation 3, 50 mm³); BraTS-MET uses 1 and 2.
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
    p.add_argument("--lesion-wise", action="store_true",
                   help="add BraTS 2023+ lesion-wise Dice / HD95 per label")
    p.add_argument("--lesion-dilation", type=int,
                   help="dilation iterations that merge and match lesions (default: 3)")
    p.add_argument("--lesion-min-volume", type=float,
                   help="ignore GT lesions of at most this volume in mm³ (default: 50)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import LesionRule, evaluate

    data_cfg = None
    if args.config is not None:
        from ..config import load_config

        data_cfg = load_config(args.config, validate_model=False).data
    rule_args = {k: v for k, v in (("dilation", args.lesion_dilation),
                                   ("min_volume", args.lesion_min_volume)) if v is not None}
    lesion_rule = LesionRule(**rule_args) if args.lesion_wise or rule_args else None
    summary = evaluate(args.pred, args.label, args.output, layout=args.layout,
                       data_cfg=data_cfg, plots=not args.no_plots, lesion_rule=lesion_rule)
    for name, stats in summary["labels"].items():
        dice, hd = stats["dice"], stats["hd95"]
        lesion = "" if lesion_rule is None else (
            f"   lesion-wise Dice {_fmt(stats['lesion_dice']['mean'])} "
            f"HD95 {_fmt(stats['lesion_hd95']['mean'])}")
        print(f"  {name:>12}: Dice {_fmt(dice['mean'])} ± {_fmt(dice['std'])}   "
              f"HD95 {_fmt(hd['mean'])} ± {_fmt(hd['std'])}{lesion}   (n={dice['n']})")
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
