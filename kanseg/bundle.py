"""Export a trained run as a MONAI bundle (for MONAI Deploy / MONAI Label / ``monai.bundle``).

Layout::

    DIR/configs/metadata.json   network data format, labels, spacing, intensity
    DIR/configs/inference.json  MONAI pre-processing, SlidingWindowInferer, post-processing
    DIR/models/model.ts         the network, TorchScript (traced on one ROI-sized window)

``inference.json`` uses MONAI and torch only (no kanseg import): the run's pre-processing
written as MONAI transforms, the run's sliding-window settings, then activation, ``Invertd``
back to the input grid, the raw dataset label values and ``SaveImaged``. Run it with
``python -m monai.bundle run --config_file DIR/configs/inference.json --bundle_root DIR
--dataset_dir IMAGES --output_dir OUT`` (MONAI's CLI needs ``fire``) or
``monai.bundle.run(config_file=..., bundle_root=..., dataset_dir=...)``. 3D runs: one
``*.nii.gz`` / ``*.nii`` per case, ``<name>_seg.nii.gz`` out; multi-file cases (one file per
channel) go in ``datalist`` as lists. 2D runs: one PNG / JPEG / TIFF / BMP per case (read
as ``kanseg`` reads it: grey, or RGB for three channels), ``<name>_seg.png`` out (H x W, raw
label values, 16-bit above 255).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

from kanseg.data.config import DataConfig
from kanseg.data.layouts import (
    IMAGE_SUFFIXES_2D, NIFTI_SUFFIXES, LabelSpec, input_channels, label_spec,
)
from kanseg.inference import load_run, settings_from_config
from kanseg.models.export import export_torchscript
from kanseg.files import atomic_write

MODEL = "models/model.ts"


def preprocessing_json(cfg: DataConfig) -> list[dict]:
    """The ``infer`` pipeline of :func:`kanseg.data.transforms.preprocessing` as MONAI
    bundle config items (same transforms, same order, same arguments; 2D images through
    MONAI's ``PILReader``, converted to grey or RGB as kanseg's 2D loader does)."""
    load = {"_target_": "LoadImaged", "keys": "image", "image_only": True,
            "ensure_channel_first": True, "dtype": "$np.float32"}
    if cfg.spatial_dims == 2:
        mode = "L" if input_channels(cfg) == 1 else "RGB"
        load["reader"] = {"_target_": "PILReader",
                          "converter": f"$lambda im: im.convert('{mode}')"}
    steps: list[dict] = [load]
    if cfg.orientation:
        steps.append({"_target_": "Orientationd", "keys": "image",
                      "axcodes": cfg.orientation.upper()[:cfg.spatial_dims], "labels": None})
    if cfg.spacing:
        steps.append({"_target_": "Spacingd", "keys": "image", "pixdim": list(cfg.spacing),
                      "mode": "bilinear"})
    crop = [{"_target_": "CropForegroundd", "keys": "image", "source_key": "image",
             "allow_smaller": True}] if cfg.crop_foreground else []
    if cfg.intensity == "mri":
        intensity = [{"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True,
                      "channel_wise": True}]
    elif cfg.intensity == "ct":
        lo, hi = cfg.ct_window
        intensity = [{"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": lo,
                      "a_max": hi, "b_min": 0.0, "b_max": 1.0, "clip": True}]
    else:
        intensity = []
    steps += intensity + crop if cfg.intensity == "ct" else crop + intensity
    return steps


def to_labels_expression(spec: LabelSpec, threshold: float) -> str:
    """A ``$lambda`` turning probabilities ``(K, *S)`` into raw label values ``(1, *S)``,
    as :func:`kanseg.inference.probabilities_to_labels` does (softmax: background is what
    the classes leave, as ``kanseg infer`` sets it where inversion padded)."""
    dtype = "torch.int16" if _wide_labels(spec) else "torch.uint8"
    if spec.activation == "softmax":
        raw = [v[0] for v in spec.values]
        probs = "torch.cat([1 - p[1:].sum(0, keepdim=True), p[1:]])"
        return f"$lambda p: torch.tensor({raw}, dtype={dtype})[{probs}.argmax(0, keepdim=True)]"
    order = sorted(range(spec.out_channels), key=lambda i: -len(spec.values[i]))
    expr = "0"
    for rank, i in enumerate(order):  # largest first, so the smallest region wins
        smaller = {v for j in order[rank + 1:] for v in spec.values[j]}
        own = min(set(spec.values[i]) - smaller or set(spec.values[i]))
        expr = f"torch.where(p[{i}:{i + 1}] > {threshold}, {own}, {expr})"
    return f"$lambda p: ({expr}).to({dtype})"


def _wide_labels(spec: LabelSpec) -> bool:
    """Whether a label value needs more than 8 bits."""
    return max(max(v) for v in spec.values) > 255


def inference_json(cfg: Any) -> dict:
    """The bundle's ``inference.json`` for a run config."""
    spec = label_spec(cfg.data)
    settings = settings_from_config(cfg)
    activation = {"sigmoid": True} if spec.activation == "sigmoid" else {"softmax": True}
    suffixes = NIFTI_SUFFIXES if cfg.data.spatial_dims == 3 else IMAGE_SUFFIXES_2D
    # 2D: a PNG of raw label values (PIL takes uint8 / uint16, not kanseg's int16 maps)
    output = {"output_ext": ".nii.gz", "output_dtype": None} if cfg.data.spatial_dims == 3 \
        else {"output_ext": ".png", "output_dtype": "$np.uint16" if _wide_labels(spec) else None}
    return {
        "imports": ["$import glob", "$import numpy as np", "$import torch"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/data'",
        "datalist": f"$sorted(f for f in glob.glob(@dataset_dir + '/*') "
                    f"if f.lower().endswith({suffixes!r}))",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network": f"$torch.jit.load(@bundle_root + '/{MODEL}', map_location=@device).eval()",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing_json(cfg.data)},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": settings.roi_size,
                    "sw_batch_size": settings.sw_batch_size, "overlap": settings.overlap,
                    "mode": settings.mode, "sw_device": "@device", "device": "cpu"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", **activation},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
             "orig_keys": "image", "nearest_interp": False, "to_tensor": True},
            {"_target_": "Lambdad", "keys": "pred",
             "func": to_labels_expression(spec, settings.threshold)},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
             "output_postfix": "seg", **output, "resample": False, "separate_folder": False,
             "print_log": False},
        ]},
        "predict": "$torch.no_grad()(lambda d: dict(d, pred=@inferer("
                   "d['image'][None].to(@device), @network)[0].cpu()))",
        "initialize": [],
        "run": ["$[@postprocessing(@predict(d)) for d in @dataset]"],
    }


def metadata_json(cfg: Any) -> dict:
    """The bundle's ``metadata.json``: versions, network data format, labels, pre-processing."""
    spec = label_spec(cfg.data)
    data = cfg.data
    roi = settings_from_config(cfg).roi_size
    channels = input_channels(data)
    modality = {"ct": "CT", "mri": "MR"}.get(data.intensity, "unknown")
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
                  "0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "exported by kanseg"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {},
        "task": f"{', '.join(spec.names)} segmentation ({cfg.model.name}, layout {data.layout})",
        "description": "KAN-convolution segmentation network trained with kanseg; "
                       "configs/inference.json runs it with MONAI only.",
        "authors": "kanseg", "copyright": "see the training data's license",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": modality,
                "num_channels": channels, "spatial_shape": roi, "dtype": "float32",
                "value_range": [], "is_patch_data": True,
                "channel_def": {str(i): f"channel {i}" for i in range(channels)}}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": spec.out_channels,
                "spatial_shape": roi, "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": True, "activation": spec.activation,
                "channel_def": {str(i): n for i, n in enumerate(spec.names)}}},
        },
        "labels": {"mode": spec.mode, "names": list(spec.names),
                   "values": [list(v) for v in spec.values]},
        "spacing": data.spacing, "orientation": data.orientation,
        "intensity": {"mode": data.intensity, "ct_window": list(data.ct_window)
                      if data.intensity == "ct" else None},
    }


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(content, indent=2) + "\n"))


def export_bundle(checkpoint: str | Path, out: str | Path,
                  config: str | Path | None = None) -> Path:
    """Write the run (folder or weights file) as a MONAI bundle folder ``out``."""
    cfg, model = load_run(checkpoint, config)
    out = Path(out)
    inference, metadata = inference_json(cfg), metadata_json(cfg)
    example = torch.randn(1, input_channels(cfg.data), *settings_from_config(cfg).roi_size)
    (out / MODEL).parent.mkdir(parents=True, exist_ok=True)
    export_torchscript(model, example, out / MODEL)
    _write_json(out / "configs" / "metadata.json", metadata)
    _write_json(out / "configs" / "inference.json", inference)
    return out
