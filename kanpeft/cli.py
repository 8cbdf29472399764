"""``kanpeft`` command line: finetune | merge | methods (thin: calls :mod:`kanpeft.tasks`)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from kanseg.allocator import keep_freed_memory
from kanseg.schema import show_deprecations_plainly

DESCRIPTION = """\
Parameter-efficient fine-tuning of pretrained KAN backbones: a kanseg run, checkpoint or model
folder (VGG-KAN, ResKANet 18/34/50, UKANet...) or a torch-conv-kan checkpoint (a folder, a
state-dict file, or a hub id such as brivangl/vgg_kagn_bn11_v4).

methods:
  basis    trainable deltas on the basis weights of chosen degrees (+ new zero-initialised
           degrees, + deltas of the basis shape parameters); polynomial families
  scales   IA3/SSF-style per-channel / per-degree scales and a post-norm shift (tiny)
  lora     HF peft LoRA on the fused KAN conv weights (peft's own save/load/merge)
  full, head  baselines: train everything / only the new head (or decoder)

commands:
  finetune   fine-tune a backbone on a classification or segmentation task from a YAML config
  merge      fold a saved adapter into its backbone and write the plain model, or an
             adapted kanseg run (kanseg train with a peft: section) into a plain run
  methods    list the methods with their trainable-parameter counts for a backbone
"""

EPILOG = """\
examples:
  kanpeft finetune --config configs/peft_pneumonia.yaml --set peft.method=lora
  kanpeft merge --adapter runs/peft_pneumonia/adapter --output runs/peft_pneumonia/merged
  kanpeft merge runs/hippo_scales --output runs/hippo_scales_merged
  kanpeft methods --backbone runs/backbones/vgg_kagn11_ct --num-classes 2
  kanpeft methods --backbone runs/hippocampus --num-classes 3

Set KANPEFT_DEBUG=1 to see full tracebacks instead of short error messages.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kanpeft", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    fmt = argparse.RawDescriptionHelpFormatter

    ft = sub.add_parser("finetune", help="fine-tune from a YAML config", formatter_class=fmt,
                        description="Load the pretrained backbone, add the new head (or U-Net "
                        "decoder), attach the method, train with the shared Accelerate trainer, "
                        "evaluate and write results.json plus the adapter to the run folder.",
                        epilog="example:\n  kanpeft finetune --config configs/peft_pneumonia.yaml "
                        "--set peft.method=scales --set trainer.max_epochs=2")
    ft.add_argument("--config", required=True, help="YAML config (see configs/peft_*.yaml)")
    ft.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. peft.method=lora or "
                    "peft.options={r: 8}; repeatable")
    ft.add_argument("--output", help="run folder (default: the config's output_dir)")

    mg = sub.add_parser("merge", help="merge an adapter into its backbone", formatter_class=fmt,
                        description="Rebuild the fine-tuned model (from finetune.yaml beside the "
                        "adapter, or the bare --backbone), load the adapter, fold it into plain "
                        "KAN layers (extra degrees become a higher degree) and write the model. "
                        "With RUN_DIR, a kanseg run adapted with a peft: section (kanseg train "
                        "--init-from) becomes a plain run folder that kanseg infer / export take.",
                        epilog="examples:\n  kanpeft merge --adapter runs/peft/adapter "
                        "--output runs/peft/merged\n  kanpeft merge runs/hippo_scales --output "
                        "runs/hippo_scales_merged")
    mg.add_argument("run", nargs="?", metavar="RUN_DIR", help="an adapted kanseg run folder "
                    "(instead of --adapter); its base is the one recorded in RUN_DIR/peft.json")
    mg.add_argument("--adapter", help="adapter folder (adapter_config.json + "
                    "adapter_model.safetensors)")
    mg.add_argument("--backbone", help="backbone checkpoint folder or hub id (overrides the "
                    "one recorded in finetune.yaml); with RUN_DIR, the base run or weights "
                    "file (overrides the one recorded in peft.json)")
    mg.add_argument("--output", required=True, help="folder for the merged model (run)")
    mg.add_argument("--force", action="store_true", help="merge even when the backbone's "
                    "weights are not the base the adapter was trained on")

    me = sub.add_parser("methods", help="list methods with trainable-parameter counts",
                        formatter_class=fmt,
                        description="Give the backbone a new output (a classifier's head, a "
                        "segmentation network's output layers) and count the trainable "
                        "parameters of every method with default options.",
                        epilog="example:\n  kanpeft methods --backbone brivangl/vgg_kagn11_v2")
    me.add_argument("--backbone", required=True, help="kanseg run, checkpoint or model folder, "
                    "or torch-conv-kan checkpoint folder, file or hub id")
    me.add_argument("--num-classes", type=int, default=2, help="classes of the new output")
    me.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _finetune(args: argparse.Namespace) -> int:
    from .config import load_config
    from .tasks import finetune

    cfg = load_config(args.config, args.overrides)
    results = finetune(cfg, args.output)
    keys = [k for k in results if k.startswith(("test_", "val_"))]
    print(f"{results['method']}: {results['trainable']:,} trainable of {results['total']:,} "
          f"({results['ratio']:.2%}); " + ", ".join(f"{k} {results[k]:.4f}" for k in keys)
          + f"; {results['wall_s']} s, peak {results['peak_mem_mb']} MB")
    return 0


def _merge(args: argparse.Namespace) -> int:
    if (args.run is None) == (args.adapter is None):
        raise ValueError("give either RUN_DIR (an adapted kanseg run) or --adapter")
    if args.run is not None:
        from .segmentation_runs import merge_run

        out = merge_run(args.run, args.output, args.backbone, force=args.force)
        print(f"merged run written to {out} (kanseg infer --checkpoint {out} ...)")
        return 0
    from .tasks import merge_adapter

    out = merge_adapter(args.adapter, args.output, args.backbone, force=args.force)
    print(f"merged model written to {out}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from .tasks import method_table

    rows = method_table(args.backbone, args.num_classes)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'method':<8} {'trainable':>11} {'of full FT':>10}  description")
    for row in rows:
        if "error" in row:
            print(f"{row['method']:<8} {'-':>11} {'-':>10}  not applicable: {row['error']}")
        else:
            print(f"{row['method']:<8} {row['trainable']:>11,} {row['share_of_full']:>10.2%}  "
                  f"{row['summary']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()
    show_deprecations_plainly("kanpeft")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    command = {"finetune": _finetune, "merge": _merge, "methods": _methods}[args.command]
    try:
        return command(args)
    except (ValueError, OSError, KeyError) as err:
        if os.environ.get("KANPEFT_DEBUG"):
            raise
        print(f"kanpeft {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
