"""Dataset layouts -> lists of case dicts, train/val splits and the label description.

A case is ``{"id": str, "image": path | [paths], "label": path}`` (plus ``"fold"`` or
``"split"`` when a datalist provides them). Paths are absolute strings. Layout readers
list the files a case *should* have without opening them; ``kanseg.data.check`` verifies
them, so one call reports every problem.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .config import BRATS_LAYOUTS, DataConfig


class DataError(ValueError):
    """A dataset folder, datalist or case list is unusable; the message names the file."""


BRATS_MODALITIES = {
    "brats2021": ("t1", "t1ce", "t2", "flair"),
    "brats2023": ("t1n", "t1c", "t2w", "t2f"),
}
BRATS_SEG = {"brats2021": "seg", "brats2023": "seg"}
BRATS_SEP = {"brats2021": "_", "brats2023": "-"}
# Raw BraTS labels: 1 necrotic core (NCR), 2 edema (ED), 3 or 4 enhancing tumour (ET).
BRATS_CLASSES = {
    "brats2021": (("background", 0), ("NCR", 1), ("ED", 2), ("ET", 4)),
    "brats2023": (("background", 0), ("NCR", 1), ("ED", 2), ("ET", 3)),
}
BRATS_REGIONS = {
    "brats2021": {"TC": [1, 4], "WT": [1, 2, 4], "ET": [4]},
    "brats2023": {"TC": [1, 3], "WT": [1, 2, 3], "ET": [3]},
}
IMAGE_SUFFIXES_2D = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class LabelSpec:
    """What the network predicts: one output channel per name.

    ``activation`` is ``"sigmoid"`` for overlapping regions (multi-label) and ``"softmax"``
    for mutually exclusive classes (background is channel 0). ``values`` gives, per output
    channel, the raw label values it covers (regions) or the single raw value (classes).
    """

    mode: Literal["regions", "classes"]
    names: tuple[str, ...]
    values: tuple[tuple[int, ...], ...]
    activation: Literal["sigmoid", "softmax"]

    @property
    def out_channels(self) -> int:
        return len(self.names)

    @property
    def allowed_values(self) -> set[int]:
        """Raw label values the files may contain (0 is always allowed)."""
        return {0, *(v for vals in self.values for v in vals)}


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _require_dir(root: str | Path, what: str) -> Path:
    if not str(root).strip():
        raise DataError(f"{what} is not set (data.root)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{what}: folder {str(path)!r} does not exist")
    return path.resolve()


def brats_cases(root: str | Path, layout: str, modalities: list[str] | None = None) -> list[dict]:
    """One case per sub-folder holding NIfTI files: ``<id>/<id><sep><modality>.nii.gz``."""
    base = _require_dir(root, f"{layout} root")
    mods = list(modalities or BRATS_MODALITIES[layout])
    sep = BRATS_SEP[layout]
    cases = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [f for f in folder.iterdir() if f.name.endswith(NIFTI_SUFFIXES)]
        if not files:
            continue
        ext = ".nii" if all(f.name.endswith(".nii") for f in files) else ".nii.gz"
        name = folder.name
        cases.append({
            "id": name,
            "image": [str(folder / f"{name}{sep}{m}{ext}") for m in mods],
            "label": str(folder / f"{name}{sep}{BRATS_SEG[layout]}{ext}"),
        })
    return cases


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read JSON file {path}: {err}") from None


def _dataset_json(root: str | Path, layout: str, keys: tuple[str, ...]) -> tuple[Path, dict]:
    """``(path, parsed dataset.json)`` of a task folder, with ``keys`` present."""
    path = _require_dir(root, f"{layout} root") / "dataset.json"
    if not path.is_file():
        raise DataError(f"{layout} layout: {path} is missing (every {layout} dataset folder "
                        "has one)")
    meta = _read_json(path)
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key in keys:
        if key not in meta:
            raise DataError(f"{path}: key {key!r} is missing (expected keys: {', '.join(keys)})")
    return path, meta


def msd_dataset_json(root: str | Path) -> dict:
    """The parsed ``dataset.json`` of a Medical Segmentation Decathlon task folder."""
    return _dataset_json(root, "msd", ("training", "labels", "modality"))[1]


NNUNET_KEYS = ("channel_names", "labels", "file_ending")


def nnunet_dataset_json(root: str | Path) -> dict:
    """The checked ``dataset.json`` (v2) of an nnU-Net raw dataset folder.

    ``channel_names`` maps ``"0".."n-1"`` to names; ``labels`` maps names to a raw value or,
    for regions, a list of raw values (background 0); ``file_ending`` is e.g. ``.nii.gz``.
    """
    path, meta = _dataset_json(root, "nnunet", NNUNET_KEYS)
    channels = meta["channel_names"]
    if not isinstance(channels, dict) or \
            sorted(channels) != [str(i) for i in range(len(channels))] or not channels:
        raise DataError(f"{path}: 'channel_names' must map \"0\", \"1\", ... to channel names, "
                        f"got {channels!r}")
    labels = meta["labels"]
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{path}: 'labels' must map names to label values, got {labels!r}")
    for name, value in labels.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(type(v) is int and v >= 0 for v in values):
            raise DataError(f"{path}: labels[{name!r}] is {value!r}, expected a label value "
                            "(int >= 0) or a non-empty list of them (a region)")
    if 0 not in labels.values():
        raise DataError(f"{path}: 'labels' has no background entry with value 0")
    ending = meta["file_ending"]
    if not isinstance(ending, str) or not ending.startswith("."):
        raise DataError(f"{path}: 'file_ending' must be an extension like \".nii.gz\", "
                        f"got {ending!r}")
    return meta


def nnunet_labels(root: str | Path) -> dict[str, tuple[int, ...]]:
    """Non-background ``labels`` of an nnU-Net ``dataset.json``: name -> raw values."""
    return {name: tuple(value if isinstance(value, list) else [value])
            for name, value in nnunet_dataset_json(root)["labels"].items() if value != 0}


def nnunet_has_regions(root: str | Path) -> bool:
    """nnU-Net's rule: the dataset is region-based when a label lists several values."""
    return any(len(values) > 1 for values in nnunet_labels(root).values())


def nnunet_cases(root: str | Path, split: Literal["training", "test"] = "training") -> list[dict]:
    """Cases of an nnU-Net raw folder: ``imagesTr/<id>_<XXXX><ending>`` (one file per channel
    of ``channel_names``) with ``labelsTr/<id><ending>``, or unlabelled ``imagesTs/`` cases.

    A case is listed when any of its files exists; missing ones are reported by the check.
    """
    base = _require_dir(root, "nnunet root")
    meta = nnunet_dataset_json(base)
    ending = meta["file_ending"]
    images = base / ("imagesTr" if split == "training" else "imagesTs")
    labels = base / "labelsTr"
    if split == "test" and not images.is_dir():
        return []
    _require_dir(images, f"nnunet {images.name}")
    stems = [f.name[: -len(ending)] for f in images.iterdir() if f.name.endswith(ending)]
    ids = {m.group(1) for m in map(re.compile(r"(.+)_\d{4}").fullmatch, stems) if m}
    if split == "training":
        _require_dir(labels, "nnunet labelsTr")
        ids |= {f.name[: -len(ending)] for f in labels.iterdir()
                if f.name.endswith(ending) and not f.name.startswith(".")}
    channels = range(len(meta["channel_names"]))
    cases = []
    for cid in sorted(i for i in ids if i and not i.startswith(".")):
        case = {"id": cid, "image": [str(images / f"{cid}_{c:04d}{ending}") for c in channels]}
        if split == "training":
            case["label"] = str(labels / f"{cid}{ending}")
        cases.append(case)
    return cases


def msd_cases(root: str | Path, split: Literal["training", "test"] = "training") -> list[dict]:
    """Cases listed in ``dataset.json`` (``training``: image + label; ``test``: image only)."""
    base = _require_dir(root, "msd root")
    cases = []
    for entry in msd_dataset_json(base).get(split, []):
        image = entry if isinstance(entry, str) else entry["image"]
        case = {"id": _stem(Path(image)), "image": str((base / image).resolve())}
        if isinstance(entry, dict) and "label" in entry:
            case["label"] = str((base / entry["label"]).resolve())
        cases.append(case)
    return cases


def _datalist_record(record: dict, base: Path, where: str, index: int,
                     columns: list[str] | None) -> dict:
    def resolve(p: str) -> str:
        return str((base / p).expanduser().resolve())

    if columns:
        missing = [c for c in columns if c not in record]
        if missing:
            raise DataError(f"{where}: entry {index} has no column {missing[0]!r}")
        image: str | list[str] = [resolve(record[c]) for c in columns]
    elif "image" in record and record["image"]:
        raw = record["image"]
        image = [resolve(p) for p in raw] if isinstance(raw, list) else resolve(raw)
    else:
        raise DataError(f"{where}: entry {index} has no 'image'")
    first = image[0] if isinstance(image, list) else image
    case: dict = {"id": str(record.get("id") or _stem(Path(first))), "image": image}
    if record.get("label"):
        case["label"] = resolve(record["label"])
    if record.get("fold") not in (None, ""):
        try:
            case["fold"] = int(record["fold"])
        except ValueError:
            raise DataError(f"{where}: entry {index} has fold {record['fold']!r}, "
                            "expected an integer") from None
    return case


def datalist_cases(datalist: str | Path, root: str | Path = "",
                   columns: list[str] | None = None) -> list[dict]:
    """Cases from a JSON or CSV datalist; relative paths resolve against ``root`` or the file.

    JSON: a list of records, or MONAI's ``{"training": [...], "validation": [...]}``; a
    record has ``image`` (path or list of channel paths), ``label``, optional ``id``/``fold``.
    CSV: columns ``image`` (or the channel columns given in ``columns``), ``label``,
    optional ``id`` and ``fold``. Cases from a ``validation`` section get ``split="val"``.
    """
    path = Path(datalist).expanduser()
    if not path.is_file():
        raise DataError(f"datalist {str(path)!r} does not exist")
    base = Path(root).expanduser() if str(root) else path.parent
    where = str(path)
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            sections = {"training": list(csv.DictReader(f))}
    else:
        data = _read_json(path)
        sections = {"training": data} if isinstance(data, list) else {
            k: data[k] for k in ("training", "validation") if k in data}
        if not sections:
            raise DataError(f"{where}: expected a list of cases or a 'training' list")
    cases = []
    for section, records in sections.items():
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataError(f"{where}: {section} entry {i} is not a mapping: {record!r}")
            case = _datalist_record(record, base, f"{where} ({section})", i, columns)
            if section == "validation":
                case["split"] = "val"
            cases.append(case)
    return cases


def folder2d_cases(root: str | Path) -> list[dict]:
    """``root/images/*`` paired by file stem with ``root/masks/*`` (PNG/JPEG/TIFF/BMP)."""
    base = _require_dir(root, "folder2d root")
    images_dir = _require_dir(base / "images", "folder2d images")
    masks_dir = base / "masks"
    masks = {}
    if masks_dir.is_dir():
        masks = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES_2D}
    cases = []
    for image in sorted(images_dir.iterdir()):
        if image.suffix.lower() not in IMAGE_SUFFIXES_2D or image.name.startswith("."):
            continue
        mask = masks.get(image.stem, masks_dir / image.name)
        cases.append({"id": image.stem, "image": str(image), "label": str(mask)})
    return cases


def load_cases(cfg: DataConfig) -> list[dict]:
    """All labelled cases of the configured dataset, in a stable order."""
    if cfg.layout in BRATS_LAYOUTS:
        return brats_cases(cfg.root, cfg.layout, cfg.modalities)
    if cfg.layout == "msd":
        return msd_cases(cfg.root, "training")
    if cfg.layout == "datalist":
        return datalist_cases(cfg.datalist or "", cfg.root, cfg.modalities)
    if cfg.layout == "nnunet":
        return nnunet_cases(cfg.root, "training")
    return folder2d_cases(cfg.root)


def test_cases(cfg: DataConfig) -> list[dict]:
    """Unlabelled cases for inference: MSD ``test`` list, nnU-Net ``imagesTs/``, or datalist
    entries without label."""
    if cfg.layout == "msd":
        return msd_cases(cfg.root, "test")
    if cfg.layout == "nnunet":
        return nnunet_cases(cfg.root, "test")
    if cfg.layout == "datalist":
        return [c for c in datalist_cases(cfg.datalist or "", cfg.root, cfg.modalities)
                if "label" not in c]
    return []


test_cases.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def split_cases(cases: list[dict], cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """Deterministic (train, val) split.

    Priority: explicit ``train_cases``/``val_cases`` ids; then a datalist's ``split``/``fold``
    fields (val = ``fold == cfg.fold``); then a seeded permutation cut into ``num_folds``
    folds (``fold`` set) or a ``val_fraction`` hold-out (``fold`` null).
    """
    labelled = [c for c in cases if "label" in c]
    by_id = {c["id"]: c for c in labelled}
    if cfg.train_cases is not None or cfg.val_cases is not None:
        unknown = [i for i in (cfg.train_cases or []) + (cfg.val_cases or []) if i not in by_id]
        if unknown:
            raise DataError(f"train_cases/val_cases name unknown case ids {unknown[:5]}; "
                            f"known ids start with {sorted(by_id)[:5]}")
        val_ids = set(cfg.val_cases or [])
        train_ids = set(cfg.train_cases) if cfg.train_cases is not None \
            else set(by_id) - val_ids
        return ([c for c in labelled if c["id"] in train_ids],
                [c for c in labelled if c["id"] in val_ids])
    if any("split" in c for c in labelled):
        return ([c for c in labelled if c.get("split") != "val"],
                [c for c in labelled if c.get("split") == "val"])
    if cfg.fold is not None and any("fold" in c for c in labelled):
        return ([c for c in labelled if c.get("fold") != cfg.fold],
                [c for c in labelled if c.get("fold") == cfg.fold])
    order = np.random.default_rng(cfg.seed).permutation(len(labelled))
    if cfg.fold is not None:
        val_idx = set(np.array_split(order, cfg.num_folds)[cfg.fold].tolist())
    else:
        n_val = max(1, round(cfg.val_fraction * len(labelled))) if len(labelled) > 1 else 0
        val_idx = set(order[:n_val].tolist())
    return ([c for i, c in enumerate(labelled) if i not in val_idx],
            [c for i, c in enumerate(labelled) if i in val_idx])


def label_spec(cfg: DataConfig) -> LabelSpec:
    """Output channels of the network for this data config (names, activation, raw values)."""
    mode = cfg.resolved_label_mode or ("regions" if nnunet_has_regions(cfg.root) else "classes")
    if mode == "regions":
        regions = cfg.regions or (nnunet_labels(cfg.root) if cfg.layout == "nnunet"
                                  else BRATS_REGIONS[cfg.layout])
        return LabelSpec("regions", tuple(regions), tuple(tuple(v) for v in regions.values()),
                         "sigmoid")
    names, values = _class_names_values(cfg)
    return LabelSpec("classes", tuple(names), tuple((v,) for v in values), "softmax")


def _class_names_values(cfg: DataConfig) -> tuple[list[str], list[int]]:
    names, values = cfg.labels, cfg.label_values
    if cfg.mask_threshold is not None:
        return list(names or ("background", "foreground")), [0, 1]
    if names is None and cfg.layout in BRATS_LAYOUTS:
        names = [n for n, _ in BRATS_CLASSES[cfg.layout]]
        values = values or [v for _, v in BRATS_CLASSES[cfg.layout]]
    elif names is None and cfg.layout == "msd":
        table = msd_dataset_json(cfg.root)["labels"]
        pairs = sorted((int(k), str(v)) for k, v in table.items())
        names = [n for _, n in pairs]
        values = values or [k for k, _ in pairs]
    elif names is None and cfg.layout == "nnunet":  # every raw value; regions lend no name
        table = nnunet_labels(cfg.root)
        named = {vals[0]: name for name, vals in table.items() if len(vals) == 1}
        raw = sorted({v for vals in table.values() for v in vals})
        names = ["background"] + [named.get(v, f"label{v}") for v in raw]
        values = values or [0, *raw]
    elif names is None:
        names = ["background", "foreground"] if values is None else \
            ["background"] + [f"class{v}" for v in values[1:]]
    return list(names), list(values if values is not None else range(len(names)))


def input_channels(cfg: DataConfig) -> int:
    """Number of image channels the network receives."""
    if cfg.layout in BRATS_LAYOUTS:
        return len(cfg.modalities or BRATS_MODALITIES[cfg.layout])
    if cfg.layout == "msd":
        return len(msd_dataset_json(cfg.root)["modality"])
    if cfg.layout == "nnunet":
        return len(nnunet_dataset_json(cfg.root)["channel_names"])
    if cfg.layout == "folder2d":
        return len(cfg.modalities) if cfg.modalities else 1
    if cfg.modalities:
        return len(cfg.modalities)
    cases = load_cases(cfg)
    if not cases:
        raise DataError(f"datalist {cfg.datalist} lists no cases")
    image = cases[0]["image"]
    if isinstance(image, list):
        return len(image)
    return _channels_in_file(image, cfg.spatial_dims)


def _channels_in_file(path: str, spatial_dims: int) -> int:
    if path.endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        shape = nib.load(path).shape
        return int(shape[-1]) if len(shape) > spatial_dims else 1
    return 1
