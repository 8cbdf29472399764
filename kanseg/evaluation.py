"""Evaluate predicted label maps against ground truth: Dice and HD95 per class and region.

Predictions ``PRED/<case>.nii.gz`` are paired with ground truth by case id (a folder of
``<case>.nii.gz`` files, or a dataset root in a known layout). Metrics are MONAI's
``DiceMetric`` and ``HausdorffDistanceMetric(percentile=95)`` with the voxel spacing of the
label file's header (so HD95 is in mm). Missing files, unreadable files and grid mismatches
are recorded per case instead of stopping the evaluation.

Empty masks follow the BraTS convention: both empty -> Dice 1, HD95 0; only one empty ->
Dice 0, HD95 undefined (NaN, left out of the summary).

Optionally (:class:`LesionRule`), the lesion-wise Dice and HD95 of each label as the official
BraTS package, brats-evaluation 0.0.10 (panoptica 2.1), computes them: see :func:`lesion_metrics`.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.metrics import (DiceMetric, HausdorffDistanceMetric, compute_confusion_matrix_metric,
                           get_confusion_matrix)
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from kanseg.data.config import BRATS_LAYOUTS, DataConfig
from kanseg.data.layouts import BRATS_CLASSES, BRATS_REGIONS, NIFTI_SUFFIXES, label_spec, load_cases
from kanseg.files import atomic_write_text

#: overlap metrics from MONAI's confusion matrix, next to Dice and HD95 (None where undefined:
#: precision without a prediction, recall without ground truth)
CONFUSION_METRICS = {"iou": "threat score", "precision": "precision", "recall": "recall",
                     "specificity": "specificity"}
CSV_COLUMNS = ("case", "label", "dice", "hd95", *CONFUSION_METRICS, "gt_voxels", "pred_voxels",
               "status", "pred_file", "label_file")
LESION_COLUMNS = ("lesion_dice", "lesion_hd95", "lesions_gt", "lesions_tp", "lesions_fn",
                  "lesions_fp")
OK = "ok"
#: brats-evaluation's penalty HD95 (mm, the diameter of the SRI-24 atlas cube): a missed lesion
#: or a false positive under the ``mets`` rules, and any region of a case without prediction
BRATS_MAX_HD95 = 373.0
#: what brats-evaluation's parsers score each region of a case that has no prediction
MISSING_PREDICTION = {"lesion_dice": 0.0, "lesion_hd95": BRATS_MAX_HD95}
#: panoptica's matching threshold in every bundled BraTS config: any overlap can match
MATCH_MIN_DICE = 1e-6


@dataclass(frozen=True)
class EvalLabel:
    """A named binary mask: voxels whose raw label value is in ``values``."""

    name: str
    values: tuple[int, ...]


@dataclass(frozen=True)
class LesionRule:
    """Which report of brats-evaluation 0.0.10 to reproduce (see :func:`lesion_metrics`).

    ``"seg"`` is ``brats-parse-metrics seg`` (BraTS GLI, PED, MEN, MEN-RT, GoAT); ``"mets"`` is
    ``brats-parse-metrics mets --vol_threshold <min_volume>`` (BraTS-METS).
    """

    rules: Literal["seg", "mets"] = "seg"
    min_volume: float = 20.0  # mets: GT lesions below this volume (mm³) only count as detections

    def __post_init__(self) -> None:
        if self.rules not in ("seg", "mets"):
            raise ValueError(f"lesion rules must be 'seg' or 'mets', got {self.rules!r}")
        if not self.min_volume >= 0:
            raise ValueError(f"lesion min_volume must be >= 0, got {self.min_volume!r}")


@dataclass
class CasePair:
    """Files of one case; ``None`` where the prediction or the label is missing."""

    case: str
    pred: Path | None
    label: Path | None
    image: Path | None = None


# ----------------------------------------------------------------------------- what to score
def labels_for(data_cfg: DataConfig | None = None, layout: str | None = None) -> list[EvalLabel]:
    """Classes (non-background) and, for region configs / BraTS layouts, the regions.

    A class whose value set equals a region's (BraTS ET) is reported once, as the region.
    Without a config or a BraTS layout the classes are found per case (see :func:`evaluate`).
    """
    if data_cfg is not None:
        spec = label_spec(data_cfg)
        if spec.mode == "classes":
            return [EvalLabel(n, v) for n, v in zip(spec.names, spec.values) if v != (0,)]
        regions = [EvalLabel(n, tuple(v)) for n, v in zip(spec.names, spec.values)]
        classes = list(BRATS_CLASSES.get(data_cfg.layout, ()))
    elif layout in BRATS_LAYOUTS:
        regions = [EvalLabel(n, tuple(v)) for n, v in BRATS_REGIONS[layout].items()]
        classes = list(BRATS_CLASSES[layout])
    else:
        return []
    region_sets = {r.values for r in regions}
    return [EvalLabel(n, (v,)) for n, v in classes if v != 0 and (v,) not in region_sets] \
        + regions


# ----------------------------------------------------------------------------- pairing
def _case_id(path: Path) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def _nifti_files(folder: Path) -> dict[str, Path]:
    files = {}
    for f in sorted(folder.iterdir()):
        cid = _case_id(f)
        if f.is_file() and cid is not None and not f.name.startswith("."):
            files[cid] = f
    return files


def pair_cases(pred_dir: str | Path, label: str | Path, layout: str | None = None,
               data_cfg: DataConfig | None = None) -> list[CasePair]:
    """Pair ``pred_dir/<case>.nii.gz`` with the labels of folder ``label`` (same file names)
    or, with ``layout``, with the cases of the dataset root ``label`` (images too)."""
    pred_dir, label = Path(pred_dir).expanduser(), Path(label).expanduser()
    if not pred_dir.is_dir():
        raise ValueError(f"--pred {str(pred_dir)!r} is not a folder of predictions")
    if not label.is_dir():
        raise ValueError(f"--label {str(label)!r} is not a folder")
    preds = _nifti_files(pred_dir)
    if layout is not None:
        cfg = DataConfig(root=str(label), layout=layout) if data_cfg is None else \
            dataclasses.replace(data_cfg, root=str(label), layout=layout)
        labels, images = {}, {}
        for c in load_cases(cfg):
            if "label" in c:
                labels[c["id"]] = Path(c["label"])
                first = c["image"][0] if isinstance(c["image"], list) else c["image"]
                images[c["id"]] = Path(first)
    else:
        labels, images = _nifti_files(label), {}
    ids = sorted(set(preds) | set(labels))
    return [CasePair(i, preds.get(i), labels.get(i), images.get(i)) for i in ids]


# ----------------------------------------------------------------------------- metrics
def mask_metrics(pred: np.ndarray, label: np.ndarray, labels: Sequence[EvalLabel],
                 spacing: Sequence[float]) -> list[dict[str, Any]]:
    """Dice, HD95 (in the units of ``spacing``), IoU, precision, recall and specificity of each
    label's mask in two label maps."""
    if not labels:
        return []
    p = np.stack([np.isin(pred, lb.values) for lb in labels])[None]
    g = np.stack([np.isin(label, lb.values) for lb in labels])[None]
    p_t, g_t = torch.from_numpy(p).float(), torch.from_numpy(g).float()
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p_t, g_t)
    both = p.reshape(len(labels), -1).any(1) & g.reshape(len(labels), -1).any(1)
    hd = np.full(len(labels), np.nan)
    if both.any():  # MONAI's HD is undefined (and warns) for empty masks
        metric = HausdorffDistanceMetric(include_background=True, percentile=95,
                                         reduction="none")
        with warnings.catch_warnings():  # MONAI-internal deprecation notice
            warnings.simplefilter("ignore", FutureWarning)
            hd[both] = metric(p_t[:, both], g_t[:, both], spacing=list(spacing))[0].numpy()
    confusion = get_confusion_matrix(p_t, g_t, include_background=True)
    overlap = {name: compute_confusion_matrix_metric(metric, confusion)[0].numpy()
               for name, metric in CONFUSION_METRICS.items()}
    rows = []
    for i, lb in enumerate(labels):
        n_gt, n_pred = int(g[0, i].sum()), int(p[0, i].sum())
        hd95 = 0.0 if n_gt == 0 and n_pred == 0 else float(hd[i])
        status = OK if n_gt and n_pred or not (n_gt or n_pred) else \
            ("empty prediction" if n_gt else "empty ground truth")
        row = {"label": lb.name, "dice": float(dice[0, i]), "hd95": hd95,
               "gt_voxels": n_gt, "pred_voxels": n_pred, "status": status}
        for name, values in overlap.items():
            value = float(values[i])
            row[name] = value if math.isfinite(value) else None
        if n_gt == 0 and n_pred == 0:
            row["iou"] = 1.0  # both empty: a perfect match, as Dice counts it
        rows.append(row)
    return rows


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components numbered 1..n as panoptica finds them: cc3d's 26-connectivity in
    3D, scipy's default 4-connectivity in 2D."""
    connectivity = mask.ndim if mask.ndim >= 3 else 1
    return ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim,
                                                                          connectivity))


def _union_box(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, ...]:
    """The smallest box holding every box of ``boxes``."""
    return tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes))
                 for i in range(len(boxes[0])))


def _match_lesions(gt_cc: np.ndarray, n_gt: int, pred_cc: np.ndarray,
                   n_pred: int) -> list[tuple[int, int, float]]:
    """(GT lesion, predicted component, Dice) of the one-to-one matching that maximises the
    summed Dice over pairs with Dice >= :data:`MATCH_MIN_DICE` (panoptica's
    ``MaxBipartiteMatching`` by DSC; exact ties may resolve differently, as the component
    numbering differs)."""
    if not n_gt or not n_pred:
        return []
    both = (gt_cc > 0) & (pred_cc > 0)
    (g, p), overlap = np.unique(np.stack([gt_cc[both], pred_cc[both]]), axis=1,
                                return_counts=True)
    dice = 2.0 * overlap / (np.bincount(gt_cc.ravel(), minlength=n_gt + 1)[g]
                            + np.bincount(pred_cc.ravel(), minlength=n_pred + 1)[p])
    keep = dice >= MATCH_MIN_DICE
    score = np.zeros((n_gt, n_pred))
    score[g[keep] - 1, p[keep] - 1] = dice[keep]
    cost = np.where(score > 0, 1.0 - score, 1.0 + 1e-6)  # a non-pair costs more than any pair
    rows, cols = linear_sum_assignment(cost)
    return [(int(r) + 1, int(c) + 1, float(score[r, c])) for r, c in zip(rows, cols)
            if score[r, c] > 0]


def _hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """panoptica's HD95 of two non-empty boolean masks: the 95th percentile of the border
    distances of both directions pooled (MONAI's takes the larger directed percentile).
    Borders are the voxels with a face neighbour outside the mask."""
    cross = ndimage.generate_binary_structure(pred.ndim, 1)
    pred_border, gt_border = (m ^ ndimage.binary_erosion(m, structure=cross) for m in (pred, gt))
    to_gt = ndimage.distance_transform_edt(~gt_border, sampling=spacing)[pred_border]
    to_pred = ndimage.distance_transform_edt(~pred_border, sampling=spacing)[gt_border]
    return float(np.percentile(np.concatenate([to_pred, to_gt]), 95))


def lesion_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
                   rule: LesionRule) -> dict[str, float | int]:
    """Lesion-wise Dice and HD95 of two boolean masks, with lesion counts, as brats-evaluation
    0.0.10 computes them: panoptica 2.1 with its ``configs/config_gli.yaml`` (the instance
    rules are the same in every bundled config), then ``brats-parse-metrics seg`` or ``mets``.

    Lesions are the connected components of each mask (:func:`_components`; no dilation, no
    merging, no size filter); GT lesions and predicted components are matched one-to-one
    (:func:`_match_lesions`); a matched pair scores its Dice and HD95 (:func:`_hd95`);
    unmatched GT lesions are false negatives, unmatched components false positives.

    - ``seg``: means over the matched pairs (panoptica's ``sq_dsc`` / ``sq_hd95``); without
      any match Dice 0 and HD95 inf, or NaN for both when both masks are empty.
    - ``mets``: each GT lesion of volume >= ``rule.min_volume`` scores its Dice / HD95 (0 /
      :data:`BRATS_MAX_HD95` when missed), as does each false positive (0 / 373); means over
      these. NaN without a GT lesion of that volume.
    """
    gt_cc, n_gt = _components(gt)
    pred_cc, n_pred = _components(pred)
    pairs = _match_lesions(gt_cc, n_gt, pred_cc, n_pred)
    gt_boxes, pred_boxes = ndimage.find_objects(gt_cc), ndimage.find_objects(pred_cc)
    dice, hd = {}, {}
    for g, p, d in pairs:
        box = _union_box([gt_boxes[g - 1], pred_boxes[p - 1]])
        dice[g], hd[g] = d, _hd95(pred_cc[box] == p, gt_cc[box] == g, spacing)
    fp = n_pred - len(pairs)
    if rule.rules == "seg":
        if pairs:
            scores = float(np.mean(list(dice.values()))), float(np.mean(list(hd.values())))
        else:
            scores = (math.nan, math.nan) if not (n_gt or n_pred) else (0.0, math.inf)
    else:
        volumes = np.bincount(gt_cc.ravel(), minlength=n_gt + 1) * float(np.prod(spacing))
        large = [k for k in range(1, n_gt + 1) if volumes[k] >= rule.min_volume]
        lesion_dice = [dice.get(k, 0.0) for k in large] + [0.0] * fp
        lesion_hd = [hd.get(k, BRATS_MAX_HD95) for k in large] + [BRATS_MAX_HD95] * fp
        scores = (float(np.mean(lesion_dice)), float(np.mean(lesion_hd))) if large \
            else (math.nan, math.nan)
    return {"lesion_dice": scores[0], "lesion_hd95": scores[1], "lesions_gt": n_gt,
            "lesions_tp": len(pairs), "lesions_fn": n_gt - len(pairs), "lesions_fp": fp}


def _as_labels(img: Any, path: Path) -> np.ndarray:
    data = np.asanyarray(img.dataobj)
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.allclose(rounded, data):
            raise ValueError(f"{path} is not a label map (non-integer values)")
        data = rounded
    return data.astype(np.int64)


def _geometry_problem(pred: Any, label: Any, atol: float = 1e-3) -> str | None:
    if pred.shape != label.shape:
        return f"shape mismatch: prediction {pred.shape} vs label {label.shape}"
    if not np.allclose(pred.affine, label.affine, atol=atol):
        return "affine mismatch: prediction and label are on different grids"
    return None


def _undeclared_values(arrays: dict[Path, np.ndarray], labels: Sequence[EvalLabel]) -> str | None:
    """A problem naming each file with label values outside ``labels`` (plus background)."""
    declared = {0} | {v for label in labels for v in label.values}
    found = {path: sorted(set(np.unique(a).tolist()) - declared) for path, a in arrays.items()}
    problems = [f"{path.name} has label values {values} outside the declared set "
                f"{sorted(declared)}" for path, values in found.items() if values]
    return "; ".join(problems) or None


def evaluate_pair(pair: CasePair, labels: Sequence[EvalLabel],
                  lesion_rule: LesionRule | None = None) -> list[dict]:
    """Rows for one case: one per label (with lesion-wise metrics under ``lesion_rule``), or
    a single row naming the problem."""
    base = {"case": pair.case, "pred_file": str(pair.pred or ""),
            "label_file": str(pair.label or "")}
    if pair.pred is None or pair.label is None:
        status = "missing prediction" if pair.pred is None else "missing label"
        return [{**base, "label": "", "status": status}]
    try:
        pred_img, label_img = nib.load(str(pair.pred)), nib.load(str(pair.label))
        problem = _geometry_problem(pred_img, label_img)
        if problem:
            return [{**base, "label": "", "status": problem}]
        pred, label = _as_labels(pred_img, pair.pred), _as_labels(label_img, pair.label)
    except Exception as err:  # unreadable / corrupt files are reported, not raised
        return [{**base, "label": "", "status": f"unreadable: {err}"}]
    problem = _undeclared_values({pair.label: label, pair.pred: pred}, labels) if labels else None
    if problem:
        return [{**base, "label": "", "status": problem}]
    case_labels = list(labels) or [
        EvalLabel(str(v), (v,)) for v in sorted((set(np.unique(label)) | set(np.unique(pred)))
                                                 - {0})]
    spacing = [float(z) for z in label_img.header.get_zooms()[: label.ndim]]
    rows = [{**base, **r} for r in mask_metrics(pred, label, case_labels, spacing)]
    if lesion_rule is not None:
        for row, lb in zip(rows, case_labels):
            row.update(lesion_metrics(np.isin(pred, lb.values), np.isin(label, lb.values),
                                      spacing, lesion_rule))
    return rows


# ----------------------------------------------------------------------------- outputs
def _stats(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """Mean, std, median and count of the values that are not None or NaN; an infinite value
    makes the mean infinite (as pandas aggregates brats-evaluation's reports) and the std
    None."""
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if not len(v):
        return {"mean": None, "std": None, "median": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()) if np.isfinite(v).all() else None,
            "median": float(np.median(v)), "n": int(len(v))}


def _label_values(scored: Sequence[dict], name: str, metric: str,
                  missing: int) -> list[float | None]:
    """Per-case values of one label's metric, plus the :data:`MISSING_PREDICTION` score of
    each of the ``missing`` cases without prediction for the lesion-wise metrics."""
    values = [r[metric] for r in scored if r["label"] == name]
    return values + [MISSING_PREDICTION[metric]] * missing if metric in MISSING_PREDICTION \
        else values


def summarize(rows: Sequence[dict]) -> dict[str, Any]:
    """Per-label mean/std/median of Dice, HD95, IoU, precision, recall and specificity (and
    lesion-wise Dice / HD95 where rows have them; there a case without prediction counts as
    Dice 0 and HD95 373, as brats-evaluation counts it), case-level problems and the case
    ranking."""
    scored = [r for r in rows if r.get("label")]
    names = list(dict.fromkeys(r["label"] for r in scored))
    metrics = [m for m in ("dice", "hd95", *CONFUSION_METRICS, "lesion_dice", "lesion_hd95")
               if any(m in r for r in scored)]
    missing = sum(r["status"] == "missing prediction" for r in rows if not r.get("label"))
    per_label = {n: {m: _stats(_label_values(scored, n, m, missing)) for m in metrics}
                 for n in names}
    case_dice: dict[str, list[float]] = {}
    for r in scored:
        case_dice.setdefault(r["case"], []).append(r["dice"])
    ranking = sorted((float(np.mean(d)), c) for c, d in case_dice.items())
    problems = [{"case": r["case"], "status": r["status"]} for r in rows if not r.get("label")]
    return {
        "cases_scored": len(case_dice),
        "labels": per_label,
        "mean_dice": _stats(r["dice"] for r in scored)["mean"],
        "case_mean_dice": {c: d for d, c in ranking},
        "problems": problems,
    }


def write_csv(rows: Sequence[dict], path: Path,
              columns: Sequence[str] = CSV_COLUMNS) -> None:
    """``metrics.csv``: one row per case x label (problem rows have an empty label)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k, "")) for k in columns})
    atomic_write_text(path, buf.getvalue())


def _overlay_image(path: Path | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if path is None or not path.is_file():
        return None
    try:
        data = np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)
    except Exception:
        return None
    if data.ndim == len(shape) + 1:  # 4D multi-channel image: first channel
        data = data[..., 0]
    return data if data.shape == shape else None


def write_plots(rows: Sequence[dict], pairs: dict[str, CasePair], summary: dict, output: Path,
                n_cases: int = 3) -> list[Path]:
    """Box plot of Dice/HD95 per label and overlays of the ``n_cases`` worst and best cases."""
    from kanseg import plots

    scored = [r for r in rows if r.get("label")]
    if not scored:
        return []
    names = list(summary["labels"])
    values = {title: {n: [r[m] for r in scored if r["label"] == n] for n in names}
              for m, title in (("dice", "Dice"), ("hd95", "HD95 (mm)"))}
    written = [plots.box_plot(values, output / "boxplot.png", title="per-case metrics")]
    ranked = list(summary["case_mean_dice"].items())  # ascending mean Dice
    k = min(n_cases, max(1, len(ranked) // 2))
    worst, best = ranked[:k], ranked[k:][::-1][:k]
    for kind, cases in (("worst", worst), ("best", best)):
        for rank, (case, dice) in enumerate(cases, 1):
            pair = pairs[case]
            label_img = nib.load(str(pair.label))
            label = _as_labels(label_img, pair.label)
            pred = _as_labels(nib.load(str(pair.pred)), pair.pred)
            written.append(plots.overlay_plot(
                label, pred, output / "overlays" / f"{kind}{rank}_{case}.png",
                image=_overlay_image(pair.image, label.shape),
                title=f"{case}: mean Dice {dice:.3f}",
                spacing=label_img.header.get_zooms()[: label.ndim]))
    return written


def evaluate(pred_dir: str | Path, label: str | Path, output: str | Path,
             layout: str | None = None, data_cfg: DataConfig | None = None,
             plots: bool = True, progress: bool = True,
             lesion_rule: LesionRule | None = None) -> dict[str, Any]:
    """Score every case and write ``metrics.csv``, ``summary.json`` and PNGs into ``output``.

    ``layout`` reads ``label`` as a dataset root of that layout (else a folder of label
    files); ``data_cfg`` (a run's data section) names the classes / regions to score;
    ``lesion_rule`` adds the BraTS lesion-wise metrics (columns :data:`LESION_COLUMNS`).
    Cases are read one at a time. Returns the summary.
    """
    from tqdm.auto import tqdm

    output = Path(output)
    pairs = pair_cases(pred_dir, label, layout, data_cfg)
    if not pairs:
        raise ValueError(f"no NIfTI predictions in {pred_dir} and no labels in {label}")
    output.mkdir(parents=True, exist_ok=True)
    labels = labels_for(data_cfg, layout)
    rows: list[dict] = []
    for pair in tqdm(pairs, desc="evaluate", unit="case", disable=not progress):
        rows += evaluate_pair(pair, labels, lesion_rule)
    summary = summarize(rows)
    columns = CSV_COLUMNS if lesion_rule is None else CSV_COLUMNS[:4] + LESION_COLUMNS \
        + CSV_COLUMNS[4:]
    write_csv(rows, output / "metrics.csv", columns)
    if plots:
        write_plots(rows, {p.case: p for p in pairs}, summary, output)
    atomic_write_text(output / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
