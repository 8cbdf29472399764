"""``kanseg models`` (list the registry) and ``kanseg export`` (ONNX / TorchScript)."""
from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

MODELS_EXAMPLES = """\
examples:
  kanseg models                    every registered network with its parameter count
  kanseg models --spatial-dims 2   count the segmentation networks in 2D
  kanseg models --json             machine-readable

Build any of them in Python with kanseg.models.create_model(name, **kwargs), or in a config
(model: {name: ukanet, spatial_dims: 3, in_channels: 4, family: kagn, degree: 3}).
Parameter counts are for the default arguments (built on the meta device: no memory used).
"""

EXPORT_EXAMPLES = """\
examples:
  kanseg export runs/demo --output demo.onnx
  kanseg export runs/demo --output demo.pt --format torchscript --input-size 64 64 64
  kanseg export my_model/ --output model.onnx --input-size 96 96 96 --batch 2

SOURCE is a run folder (or a model.safetensors inside one; its config.yaml is found above
it or given with --config), or a folder written by kanseg.models.save_model (config.json +
model.safetensors). The network is traced on a random input of --batch x in_channels x
--input-size (default: the run's inference.roi_size or data.patch_size). The exported graph
has a dynamic batch axis (ONNX) and fixed spatial size: run it on sliding windows of that
size. After export the file is run on the example input and compared with eager PyTorch
(onnxruntime, or onnx's reference evaluator when onnxruntime is absent); the command fails
when the max abs error exceeds --atol.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` and ``export`` commands."""
    p = subparsers.add_parser(
        "models", help="list the registered networks",
        description="List the registered networks: name, spatial dims, task, parameter count "
                    "of the default configuration and a short description.",
        epilog=MODELS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spatial-dims", type=int, choices=(1, 2, 3),
                   help="count segmentation networks at these dims (default: their default)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_models)

    p = subparsers.add_parser(
        "export", help="export a trained network to ONNX / TorchScript",
        description="Export a trained network to ONNX or TorchScript and check the exported "
                    "file against eager PyTorch.",
        epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="run folder, model.safetensors, or saved model folder")
    p.add_argument("--output", required=True, type=Path, help="file to write (.onnx, .pt)")
    p.add_argument("--format", choices=("onnx", "torchscript"),
                   help="default: from the output suffix (.onnx -> onnx, else torchscript)")
    p.add_argument("--input-size", type=int, nargs="+", metavar="N",
                   help="spatial size of the example input (default: from the run config)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the example input")
    p.add_argument("--config", type=Path, help="config.yaml of the run (default: found above)")
    p.add_argument("--dynamo", action="store_true",
                   help="ONNX: use the torch.export-based exporter instead of the TorchScript one")
    p.add_argument("--atol", type=float, default=1e-3,
                   help="max abs error allowed between export and eager (default 1e-3)")
    p.set_defaults(func=run_export)


def model_table(spatial_dims: int | None = None) -> list[dict]:
    """One row per registered model: name, dims, task, params (default config), description."""
    from . import count_parameters, get_model_spec, list_models

    rows = []
    for name in list_models():
        spec = get_model_spec(name)
        kwargs = {}
        if spatial_dims is not None and spec.task == "segmentation" and spatial_dims in spec.dims:
            kwargs["spatial_dims"] = spatial_dims
        params = inspect.signature(spec.builder).parameters
        counted = kwargs.get("spatial_dims",
                             params["spatial_dims"].default if "spatial_dims" in params else 2)
        rows.append({"name": name, "dims": "/".join(f"{d}D" for d in spec.dims),
                     "task": spec.task, "counted_dims": counted,
                     "params": count_parameters(name, **kwargs), "description": spec.description})
    return rows


def run_models(args: argparse.Namespace) -> int:
    rows = model_table(args.spatial_dims)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<15} {'dims':<9} {'task':<15} {'params (default config)':>24}  description")
    for r in rows:
        params = f"{r['params']:,} ({r['counted_dims']}D)"
        print(f"{r['name']:<15} {r['dims']:<9} {r['task']:<15} {params:>24}  {r['description']}")
    return 0


def _load_source(args: argparse.Namespace):
    """(model in eval mode, default spatial size or None) for the export source."""
    from .io import CONFIG, load_model

    if args.source.is_dir() and (args.source / CONFIG).is_file():
        return load_model(args.source), None
    from kanseg.inference import load_run

    cfg, model = load_run(args.source, args.config)
    return model, cfg.roi_size


def run_export(args: argparse.Namespace) -> int:
    import torch

    from .export import export_model, max_abs_error
    from .registry import resolved_config

    model, default_size = _load_source(args)
    size = args.input_size or default_size
    config = resolved_config(model)
    if not size:
        raise ValueError("--input-size is required for a saved model folder "
                         "(e.g. --input-size 64 64 64)")
    dims = config.get("spatial_dims", 2)  # backbones are 2D
    if len(size) != dims:
        raise ValueError(f"--input-size needs {dims} sizes for this {dims}D network, "
                         f"got {list(size)}")
    fmt = args.format or ("onnx" if args.output.suffix == ".onnx" else "torchscript")
    example = torch.randn(args.batch, config["in_channels"], *size)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    path = export_model(model, example, args.output, fmt, dynamo=args.dynamo)
    check = max_abs_error(fmt, path, model, example)
    print(f"wrote {path} ({fmt}, input {tuple(example.shape)}); max abs error vs eager "
          f"{check['max_abs_error']:.2e} ({check['engine']})")
    if check["max_abs_error"] > args.atol:
        print(f"error: exported model differs from eager by more than --atol {args.atol}")
        return 1
    return 0
