"""Evaluation: Dice / HD95 against independent numpy formulas, regions, reports, mismatches."""
from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kanseg.cli import main
from kanseg.evaluation import (EvalLabel, LesionRule, evaluate, labels_for, lesion_metrics,
                               mask_metrics)

SPACING = (0.8, 1.2, 2.5)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with at least one face neighbour outside the mask (or the array)."""
    padded = np.pad(mask, 1)
    interior = mask.copy()
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            interior &= np.roll(padded, shift, axis)[tuple(slice(1, -1) for _ in mask.shape)]
    return mask & ~interior


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each surface voxel of ``a`` to ``b``'s surface and back, by brute force
    over all point pairs."""
    pa, pb = np.argwhere(_surface(a)) * spacing, np.argwhere(_surface(b)) * spacing
    d = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1))
    return d.min(1), d.min(0)


def _hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """MONAI's HD95: the larger of the two directed 95th percentiles."""
    return max(np.percentile(d, 95) for d in _surface_distances(a, b, spacing))


def _pooled_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """panoptica's HD95: the 95th percentile of both directions pooled."""
    return float(np.percentile(np.concatenate(_surface_distances(a, b, spacing)), 95))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _save(path: Path, data: np.ndarray, spacing=SPACING, offset=(0.0, 0.0, 0.0)) -> Path:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = offset
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), str(path))
    return path


def _toy_pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth and an imperfect prediction with BraTS labels (1 NCR, 2 ED, 4 ET)."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((14, 12, 9), np.uint8)
    gt[2:11, 2:10, 1:8] = 2
    gt[4:9, 4:8, 2:6] = 1
    gt[5:8, 5:7, 3:5] = 4
    pred = np.roll(gt, shift=(1, -1, 0), axis=(0, 1, 2))
    pred[rng.random(gt.shape) < 0.03] = 0
    pred[9:12, 9:11, 6:8] = 4  # a false-positive blob
    return gt, pred


def test_single_voxel_distances_by_hand():
    gt = np.zeros((5, 5, 8), np.uint8)
    pred = np.zeros_like(gt)
    gt[2, 2, 2], pred[2, 2, 5] = 1, 1
    (row,) = mask_metrics(pred, gt, [EvalLabel("x", (1,))], (1.0, 1.0, 2.0))
    assert row["dice"] == 0.0
    assert row["hd95"] == pytest.approx(6.0)  # 3 slices of 2 mm


def test_dice_and_hd95_match_brute_force_on_toy_masks():
    gt, pred = _toy_pair()
    labels = [EvalLabel("NCR", (1,)), EvalLabel("ED", (2,)), EvalLabel("WT", (1, 2, 4))]
    rows = mask_metrics(pred, gt, labels, SPACING)
    for row, lb in zip(rows, labels):
        a, b = np.isin(pred, lb.values), np.isin(gt, lb.values)
        assert row["label"] == lb.name
        assert row["dice"] == pytest.approx(_dice(a, b), abs=1e-6)
        assert row["hd95"] == pytest.approx(_hd95(a, b, np.array(SPACING)), rel=1e-5)
        assert (row["gt_voxels"], row["pred_voxels"]) == (b.sum(), a.sum())
        assert 0 < row["dice"] < 1 and row["hd95"] > 0
        tp, fp = (a & b).sum(), (a & ~b).sum()
        fn, tn = (~a & b).sum(), (~a & ~b).sum()
        assert row["iou"] == pytest.approx(tp / (tp + fp + fn), abs=1e-6)
        assert row["precision"] == pytest.approx(tp / (tp + fp), abs=1e-6)
        assert row["recall"] == pytest.approx(tp / (tp + fn), abs=1e-6)
        assert row["specificity"] == pytest.approx(tn / (tn + fp), abs=1e-6)


def test_brats_regions_and_empty_mask_conventions():
    labels = labels_for(layout="brats2021")
    assert [(lb.name, lb.values) for lb in labels] == [
        ("NCR", (1,)), ("ED", (2,)), ("TC", (1, 4)), ("WT", (1, 2, 4)), ("ET", (4,))]
    gt, pred = _toy_pair(1)
    rows = {r["label"]: r for r in mask_metrics(pred, gt, labels, SPACING)}
    tc_p, tc_g = np.isin(pred, (1, 4)), np.isin(gt, (1, 4))
    assert rows["TC"]["dice"] == pytest.approx(_dice(tc_p, tc_g), abs=1e-6)
    assert rows["TC"]["hd95"] == pytest.approx(_hd95(tc_p, tc_g, np.array(SPACING)), rel=1e-5)
    # ET absent from both -> Dice 1, HD95 0; ET only predicted -> Dice 0, HD95 undefined
    gt[gt == 4], pred[pred == 4] = 1, 1
    assert mask_metrics(pred, gt, labels[-1:], SPACING)[0] == {
        "label": "ET", "dice": 1.0, "hd95": 0.0, "iou": 1.0, "precision": None, "recall": None,
        "specificity": 1.0, "gt_voxels": 0, "pred_voxels": 0, "status": "ok"}
    pred[0, 0, 0] = 4
    only_pred = mask_metrics(pred, gt, labels[-1:], SPACING)[0]
    assert only_pred["dice"] == 0.0 and np.isnan(only_pred["hd95"])
    assert only_pred["status"] == "empty ground truth"
    assert (only_pred["iou"], only_pred["precision"], only_pred["recall"]) == (0.0, 0.0, None)


def test_evaluate_writes_reports_and_reports_mismatches_per_case(tmp_path, capsys):
    pred_dir, label_dir = tmp_path / "pred", tmp_path / "labels"
    expected = {}
    for i in range(3):
        gt, pred = _toy_pair(i)
        _save(label_dir / f"case{i}.nii.gz", gt)
        _save(pred_dir / f"case{i}.nii.gz", pred)
        expected[f"case{i}"] = (gt, pred)
    gt, pred = _toy_pair(5)
    _save(label_dir / "no_pred.nii.gz", gt)
    _save(pred_dir / "no_label.nii.gz", pred)
    _save(label_dir / "shape.nii.gz", gt)
    _save(pred_dir / "shape.nii.gz", pred[:, :, :-1])
    _save(label_dir / "shifted.nii.gz", gt)
    _save(pred_dir / "shifted.nii.gz", pred, offset=(5.0, 0.0, 0.0))
    _save(label_dir / "corrupt.nii.gz", gt)
    (pred_dir / "corrupt.nii.gz").write_bytes(b"garbage")

    out = tmp_path / "eval"
    rc = main(["evaluate", "--pred", str(pred_dir), "--label", str(label_dir),
               "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"case", "label", "dice", "hd95"} <= set(rows[0])
    status = {r["case"]: r["status"] for r in rows if not r["label"]}
    assert status["no_pred"] == "missing prediction"
    assert status["no_label"] == "missing label"
    assert status["shape"].startswith("shape mismatch")
    assert status["shifted"].startswith("affine mismatch")
    assert status["corrupt"].startswith("unreadable")
    for case in status:
        assert case in printed
    scored = [r for r in rows if r["label"]]
    for r in scored:  # without a config, every value present is scored as its own class
        gt, pred = expected[r["case"]]
        v = int(r["label"])
        assert float(r["dice"]) == pytest.approx(_dice(pred == v, gt == v), abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert {p["case"] for p in summary["problems"]} == set(status)
    dice_ncr = [float(r["dice"]) for r in scored if r["label"] == "1"]
    assert summary["labels"]["1"]["dice"]["mean"] == pytest.approx(np.mean(dice_ncr))
    assert summary["labels"]["1"]["dice"]["std"] == pytest.approx(np.std(dice_ncr))
    assert summary["labels"]["1"]["dice"]["median"] == pytest.approx(np.median(dice_ncr))
    assert (out / "boxplot.png").stat().st_size > 0
    assert len(list((out / "overlays").glob("*.png"))) == 2  # 1 worst + 1 best of 3 cases


def test_evaluate_dataset_layout_uses_regions_and_images(tmp_path):
    root, pred_dir = tmp_path / "brats", tmp_path / "pred"
    for i in range(2):
        cid = f"BraTS2021_0000{i}"
        gt, pred = _toy_pair(i)
        for mod in ("t1", "t1ce", "t2", "flair"):
            _save(root / cid / f"{cid}_{mod}.nii.gz", gt * 10)
        _save(root / cid / f"{cid}_seg.nii.gz", gt)
        _save(pred_dir / f"{cid}.nii.gz", pred)
    summary = evaluate(pred_dir, root, tmp_path / "eval", layout="brats2021", progress=False)
    assert list(summary["labels"]) == ["NCR", "ED", "TC", "WT", "ET"]
    assert summary["cases_scored"] == 2 and not summary["problems"]
    assert len(list((tmp_path / "eval" / "overlays").glob("*.png"))) == 2


def test_unusable_arguments_exit_non_zero(tmp_path, capsys):
    (tmp_path / "labels").mkdir()
    rc = main(["evaluate", "--pred", str(tmp_path / "missing"), "--label",
               str(tmp_path / "labels"), "--output", str(tmp_path / "eval")])
    assert rc != 0
    assert "missing" in capsys.readouterr().err


def test_undeclared_label_values_are_problems_and_nothing_scored_exits_1(tmp_path, capsys):
    pred_dir, label_dir = tmp_path / "pred", tmp_path / "labels"
    for i in range(2):
        gt, pred = _toy_pair(i)
        gt[0, 0, 0] = 7  # not a BraTS label
        _save(label_dir / f"BraTS2021_{i:05d}.nii.gz", gt)
        _save(pred_dir / f"BraTS2021_{i:05d}.nii.gz", pred)
    out, config = tmp_path / "eval", tmp_path / "config.yaml"
    config.write_text(f"data: {{root: {label_dir}, layout: brats2021}}\n"
                      "loss: {name: dice_bce}\n")
    rc = main(["evaluate", "--pred", str(pred_dir), "--label", str(label_dir), "--output",
               str(out), "--config", str(config), "--no-plots"])
    assert rc == 1
    captured = capsys.readouterr()
    assert "BraTS2021_00001.nii.gz has label values [7] outside the declared set [0, 1, 2, 4]" \
        in captured.out
    assert "no case was scored (2 problem(s)" in captured.err
    assert json.loads((out / "summary.json").read_text())["cases_scored"] == 0


# ----------------------------------------------------------------------------- lesion-wise
NEIGHBOURS_26 = [d for d in itertools.product((-1, 0, 1), repeat=3) if any(d)]


def _ref_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components by flood fill, numbered 1..n."""
    labels, n = np.zeros(mask.shape, int), 0
    for start in map(tuple, np.argwhere(mask)):
        if labels[start]:
            continue
        n += 1
        labels[start], stack = n, [start]
        while stack:
            voxel = stack.pop()
            for d in NEIGHBOURS_26:
                w = tuple(int(a + b) for a, b in zip(voxel, d))
                if all(0 <= i < k for i, k in zip(w, mask.shape)) and mask[w] and not labels[w]:
                    labels[w] = n
                    stack.append(w)
    return labels, n


def _ref_matching(gt_cc: np.ndarray, n_gt: int, pred_cc: np.ndarray,
                  n_pred: int) -> list[tuple[int, int]]:
    """The one-to-one matching of overlapping components with the largest summed Dice (then
    the most pairs), by exhaustive search."""
    dice = {(g, p): _dice(gt_cc == g, pred_cc == p) for g in range(1, n_gt + 1)
            for p in range(1, n_pred + 1) if ((gt_cc == g) & (pred_cc == p)).any()}

    def best(g: int, used: frozenset) -> tuple[tuple[float, int], list]:
        if g > n_gt:
            return (0.0, 0), []
        options = [best(g + 1, used)]
        for p in (p for (gg, p) in dice if gg == g and p not in used):
            (total, n), pairs = best(g + 1, used | {p})
            options.append(((total + dice[g, p], n + 1), [(g, p)] + pairs))
        return max(options, key=lambda o: o[0])

    return best(1, frozenset())[1]


def _ref_lesion_wise(pred, gt, spacing, rules="seg", min_volume=20.0):
    """brats-evaluation's lesion-wise (Dice, HD95), one component pair at a time."""
    gt_cc, n_gt = _ref_components(gt)
    pred_cc, n_pred = _ref_components(pred)
    pairs = _ref_matching(gt_cc, n_gt, pred_cc, n_pred)
    scores = {g: (_dice(gt_cc == g, pred_cc == p),
                  _pooled_hd95(pred_cc == p, gt_cc == g, np.array(spacing))) for g, p in pairs}
    if rules == "seg":
        if scores:
            return tuple(np.mean(list(scores.values()), axis=0))
        return (0.0, math.inf) if n_gt or n_pred else (math.nan, math.nan)
    volume = np.prod(spacing)
    large = [g for g in range(1, n_gt + 1) if (gt_cc == g).sum() * volume >= min_volume]
    if not large:
        return math.nan, math.nan
    missed = (0.0, 373.0)
    values = [scores.get(g, missed) for g in large] + [missed] * (n_pred - len(pairs))
    return tuple(np.mean(values, axis=0))


def _same(value: float, expected: float | None, tol: float) -> bool:
    """Equal within ``tol``, with NaN (or None) equal to NaN and inf to inf."""
    if expected is None or math.isnan(expected):
        return value is None or math.isnan(value)
    return value == pytest.approx(expected, abs=tol)


def _blobs(rng, shape, n):
    """Label map with ``n`` random boxes of random BraTS labels."""
    out = np.zeros(shape, np.uint8)
    for _ in range(n):
        lo = [rng.integers(0, s - 2) for s in shape]
        hi = [min(s, a + rng.integers(1, 5)) for a, s in zip(lo, shape)]
        out[tuple(slice(a, b) for a, b in zip(lo, hi))] = rng.choice([1, 2, 4])
    return out


def _cube(shape, corner, size, value=1):
    out = np.zeros(shape, np.uint8)
    out[tuple(slice(c, c + size) for c in corner)] = value
    return out


def test_lesion_wise_by_hand():
    shape, unit = (24, 24, 24), (1.0, 1.0, 1.0)
    seg, mets = LesionRule(), LesionRule("mets", min_volume=50)
    big = _cube(shape, (2, 2, 2), 4).astype(bool)  # 64 voxels
    other = _cube(shape, (14, 14, 14), 4).astype(bool)  # 64 voxels, far from `big`
    tiny = _cube(shape, (2, 18, 2), 2).astype(bool)  # 8 voxels: below 50 mm³
    fp = _cube(shape, (18, 2, 18), 2).astype(bool)
    empty = np.zeros(shape, bool)

    def scores(pred, gt, rule):
        s = lesion_metrics(pred, gt, unit, rule)
        return s["lesion_dice"], s["lesion_hd95"]

    assert scores(big, big, seg) == scores(big, big, mets) == (1.0, 0.0)
    assert scores(fp, other, seg) == (0.0, math.inf)  # no match at all
    assert scores(fp, other, mets) == (0.0, 373.0)  # a missed lesion and a false positive
    # seg averages the matched lesions only; mets adds the miss and the false positive
    assert scores(big | fp, big | other, seg) == (1.0, 0.0)
    assert scores(big | fp, big | other, mets) == pytest.approx((1 / 3, 2 * 373 / 3))
    counts = lesion_metrics(big | fp, big | other, unit, seg)
    assert [counts[k] for k in ("lesions_gt", "lesions_tp", "lesions_fn", "lesions_fp")] \
        == [2, 1, 1, 1]
    for pred in (big, big | tiny):  # below min_volume: neither the miss nor the find counts
        assert scores(pred, big | tiny, mets) == (1.0, 0.0)
    # one-to-one: of a lesion split in two, the better part matches, the other is a FP
    half, slab = big.copy(), big.copy()
    half[4:], slab[:5] = False, False  # 32 and 16 voxels, one slice apart
    split = lesion_metrics(half | slab, big, unit, seg)
    assert split["lesion_dice"] == pytest.approx(64 / 96) and split["lesions_fp"] == 1
    assert scores(half | slab, big, mets)[0] == pytest.approx(64 / 96 / 2)
    assert all(math.isnan(v) for v in scores(empty, empty, seg) + scores(empty, empty, mets))
    assert scores(empty, big, seg) == (0.0, math.inf)
    assert scores(empty, big, mets) == (0.0, 373.0)
    assert scores(fp, empty, seg) == (0.0, math.inf)
    assert all(math.isnan(v) for v in scores(fp, empty, mets))
    diagonal = np.eye(4, dtype=bool)  # 2D: face connectivity, four lesions
    assert lesion_metrics(diagonal, diagonal, (1.0, 1.0), seg)["lesions_gt"] == 4
    with pytest.raises(ValueError, match="lesion rules must be 'seg' or 'mets'"):
        LesionRule("brats2023")  # type: ignore[arg-type]


@pytest.mark.parametrize("rules,min_volume", [("seg", None), ("mets", 0.0), ("mets", 20.0)])
def test_lesion_wise_matches_slow_reference_through_cli(tmp_path, rules, min_volume):
    pred_dir, label_dir, shape = tmp_path / "pred", tmp_path / "labels", (16, 14, 10)
    expected = {}
    for seed in range(3):
        rng = np.random.default_rng(seed)
        gt = _blobs(rng, shape, 7)
        pred = np.roll(gt, shift=tuple(rng.integers(-1, 2, 3)), axis=(0, 1, 2))
        pred[rng.random(shape) < 0.05] = 0
        pred = np.where(pred > 0, pred, _blobs(rng, shape, 3))
        _save(label_dir / f"c{seed}.nii.gz", gt)
        _save(pred_dir / f"c{seed}.nii.gz", pred)
        for v in sorted((set(np.unique(gt)) | set(np.unique(pred))) - {0}):
            expected[f"c{seed}", str(v)] = _ref_lesion_wise(
                pred == v, gt == v, SPACING, rules, 20.0 if min_volume is None else min_volume)
    out = tmp_path / "eval"
    volume = [] if min_volume is None else ["--lesion-min-volume", str(min_volume)]
    assert main(["evaluate", "--pred", str(pred_dir), "--label", str(label_dir), "--output",
                 str(out), "--no-plots", "--lesion-rules", rules, *volume]) == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["case"], r["label"]) for r in rows} == set(expected)
    for r in rows:
        dice, hd = expected[r["case"], r["label"]]
        assert _same(float(r["lesion_dice"]), dice, 1e-6), r
        assert _same(float(r["lesion_hd95"]), hd, 1e-4), r
    summary = json.loads((out / "summary.json").read_text())
    for name, stats in summary["labels"].items():
        values = [v for r in rows if r["label"] == name
                  if not math.isnan(v := float(r["lesion_dice"]))]
        assert _same(stats["lesion_dice"]["mean"], np.mean(values) if values else None, 1e-9)


def test_lesion_wise_brats_regions_missing_cases_and_bad_options(tmp_path, capsys):
    root, pred_dir, out = tmp_path / "brats", tmp_path / "pred", tmp_path / "eval"
    gt, pred = _toy_pair(0)
    ids = ("BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002")
    for cid in ids:
        for mod in ("t1", "t1ce", "t2", "flair", "seg"):
            _save(root / cid / f"{cid}_{mod}.nii.gz", gt)
    _save(pred_dir / f"{ids[0]}.nii.gz", pred)
    _save(pred_dir / f"{ids[2]}.nii.gz", np.zeros_like(pred))  # ids[1]: no prediction
    assert main(["evaluate", "--pred", str(pred_dir), "--label", str(root), "--layout",
                 "brats2021", "--output", str(out), "--no-plots", "--brats-lesionwise"]) == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = {(r["case"], r["label"]): r for r in csv.DictReader(f) if r["label"]}
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["labels"]) == ["NCR", "ED", "TC", "WT", "ET"]
    for name, stats in summary["labels"].items():
        found, empty = rows[ids[0], name], rows[ids[2], name]
        assert (float(empty["lesion_dice"]), float(empty["lesion_hd95"])) == (0.0, math.inf)
        # the case without prediction scores Dice 0 and HD95 373, as brats-evaluation's does
        assert stats["lesion_dice"]["n"] == 3
        assert stats["lesion_dice"]["mean"] == pytest.approx(float(found["lesion_dice"]) / 3)
        assert stats["lesion_hd95"]["mean"] == math.inf and stats["lesion_hd95"]["std"] is None
        assert stats["lesion_hd95"]["median"] == 373.0
        assert stats["dice"]["n"] == 2  # the overlap metrics leave the missing case out
    assert main(["evaluate", "--pred", str(pred_dir), "--label", str(root), "--layout",
                 "brats2021", "--output", str(out), "--lesion-min-volume", "5"]) != 0
    assert "--lesion-min-volume 5.0 needs --lesion-rules mets" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(pred_dir), "--label", str(root), "--layout",
                 "brats2021", "--output", str(out), "--lesion-rules", "mets",
                 "--lesion-min-volume", "-2"]) != 0
    assert "lesion min_volume must be >= 0, got -2.0" in capsys.readouterr().err
