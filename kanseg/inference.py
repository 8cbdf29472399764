"""Sliding-window inference: checkpoint -> per-case NIfTI predictions in the input's geometry.

One case at a time: the run's ``infer`` MONAI pipeline (load, orientation, spacing, crop,
normalisation) prepares the image, MONAI's ``SlidingWindowInferer`` predicts (optionally
averaged over flips), ``Invertd`` maps the probabilities back through the inverse of the
spatial preprocessing, and the result is written with the input file's own NIfTI header, so
shape, affine, qform/sform and orientation match the input exactly.
"""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from PIL import Image
from torch import nn

from kanseg.data.layouts import (
    BRATS_LAYOUTS, IMAGE_SUFFIXES_2D, NIFTI_SUFFIXES, LabelSpec, brats_cases, label_spec,
    load_cases, test_cases,
)
from kanseg.config import InferenceConfig
from kanseg.data.readers import dicom_series
from kanseg.dicom_seg import SEG_SUFFIX, is_dicom_series, segment_labels, write_dicom_seg
from kanseg.engine.checkpoint import WEIGHTS, load_weights, resolve
from kanseg.files import atomic_write
from kanseg.models.memory_format import to_channels_last

IMAGE_SUFFIXES = NIFTI_SUFFIXES + IMAGE_SUFFIXES_2D


class InferenceError(ValueError):
    """A checkpoint, config or input case is unusable; the message names the file."""


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def settings_from_config(cfg: Any, **overrides: Any) -> InferenceConfig:
    """The run config's ``inference`` section with non-``None`` ``overrides`` applied and
    ``roi_size`` resolved (null -> the training ``data.patch_size``)."""
    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = dataclasses.replace(cfg.inference, **values)
    except ValueError as err:
        raise InferenceError(f"invalid inference setting: {err}") from None
    roi = settings.roi_size or cfg.data.patch_size
    if len(roi) != cfg.data.spatial_dims or min(roi) < 1:
        raise InferenceError(f"roi_size must have {cfg.data.spatial_dims} positive values for "
                             f"spatial_dims={cfg.data.spatial_dims}, got {list(roi)}")
    return dataclasses.replace(settings, roi_size=[int(r) for r in roi])


# ----------------------------------------------------------------------------- checkpoints
def find_checkpoint(checkpoint: str | Path, config: str | Path | None = None) -> tuple[Path, Path]:
    """``(weights file, config.yaml)`` of a run folder (best, else last) or a weights file.

    For a weights file the config is ``config`` or the nearest ``config.yaml`` in an
    ancestor folder.
    """
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        try:
            weights = resolve(path, prefer="best") / WEIGHTS
        except FileNotFoundError as err:
            raise InferenceError(str(err)) from None
    elif path.is_file():
        weights = path
    else:
        raise InferenceError(f"checkpoint {str(path)!r} does not exist (expected a run folder "
                             f"or a {WEIGHTS} file)")
    if config is not None:
        cfg_path = Path(config).expanduser()
        if not cfg_path.is_file():
            raise InferenceError(f"config {str(cfg_path)!r} does not exist")
        return weights, cfg_path
    for folder in weights.resolve().parents:
        if (folder / "config.yaml").is_file():
            return weights, folder / "config.yaml"
    raise InferenceError(f"no config.yaml found in any folder above {weights}; pass --config")


def build_model(cfg: Any) -> nn.Module:
    """The network described by the config's ``model`` section (random weights), with the
    adapters of its ``peft`` section when the run was adapted (its checkpoints hold both)."""
    model = cfg.model.build()
    if cfg.peft.method:
        from kanpeft.segmentation_runs import adapt

        model = adapt(model, cfg.peft)
    return model


def model_from_weights(weights: str | Path, cfg: Any) -> nn.Module:
    """Build the config's model and load ``weights`` (safetensors) into it, in eval mode."""
    from safetensors import SafetensorError

    model = build_model(cfg)
    try:
        state = load_weights(Path(weights))
    except (OSError, SafetensorError) as err:
        raise InferenceError(f"cannot read weights {weights}: {err}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise InferenceError(f"weights {weights} do not fit model {cfg.model.name!r} of the "
                             f"config: {str(err).splitlines()[0]} ...") from None
    if cfg.peft.method:  # fold the adapters in: a plain network of the original classes
        from kanpeft.api import merge

        model = merge(model)
    return model.eval()


def load_run(checkpoint: str | Path, config: str | Path | None = None,
             overrides: Sequence[str] = ()) -> tuple[Any, nn.Module]:
    """``(config, model with weights)`` from a run folder or a weights file."""
    from kanseg.config import load_config

    weights, cfg_path = find_checkpoint(checkpoint, config)
    cfg = load_config(cfg_path, list(overrides))
    return cfg, model_from_weights(weights, cfg)


# ----------------------------------------------------------------------------- prediction
class Predictor:
    """Sliding-window (optionally flip-averaged) class/region probabilities for one image."""

    def __init__(self, model: nn.Module, spec: LabelSpec, settings: InferenceConfig,
                 progress: bool = False) -> None:
        self.device = resolve_device(settings.device)
        self.model = model.to(self.device).eval()
        if settings.channels_last:
            to_channels_last(self.model)
        self.spec = spec
        self.settings = settings
        # windows run on `device`; the full-size output is stitched on the CPU, so a large
        # volume never needs to fit in accelerator memory.
        self.inferer = SlidingWindowInferer(
            roi_size=settings.roi_size, sw_batch_size=settings.sw_batch_size,
            overlap=settings.overlap, mode=settings.mode, sw_device=self.device, device="cpu",
            progress=progress,
        )

    def _flips(self, spatial_dims: int) -> Iterator[tuple[int, ...]]:
        """Spatial axes (of a batch tensor) to flip: none, then every non-empty subset."""
        yield ()
        if self.settings.tta_flips:
            axes = range(2, 2 + spatial_dims)
            for n in range(1, spatial_dims + 1):
                yield from itertools.combinations(axes, n)

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        if self.spec.activation == "sigmoid":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Probabilities ``(K, *S)`` on the CPU for an image ``(C, *S)``."""
        batch = image.as_tensor() if isinstance(image, MetaTensor) else image
        batch = batch.unsqueeze(0).float()
        total = None
        flips = list(self._flips(batch.ndim - 2))
        for axes in flips:
            x = batch.flip(axes) if axes else batch
            logits = self.inferer(x, self.model)
            if isinstance(logits, (tuple, list)):  # deep supervision: full-resolution head
                logits = logits[0]
            probs = self._activate(logits.float())
            probs = probs.flip(axes) if axes else probs
            total = probs if total is None else total + probs
        return (total / len(flips))[0]


def probabilities_to_labels(probs: torch.Tensor, spec: LabelSpec,
                            threshold: float = 0.5) -> np.ndarray:
    """Probabilities ``(K, *S)`` -> raw integer label map ``(*S)`` in the dataset's values.

    Softmax classes: argmax mapped to the raw value of each class. Sigmoid regions: regions
    are painted from the largest (most raw values) to the smallest, each with the raw value
    it holds that no smaller region holds; BraTS 2021 TC/WT/ET gives WT->2, TC->1, ET->4.
    """
    if probs.shape[0] != spec.out_channels:
        raise InferenceError(f"model output has {probs.shape[0]} channels but the label spec "
                             f"{list(spec.names)} needs {spec.out_channels}")
    values = spec.values
    dtype = np.uint8 if max(max(v) for v in values) < 256 else np.int16
    if spec.activation == "softmax":
        raw = torch.as_tensor([v[0] for v in values])
        return raw[probs.argmax(0)].numpy().astype(dtype)
    out = np.zeros(probs.shape[1:], dtype=dtype)
    order = sorted(range(len(values)), key=lambda i: -len(values[i]))
    for rank, i in enumerate(order):
        smaller = {v for j in order[rank + 1:] for v in values[j]}
        own = sorted(set(values[i]) - smaller) or sorted(values[i])
        out[(probs[i] > threshold).numpy()] = own[0]
    return out


# ----------------------------------------------------------------------------- cases and I/O
def case_id(path: str | Path) -> str:
    """File name without its image extension (``.nii.gz``, ``.nii``, ``.png`` ...)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def _split_series(path: Path) -> tuple[Path, str | None]:
    """``FOLDER#SeriesInstanceUID`` -> ``(FOLDER, uid)``; any other path (or one that exists
    as it is) -> ``(path, None)``."""
    folder, sep, uid = str(path).rpartition("#")
    if not sep or path.exists() or not Path(folder).is_dir():
        return path, None
    return Path(folder), uid


def dicom_case(folder: Path, uid: str | None = None) -> dict:
    """The case of DICOM series ``uid`` in ``folder`` (``None``: its only series). When the
    folder holds several series and none is named, or not the named one, the error lists
    the series there (UID, description, files) and how to pick one."""
    found = dicom_series(folder)
    if uid is None and len(found) == 1:
        uid = found[0].uid
    if uid is None or uid not in {s.uid for s in found}:
        problem = f"holds no DICOM series {uid!r}" if uid else f"holds {len(found)} DICOM series"
        listing = "".join(f"\n  {s}" for s in found) or " none"
        raise InferenceError(f"input folder {folder} {problem}; pick one with --input "
                             f"{folder}#<SeriesInstanceUID>; series found:{listing}")
    return {"id": folder.name, "image": str(folder.resolve()), "dicom": str(folder.resolve()),
            "series": uid}


def list_input_cases(path: str | Path, data_cfg: Any, layout: str | None = None) -> list[dict]:
    """Cases ``{"id", "image"}`` to predict from a file, a BraTS case folder, a folder of image
    files, a DICOM series folder or ``FOLDER#SeriesInstanceUID`` (also ``"dicom"`` and
    ``"series"``: convert it with :func:`kanseg.dicom_seg.dicom_as_nifti`; see
    :func:`dicom_case`), or (with ``layout``) a dataset root in that layout (every case it
    lists). A case's missing files are reported when it is predicted, so that the other
    cases still are."""
    path, series = _split_series(Path(path).expanduser())
    if path.is_file():
        return [{"id": case_id(path), "image": str(path.resolve())}]
    if not path.is_dir():
        raise InferenceError(f"input {str(path)!r} does not exist")
    if series is not None:
        cases = [dicom_case(path, series)]
    elif layout is not None:
        cfg = dataclasses.replace(data_cfg, root=str(path), layout=layout)
        by_id = {c["id"]: c for c in load_cases(cfg) + test_cases(cfg)}
        cases = list(by_id.values())
    elif data_cfg.layout in BRATS_LAYOUTS:
        if any(f.name.endswith(NIFTI_SUFFIXES) for f in path.iterdir()):  # one case folder
            cases = [c for c in brats_cases(path.parent, data_cfg.layout, data_cfg.modalities)
                     if c["id"] == path.name]
        else:
            cases = brats_cases(path, data_cfg.layout, data_cfg.modalities)
    else:
        cases = [{"id": case_id(f), "image": str(f.resolve())} for f in sorted(path.iterdir())
                 if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES)]
        if not cases and is_dicom_series(path):
            cases = [dicom_case(path)]
    if not cases:
        raise InferenceError(f"input folder {path} holds no cases"
                             + (f" of layout {layout!r}" if layout else ""))
    return [{k: c[k] for k in ("id", "image", "dicom", "series") if k in c} for c in cases]


def _first_file(image: str | list[str]) -> str:
    return image[0] if isinstance(image, list) else image


def write_like(array: np.ndarray, reference: str | Path, path: str | Path,
               affine: np.ndarray | None = None) -> Path:
    """Write ``array`` (spatial dims first, optional trailing channel dim) as NIfTI at
    ``path``, atomically, reusing the NIfTI header of ``reference`` (orientation, qform/sform,
    voxel sizes, units). Non-NIfTI references use ``affine`` instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if str(reference).lower().endswith(NIFTI_SUFFIXES):
        ref = nib.load(str(reference))
        header = ref.header.copy()
        header.set_data_dtype(array.dtype)
        header.set_slope_inter(1.0, 0.0)
        img = type(ref)(array, None, header)  # affine None: keep qform/sform from the header
    else:
        img = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
        img.set_data_dtype(array.dtype)
    return atomic_write(path, lambda tmp: nib.save(img, tmp), suffix=".nii.gz")


# ----------------------------------------------------------------------------- driver
def _root_cause(err: BaseException) -> str:
    """``"<type>: <message>"`` of the innermost exception that ``err`` was raised from."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {str(err).strip() or '(no message)'}"


def check_inputs(case: dict, data_cfg: Any) -> None:
    """Raise :class:`InferenceError` for the input problems that ``kanseg data check`` finds
    (missing or unreadable files, too few dimensions, NaN/Inf voxels, modality mismatch)."""
    from kanseg.data.check import CheckReport, check_case

    report = CheckReport()
    check_case(report, case, data_cfg, allowed=None)
    if report.errors:
        raise InferenceError(f"case {case['id']}: " + "; ".join(
            f"{e.where}: {e.message}" for e in report.errors))


def predict_case(case: dict, transform: Any, inverter: Any, predictor: Predictor,
                 in_channels: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Probabilities ``(K, *S)`` of one case on the grid of its (first) input file, and that
    file's affine. ``in_channels``: the channel count the model was trained on, checked before
    the model runs."""
    files = case["image"]
    try:
        data = transform({"image": files})
    except Exception as err:  # MONAI wraps reader errors in RuntimeError with a long chain
        raise InferenceError(f"case {case['id']}: cannot load/preprocess {files}: "
                             f"{_root_cause(err)}") from None
    image = data["image"]
    if in_channels is not None and image.shape[0] != in_channels:
        raise InferenceError(f"case {case['id']} ({_first_file(files)}): the image has "
                             f"{image.shape[0]} channel(s) after loading, but the model was "
                             f"trained on {in_channels} (one per modality: check the input "
                             f"files and data.modalities)")
    try:
        probs = predictor(image)
    except (RuntimeError, ValueError) as err:  # e.g. a channel count the model does not take
        raise InferenceError(f"case {case['id']} ({_first_file(files)}): the model failed on "
                             f"an input of shape {tuple(image.shape)}: "
                             f"{str(err).splitlines()[0]}") from None
    data["pred"] = MetaTensor(probs, meta=image.meta)
    inverted = inverter(data)["pred"]
    probs = inverted.as_tensor()
    expected = tuple(int(s) for s in image.meta["spatial_shape"])
    if tuple(probs.shape[1:]) != expected:
        raise InferenceError(f"case {case['id']}: inverted prediction has shape "
                             f"{tuple(probs.shape[1:])}, input has {expected}")
    if predictor.spec.activation == "softmax":  # crop padding: background where nothing else
        probs = torch.cat([1.0 - probs[1:].sum(0, keepdim=True), probs[1:]])
    return probs, np.asarray(inverted.affine, dtype=np.float64)


def prediction_file(case: dict, output_format: str = "auto") -> str:
    """File name of a case's label map: ``<id>.png`` for 2D bitmap inputs (``auto``) or
    ``png``, else ``<id>.nii.gz``."""
    bitmap = _first_file(case["image"]).lower().endswith(IMAGE_SUFFIXES_2D)
    png = output_format == "png" or (output_format == "auto" and bitmap)
    return f"{case['id']}{'.png' if png else '.nii.gz'}"


def write_png(labels: np.ndarray, path: str | Path) -> Path:
    """Write a 2D label map (MONAI's (W, H) order) as a PNG of H x W pixels holding the raw
    label values (8-bit, or 16-bit above 255), atomically."""
    if labels.ndim != 2:
        raise InferenceError(f"{path}: PNG output needs a 2D label map, got shape "
                             f"{labels.shape}; use --format nifti")
    image = Image.fromarray(np.ascontiguousarray(labels.T).astype(
        np.uint8 if labels.max(initial=0) < 256 else np.uint16))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), ".png")
    return path


def check_output(output: Path, cases: Sequence[dict], overwrite: bool,
                 output_format: str = "auto") -> None:
    """Refuse to replace existing predictions of ``cases`` in ``output`` unless ``overwrite``."""
    existing = [p for p in (output / prediction_file(c, output_format) for c in cases)
                if p.exists()]
    if existing and not overwrite:
        raise InferenceError(f"output folder {output} already holds {len(existing)} of the "
                             f"predictions to write (e.g. {existing[0].name}); pass --overwrite "
                             "to replace them, or choose another --output")


def run_inference(cfg: Any, model: nn.Module, cases: Iterable[dict], output: str | Path,
                  settings: InferenceConfig, progress: bool = True,
                  overwrite: bool = False) -> list[Path]:
    """Predict every case, writing ``output/<id>.nii.gz`` or ``<id>.png`` (see
    :func:`prediction_file`; and with ``save_probabilities``
    ``output/probabilities/<id>.nii.gz``, channels last). Returns the label-map paths.

    Existing predictions are replaced only with ``overwrite``. A case that fails (bad input,
    model error) does not stop the others: the failures are raised together at the end."""
    from tqdm.auto import tqdm

    from kanseg.data.transforms import build_transforms, prediction_inverter

    spec = label_spec(cfg.data)
    transform = build_transforms(cfg.data, "infer")
    inverter = prediction_inverter(transform, nearest=False)
    cases = list(cases)
    # one case: show the windows' progress (BraTS-sized volumes take minutes on a CPU)
    predictor = Predictor(model, spec, settings, progress=progress and len(cases) == 1)
    output = Path(output)
    check_output(output, cases, overwrite, settings.output_format)
    not_dicom = [c["id"] for c in cases if "dicom" not in c]
    if settings.output_format == "dicom-seg" and not_dicom:
        raise InferenceError(f"--format dicom-seg needs DICOM series folders as input; not "
                             f"DICOM: {', '.join(not_dicom)}")
    written, failures = [], []
    for case in tqdm(cases, desc="infer", unit="case", disable=not progress):
        try:
            check_inputs(case, cfg.data)
            probs, affine = predict_case(case, transform, inverter, predictor,
                                         cfg.model.kwargs.get("in_channels"))
        except InferenceError as err:
            failures.append(str(err))
            continue
        reference = _first_file(case["image"])
        labels = probabilities_to_labels(probs, spec, settings.threshold)
        name = prediction_file(case, settings.output_format)
        written.append(write_png(labels, output / name) if name.endswith(".png")
                       else write_like(labels, reference, output / name, affine))
        if "dicom" in case and settings.output_format in ("auto", "dicom-seg"):
            written.append(write_dicom_seg(labels, case["dicom"],
                                           output / f"{case['id']}{SEG_SUFFIX}",
                                           segment_labels(cfg.data), f"kanseg {cfg.model.name}",
                                           case.get("series")))
        if settings.save_probabilities:
            channels_last = np.moveaxis(probs.numpy().astype(np.float32), 0, -1)
            write_like(channels_last, reference,
                       output / "probabilities" / f"{case['id']}.nii.gz", affine)
    if failures:
        raise InferenceError(f"{len(failures)} of {len(cases)} case(s) failed ({len(written)} "
                             f"prediction(s) written to {output}):\n  " + "\n  ".join(failures))
    return written
