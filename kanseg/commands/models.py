"""``kanseg models`` (list the registry) and ``kanseg export`` (ONNX / TorchScript)."""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Sequence

MODELS_EXAMPLES = """\
examples:
  kanseg models                    every registered network with its parameter count
  kanseg models --spatial-dims 2   count the segmentation networks in 2D
  kanseg models --json             machine-readable

cost of the segmentation networks (params, forward GFLOPs per patch, training patches/s here):
  kanseg models --cost --patch 48,64,48 --in-channels 1 --out-channels 3
  kanseg models --cost --patch 256,256 --models ukanet,monai_unet --model-arg width=16
  kanseg models --cost --patch 48,64,48 --model-arg ukanet.degree=2 --device cuda --json

--patch sets the dims (2 sizes: 2D, 3 sizes: 3D); --models defaults to every segmentation
network that supports them. --model-arg KEY=VALUE (YAML value, repeatable) goes to every listed
model that takes KEY; NAME.KEY=VALUE to model NAME only. GFLOPs are the forward convolutions
and matmuls of one patch (torch.utils.flop_counter; elementwise work such as the KAN basis
expansion is not counted); patches/s is the median of --steps timed train steps (forward,
backward, AdamW) at --batch after one warm-up step, so close other work while it runs.

Build any of them in Python with kanseg.models.create_model(name, **kwargs), or in a config
(model: {name: ukanet, spatial_dims: 3, in_channels: 4, family: kagn, degree: 3}).
Parameter counts are for the default arguments (built on the meta device: no memory used).
"""

EXPORT_EXAMPLES = """\
examples:
  kanseg export runs/demo --output demo.onnx
  kanseg export runs/demo --output demo.pt --format torchscript --input-size 64 64 64
  kanseg export my_model/ --output model.onnx --input-size 96 96 96 --batch 2
  kanseg export runs/demo --bundle runs/demo/bundle     # a MONAI bundle (kanseg.bundle)

SOURCE is a run folder (or a model.safetensors inside one; its config.yaml is found above
it or given with --config), or a folder written by kanseg.models.save_model (config.json +
model.safetensors). A run adapted with a peft: section is exported with its adapter merged
into the network. The network is traced on a random input of --batch x in_channels x
--input-size (default: the run's inference.roi_size or data.patch_size). The exported graph
has a dynamic batch axis (ONNX) and fixed spatial size: run it on sliding windows of that
size. After export the file is run on the example input and compared with eager PyTorch
(onnxruntime, or onnx's reference evaluator when onnxruntime is absent); the command fails
when the max abs error exceeds --atol.

--bundle DIR writes a MONAI bundle of a run: configs/metadata.json, configs/inference.json
(MONAI pre-processing, SlidingWindowInferer, post-processing to the dataset's label values)
and models/model.ts; run it with
  python -m monai.bundle run --config_file DIR/configs/inference.json --bundle_root DIR \
      --dataset_dir images/ --output_dir pred/
(MONAI's CLI needs the fire package; monai.bundle.run(...) takes the same arguments.)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` and ``export`` commands."""
    p = subparsers.add_parser(
        "models", help="list the registered networks",
        description="List the registered networks: name, spatial dims, task, parameter count "
                    "of the default configuration and a short description. With --cost, "
                    "measure what the segmentation networks cost on a patch size: parameters, "
                    "forward GFLOPs per patch and training patches/s on this machine.",
        epilog=MODELS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spatial-dims", type=int, choices=(1, 2, 3),
                   help="count segmentation networks at these dims (default: their default)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cost = p.add_argument_group("cost (--cost)")
    cost.add_argument("--cost", action="store_true",
                      help="measure params, GFLOPs/patch and training patches/s")
    cost.add_argument("--patch", type=parse_patch, default=[48, 64, 48], metavar="N,N[,N]",
                      help="patch size, comma-separated; its length sets the dims "
                           "(default 48,64,48)")
    cost.add_argument("--in-channels", type=int, default=1, help="input channels (default 1)")
    cost.add_argument("--out-channels", type=int, default=2, help="output channels (default 2)")
    cost.add_argument("--batch", type=int, default=2, help="training batch (default 2)")
    cost.add_argument("--steps", type=int, default=3,
                      help="timed training steps after one warm-up (default 3)")
    cost.add_argument("--device", default="cpu", help="torch device (default cpu)")
    cost.add_argument("--channels-last", action="store_true",
                      help="store the weights channels-last, as trainer.channels_last: true "
                           "trains them")
    cost.add_argument("--models", type=lambda t: [n for n in t.split(",") if n],
                      metavar="NAME,...", help="models to measure (default: all segmentation "
                                               "models supporting the dims)")
    cost.add_argument("--model-arg", dest="model_args", action="append", default=[],
                      metavar="[NAME.]KEY=VALUE", help="model keyword argument (repeatable)")
    p.set_defaults(func=run_models)

    p = subparsers.add_parser(
        "export", help="export a trained network to ONNX / TorchScript",
        description="Export a trained network to ONNX or TorchScript and check the exported "
                    "file against eager PyTorch.",
        epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="run folder, model.safetensors, or saved model folder")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", type=Path, help="file to write (.onnx, .pt)")
    target.add_argument("--bundle", type=Path, help="folder to write a MONAI bundle to "
                                                    "(a run folder or its weights only)")
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
    from kanseg.models import count_parameters, get_model_spec, list_models

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


def parse_patch(text: str) -> list[int]:
    """``"48,64,48"`` -> ``[48, 64, 48]`` (1 to 3 positive sizes)."""
    try:
        sizes = [int(t) for t in text.split(",")]
    except ValueError:
        sizes = []
    if not 1 <= len(sizes) <= 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected 1 to 3 positive comma-separated sizes such as 48,64,48, got {text!r}")
    return sizes


def parse_model_args(items: Sequence[str]) -> dict[str | None, dict[str, Any]]:
    """``["width=16", "ukanet.degree=2"]`` -> ``{None: {"width": 16}, "ukanet": {"degree": 2}}``
    (values parsed as YAML)."""
    import yaml

    parsed: dict[str | None, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        model, _, key = key.strip().rpartition(".")
        if not sep or not key:
            raise ValueError(f"--model-arg expects [NAME.]KEY=VALUE (e.g. width=16), got {item!r}")
        parsed.setdefault(model or None, {})[key] = yaml.safe_load(value)
    return parsed


def cost_kwargs(name: str, model_args: dict[str | None, dict[str, Any]]) -> dict[str, Any]:
    """The ``--model-arg`` values for model ``name``: the unscoped ones it accepts, then its own."""
    from kanseg.models.registry import accepted_arguments

    scoped = model_args.get(name, {})
    accepted = accepted_arguments(name, scoped)
    shared = {k: v for k, v in model_args.get(None, {}).items() if k in accepted}
    return {**shared, **scoped}


def cost_models(names: list[str] | None, dims: int) -> list[str]:
    """``names`` checked against the registry, or every segmentation model supporting ``dims``."""
    from kanseg.models import get_model_spec, list_models

    if names is None:
        return [n for n in list_models()
                if get_model_spec(n).task == "segmentation" and dims in get_model_spec(n).dims]
    for name in names:
        spec = get_model_spec(name)  # ValueError listing the registered models
        if spec.task != "segmentation":
            raise ValueError(f"--cost measures segmentation networks; {name!r} is a "
                             f"{spec.task} network")
        if dims not in spec.dims:
            raise ValueError(f"model {name!r} supports {spec.dims}-D inputs, not the "
                             f"{dims}-D --patch")
    return names


def cost_table(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One cost row per model (``error`` instead of numbers when it could not be measured),
    a progress line per model on stderr."""
    from kanseg.models.cost import model_cost

    names = cost_models(args.models, len(args.patch))
    model_args = parse_model_args(args.model_args)
    unknown = set(model_args) - {None} - set(names)
    if unknown:
        raise ValueError(f"--model-arg names model(s) not measured: {sorted(unknown)}")
    kwargs_of = {name: cost_kwargs(name, model_args) for name in names}
    unused = set(model_args.get(None, {})) - {k for kw in kwargs_of.values() for k in kw}
    if unused:
        raise ValueError(f"--model-arg {', '.join(sorted(unused))}: taken by none of the "
                         f"models measured ({', '.join(names)})")
    rows = []
    for name, kwargs in kwargs_of.items():
        print(f"measuring {name} {kwargs or ''}...", end=" ", file=sys.stderr, flush=True)
        try:
            row = {"name": name, "kwargs": kwargs,
                   **model_cost(name, args.patch, args.in_channels, args.out_channels,
                                args.batch, args.steps, args.device, args.channels_last,
                                **kwargs)}
            print(f"{row['patches_per_s']:.2f} patches/s", file=sys.stderr)
        except (ValueError, RuntimeError) as err:  # a bad size or option for this model
            row = {"name": name, "kwargs": kwargs, "error": str(err)}
            print(f"failed: {err}", file=sys.stderr)
        rows.append(row)
    reference = next((r.get("patches_per_s") for r in rows if r["name"] == "monai_unet"), None)
    for row in rows:
        if reference and "patches_per_s" in row:
            row["relative_to_monai_unet"] = row["patches_per_s"] / reference
    return rows


def print_cost_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    patch = "x".join(map(str, args.patch))
    print(f"patch {patch}, {args.in_channels} -> {args.out_channels} channels, batch "
          f"{args.batch}, {args.device}{', channels-last' if args.channels_last else ''}, "
          f"median of {args.steps} steps")
    relative = any("relative_to_monai_unet" in r for r in rows)
    print(f"{'name':<15} {'params (M)':>10} {'GFLOPs/patch':>13} {'patches/s':>10}"
          + (f" {'vs monai_unet':>14}" if relative else ""))
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<15} error: {r['error']}")
            continue
        line = f"{r['name']:<15} {r['params'] / 1e6:>10.3f} {r['gflops']:>13.3f} " \
               f"{r['patches_per_s']:>10.2f}"
        if "relative_to_monai_unet" in r:
            line += f" {r['relative_to_monai_unet']:>13.2f}x"
        print(line)


def run_cost(args: argparse.Namespace) -> int:
    rows = cost_table(args)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_cost_table(rows, args)
    return 1 if any("error" in r for r in rows) else 0


def run_models(args: argparse.Namespace) -> int:
    if args.cost:
        return run_cost(args)
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
    from kanseg.models.io import CONFIG, load_model

    if args.source.is_dir() and (args.source / CONFIG).is_file():
        return load_model(args.source), None
    from kanseg.inference import load_run

    cfg, model = load_run(args.source, args.config)
    return model, cfg.roi_size


def run_export(args: argparse.Namespace) -> int:
    import torch

    if args.bundle is not None:
        from kanseg.bundle import export_bundle

        print(f"wrote MONAI bundle {export_bundle(args.source, args.bundle, args.config)}")
        return 0

    from kanseg.models.export import export_model, max_abs_error
    from kanseg.models.registry import resolved_config

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
