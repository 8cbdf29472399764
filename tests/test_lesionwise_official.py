"""``kanseg evaluate --brats-lesionwise`` against the official BraTS package, brats-evaluation.

The official side runs brats-evaluation's documented Python API on the same NIfTI files:
``Panoptica_Evaluator.load_from_config(config_path(...))`` and ``evaluate_single_exam`` per
case, the JSON that ``brats-evaluate`` writes, then ``parse_seg_results`` /
``parse_mets_results`` (``brats-parse-metrics``). Per case and region the lesion-wise Dice,
HD95 and lesion counts must agree, and so must the means and medians over cases.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

brats_evaluation = pytest.importorskip(
    "brats_evaluation", reason="optional official BraTS metrics: pip install -e '.[brats]'")
from panoptica import Panoptica_Evaluator  # noqa: E402  (brats-evaluation's engine)

from kanseg.cli import main  # noqa: E402
from kanseg.evaluation import LesionRule, lesion_metrics  # noqa: E402

SHAPE = (40, 36, 28)
#: brats-evaluation's region groups (configs/config_gli.yaml) -> kanseg's brats2023 labels
REGIONS = {"netc": "NCR", "snfh": "ED", "et": "ET", "tc": "TC", "wt": "WT"}
LABEL_VALUES = {"NCR": (1,), "ED": (2,), "ET": (3,), "TC": (1, 3), "WT": (1, 2, 3)}
METS_REGIONS = ("et", "tc", "wt")  # configs/config_mets.yaml, less RC (label 4)
TOLERANCE = {"dsc": 1e-6, "hd95": 1e-3}


def _box(out: np.ndarray, lo: tuple[int, ...], hi: tuple[int, ...], value: int) -> None:
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = value


def _label_and_prediction() -> tuple[np.ndarray, np.ndarray]:
    """A BraTS 2023 label map (1 NETC, 2 SNFH, 3 ET) with several lesions per region, and a
    prediction that shifts, splits, relabels, misses and adds some of them."""
    gt = np.zeros(SHAPE, np.uint8)
    _box(gt, (4, 4, 4), (16, 16, 14), 2)  # tumour 1: SNFH
    _box(gt, (7, 7, 6), (13, 13, 12), 1)  # NETC
    _box(gt, (8, 8, 7), (12, 12, 11), 3)  # ET, 64 voxels
    _box(gt, (24, 20, 4), (34, 30, 12), 2)  # tumour 2: SNFH
    _box(gt, (27, 23, 6), (31, 27, 10), 3)  # ET, predicted as NETC
    _box(gt, (14, 28, 18), (20, 34, 24), 1)  # NETC, predicted in two parts
    _box(gt, (20, 4, 20), (22, 6, 23), 3)  # ET of 12 mm³: below the mets threshold
    _box(gt, (30, 4, 18), (32, 6, 23), 3)  # ET of exactly 20 mm³: missed
    pred = np.zeros_like(gt)
    _box(pred, (5, 4, 4), (17, 15, 14), 2)
    _box(pred, (8, 7, 6), (14, 13, 12), 1)
    _box(pred, (9, 8, 7), (13, 13, 11), 3)
    _box(pred, (24, 21, 4), (33, 30, 13), 2)
    _box(pred, (27, 23, 6), (31, 27, 10), 1)
    _box(pred, (14, 28, 18), (17, 34, 24), 1)  # 108 voxels
    _box(pred, (18, 28, 18), (20, 34, 24), 1)  # 72 voxels, one slice apart
    _box(pred, (20, 4, 20), (22, 6, 22), 3)
    _box(pred, (34, 30, 20), (37, 33, 23), 3)  # a false-positive ET
    holes = np.random.default_rng(0).random(SHAPE) < 0.02  # no two shapes alike
    return gt, np.where(holes, 0, pred).astype(np.uint8)


def _save(path: Path, data: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), str(path))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path, dict[str, Path], list[str]]:
    """A brats2023 root and a prediction folder: several lesions, an empty prediction, an
    empty label, a region empty in both, and a case without prediction. BraTS's 1 mm
    isotropic grid: brats-evaluation reads files with SimpleITK, whose (x, y, z) spacing it
    applies to (z, y, x) array axes."""
    base = tmp_path_factory.mktemp("brats")
    root, pred_dir = base / "root", base / "pred"
    gt, pred = _label_and_prediction()
    empty = np.zeros_like(gt)
    cases = {"BraTS-GLI-00001-000": (gt, pred), "BraTS-GLI-00002-000": (gt, empty),
             "BraTS-GLI-00003-000": (empty, pred),
             "BraTS-GLI-00004-000": (np.where(gt == 3, 1, gt), np.where(pred == 3, 1, pred)),
             "BraTS-GLI-00005-000": (gt, None)}
    labels = {}
    for cid, (label, prediction) in cases.items():
        labels[cid] = _save(root / cid / f"{cid}-seg.nii.gz", label.astype(np.uint8))
        if prediction is not None:
            _save(pred_dir / f"{cid}.nii.gz", prediction.astype(np.uint8))
    return root, pred_dir, labels, ["BraTS-GLI-00005-000"]


def _number(text: str) -> float:
    return float(text) if text else math.nan


def _same(value: float | None, expected: float, tol: float) -> bool:
    """Equal within ``tol``, NaN (or None) equal to NaN, inf to inf."""
    if math.isnan(expected):
        return value is None or math.isnan(value)
    return value is not None and value == pytest.approx(expected, abs=tol)


def _official(config: str, dataset, work: Path) -> dict[str, dict[str, float]]:
    """brats-evaluation's parsed report (subject id -> column -> value), missing cases filled
    in as its parser does, plus its ``mean`` and ``median`` rows."""
    _, pred_dir, labels, missing = dataset
    evaluator = Panoptica_Evaluator.load_from_config(str(brats_evaluation.config_path(config)))
    metrics = [brats_evaluation.evaluate_single_exam(str(pred_dir / f"{cid}.nii.gz"),
                                                     str(label), cid, evaluator)
               for cid, label in labels.items() if cid not in missing]
    assert not [m for m in metrics if "error" in m]
    summary, report = work / f"{config}.json", work / f"{config}.csv"
    summary.write_text(json.dumps({"metrics": metrics, "missings": missing}))
    if config == "mets":
        brats_evaluation.parse_mets_results(str(summary), 20.0, 0.1, str(report))
    else:
        brats_evaluation.parse_seg_results(str(summary), str(report))
    with open(report, newline="") as f:
        return {r["subject_id"]: {k: _number(v) for k, v in r.items() if k != "subject_id"}
                for r in csv.DictReader(f)}


def _ours(dataset, output: Path, *options: str) -> tuple[dict, dict]:
    """kanseg's metrics.csv rows by (case, label) and its summary.json."""
    root, pred_dir, _, _ = dataset
    assert main(["evaluate", "--pred", str(pred_dir), "--label", str(root), "--layout",
                 "brats2023", "--output", str(output), "--no-plots", "--brats-lesionwise",
                 *options]) == 0
    with open(output / "metrics.csv", newline="") as f:
        rows = {(r["case"], r["label"]): r for r in csv.DictReader(f) if r["label"]}
    return rows, json.loads((output / "summary.json").read_text())


def _compare(official: dict, rows: dict, summary: dict, regions) -> None:
    compared = 0
    for key in regions:
        label = REGIONS[key]
        for (case, name), row in rows.items():
            if name != label:
                continue
            theirs = official[case]
            for metric, ours in (("dsc", "lesion_dice"), ("hd95", "lesion_hd95")):
                expected = theirs[f"lesionwise_{metric}_mean_{key}"]
                assert _same(_number(row[ours]), expected, TOLERANCE[metric]), (case, key, metric)
            for count in ("tp", "fp", "fn"):
                assert int(row[f"lesions_{count}"]) == theirs[f"all_instance_{count}_{key}"]
            compared += 1
        for metric, ours in (("dsc", "lesion_dice"), ("hd95", "lesion_hd95")):
            for stat in ("mean", "median"):
                expected = official[stat][f"lesionwise_{metric}_mean_{key}"]
                value = summary["labels"][label][ours][stat]
                assert _same(value, expected, TOLERANCE[metric]), (key, metric, stat)
    assert compared == 4 * len(regions)


def test_seg_rules_match_brats_evaluation(dataset, tmp_path):
    official = _official("gli", dataset, tmp_path)
    rows, summary = _ours(dataset, tmp_path / "eval")
    _compare(official, rows, summary, REGIONS)
    first = official["BraTS-GLI-00001-000"]
    assert first["all_instance_fp_et"] >= 1 and first["all_instance_fn_et"] >= 1
    assert math.isfinite(first["lesionwise_hd95_mean_et"])
    assert math.isinf(official["BraTS-GLI-00002-000"]["lesionwise_hd95_mean_wt"])
    assert math.isnan(official["BraTS-GLI-00004-000"]["lesionwise_dsc_mean_et"])


def test_mets_rules_match_brats_evaluation(dataset, tmp_path):
    official = _official("mets", dataset, tmp_path)
    rows, summary = _ours(dataset, tmp_path / "eval", "--lesion-rules", "mets",
                          "--lesion-min-volume", "20")
    _compare(official, rows, summary, METS_REGIONS)
    assert official["mean"]["lesionwise_hd95_mean_et"] > 0


def test_anisotropic_spacing_matches_panoptica_on_arrays():
    """Arrays with an explicit spacing sidestep the SimpleITK axis order of file input."""
    gt, pred = _label_and_prediction()
    spacing = (0.8, 1.2, 2.5)
    evaluator = Panoptica_Evaluator.load_from_config(str(brats_evaluation.config_path("gli")))
    results = evaluator.evaluate(pred, gt, voxelspacing=spacing)
    for key, label in REGIONS.items():
        theirs = results[key].to_dict()
        ours = lesion_metrics(np.isin(pred, LABEL_VALUES[label]), np.isin(gt, LABEL_VALUES[label]),
                              spacing, LesionRule())
        assert _same(ours["lesion_dice"], theirs["sq_dsc"], TOLERANCE["dsc"]), key
        assert _same(ours["lesion_hd95"], theirs["sq_hd95"], TOLERANCE["hd95"]), key
        assert ours["lesions_tp"] == theirs["tp"] and ours["lesions_fp"] == theirs["fp"]
