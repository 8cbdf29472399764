"""``kanseg`` command line: train | infer | evaluate | data | models | export.

The CLI is thin: every command calls library functions that Python users can call too.
Heavy imports (torch, MONAI) happen inside the commands, so ``kanseg --help`` is fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from kanseg.allocator import keep_freed_memory
from kanseg.schema import show_deprecations_plainly

DESCRIPTION = """\
KAN-convolution segmentation for medical images (UKANet / U2KANet, 2D and 3D).

commands:
  train      train a network from a YAML config (Accelerate: CPU, GPU, multi-GPU/node)
  infer      sliding-window inference on NIfTI files or a dataset, in the input's geometry
  evaluate   per-case Dice / HD95 per class or region, CSV + summary JSON + plots
  data       synthesise, check and convert datasets
  models     list registered networks;  export: ONNX / TorchScript
"""

EPILOG = """\
typical workflow:
  kanseg data synth --out demo_data/synth --cases 24
  kanseg train --config configs/demo3d.yaml --run-dir runs/demo
  kanseg infer --checkpoint runs/demo --input demo_data/synth --layout brats2021 --output runs/demo/pred
  kanseg evaluate --pred runs/demo/pred --label demo_data/synth --layout brats2021 --output runs/demo/eval

`kanseg <command> --help` explains each command with examples.
Errors are one line; `kanseg --debug <command>` (or KANSEG_DEBUG=1) shows the traceback.
"""

#: command -> (module with ``register(subparsers)``, one-line help), in --help order
COMMANDS = {
    "train": ("kanseg.commands.train", "train a segmentation network from a YAML config"),
    "infer": ("kanseg.commands.infer", "sliding-window inference, NIfTI out in input geometry"),
    "evaluate": ("kanseg.commands.evaluate", "Dice / HD95 per case and class or region"),
    "data": ("kanseg.commands.data", "synthesise, check and convert datasets"),
    "models": ("kanseg.commands.models", "list the registered networks"),
    "export": ("kanseg.commands.models", "export a trained network to ONNX / TorchScript"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (others get a help-only entry),
    so that ``kanseg --help`` stays fast. ``command=None`` imports nothing heavy."""
    parser = argparse.ArgumentParser(
        prog="kanseg", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from kanseg import __version__

    parser.add_argument("--version", action="version", version=f"kanseg {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).register(subparsers)
    for name, (_, text) in COMMANDS.items():
        if name not in subparsers.choices:
            subparsers.add_parser(name, help=text, add_help=False)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()
    show_deprecations_plainly("kanseg")
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug or os.environ.get("KANSEG_DEBUG") or not _user_error(err):
            raise
        print(f"kanseg {args.command}: error: {_describe(err)}", file=sys.stderr)
        return 1


def _user_error(err: Exception) -> bool:
    """Errors caused by the input (bad config, data, paths, refused files), the system
    (read-only folder, full disk) or a diverged run: one line, no traceback."""
    from pickle import UnpicklingError

    from kanseg.engine.trainer import TrainingDiverged

    return isinstance(err, (ValueError, OSError, UnpicklingError, TrainingDiverged))


def _describe(err: Exception) -> str:
    """The message of ``err``; for a full disk or file-size limit, what that means."""
    import errno

    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return (f"{err} (the disk is full or a file-size limit was reached; files are replaced "
                "only when completely written, so the earlier ones were kept)")
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
