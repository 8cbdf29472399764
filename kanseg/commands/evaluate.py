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
  kanseg evaluate --pred pred/ --label brats/ --layout brats2023 --output eval/ --brats-lesionwise

Cases are matched by name: PRED/<case>.nii.gz with LABEL/<case>.nii.gz, or with the cases of
the dataset root LABEL in --layout (then images are used as overlay backgrounds). Scored
labels: the classes (and BraTS regions TC/WT/ET) of --config or a BraTS --layout, else every
label value present. Writes OUTPUT/metrics.csv (case, label, dice, hd95 in mm, voxel counts,
status), OUTPUT/summary.json (mean/std/median per label, problems), OUTPUT/boxplot.png and
OUTPUT/overlays/{worst,best}N_<case>.png. Missing or mismatched cases, and label values
outside the declared labels, are listed per case; the exit code is 1 when no case was scored.

--brats-lesionwise (or --lesion-wise) adds the lesion-wise Dice / HD95 per label of the
official BraTS package brats-evaluation 0.0.10 (lesion_dice, lesion_hd95, lesions_gt/tp/fn/fp
in metrics.csv, means in summary.json): lesions are the 26-connected components of each mask,
matched one-to-one to the predicted components by the largest total Dice of overlapping pairs.
--lesion-rules seg (default; BraTS GLI, PED, MEN, GoAT) averages over matched lesions only; no
match gives Dice 0 and HD95 inf, both masks empty NaN. --lesion-rules mets (BraTS-METS)
averages over the GT lesions of at least --lesion-min-volume mm³ (default 20; missed: Dice 0,
HD95 373) and the false positives (0, 373); NaN without such a lesion. Summary means skip NaN
and count a case without prediction as Dice 0, HD95 373.
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
    p.add_argument("--brats-lesionwise", "--lesion-wise", dest="lesion_wise",
                   action="store_true",
                   help="add brats-evaluation's lesion-wise Dice / HD95 per label")
    p.add_argument("--lesion-rules", choices=("seg", "mets"),
                   help="brats-evaluation report to follow (default: seg; mets for BraTS-METS)")
    p.add_argument("--lesion-min-volume", type=float,
                   help="with --lesion-rules mets: GT lesions below this volume in mm³ only "
                        "count as detections (default: 20)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import LesionRule, evaluate

    data_cfg = None
    if args.config is not None:
        from ..config import load_config

        data_cfg = load_config(args.config, validate_model=False).data
    if args.lesion_min_volume is not None and args.lesion_rules != "mets":
        raise ValueError(f"--lesion-min-volume {args.lesion_min_volume} needs --lesion-rules "
                         f"mets (the seg rules score every lesion)")
    rule_args = {k: v for k, v in (("rules", args.lesion_rules),
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
