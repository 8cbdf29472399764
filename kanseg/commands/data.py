"""``kanseg data synth | check | convert``: thin command-line wrappers over kanseg.data.

``register(subparsers)`` adds the ``data`` command to kanseg's top-level parser; every handler
is ``func(args) -> int`` (exit status). ``python -m kanseg.commands.data`` runs it standalone.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml
from tqdm import tqdm

from kanseg.data.check import check_dataset
from kanseg.data.config import LAYOUTS, DataConfig
from kanseg.data.convert import NNUNET_ENDINGS, convert_to_nifti, convert_to_nnunet
from kanseg.data.layouts import DataError
from kanseg.data.synth import write_dataset
from kanseg.schema import ConfigError, from_dict


def _synth(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    folders = list(tqdm(write_dataset(args.out, args.cases, args.size, args.seed, args.layout),
                        total=args.cases, desc="synthesising cases", unit="case"))
    print(f"wrote {len(folders)} {args.layout} cases ({args.size}^3) to {args.out} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def load_data_config(path: str | Path) -> DataConfig:
    """The ``data`` section of a YAML config (or the whole file if it has no such section)."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"cannot read config {path}: {err}") from None
    section = raw.get("data", raw) if isinstance(raw, dict) else raw
    return from_dict(DataConfig, section, "data")


def _check(args: argparse.Namespace) -> int:
    if not (args.config or args.root or args.datalist):
        print("error: give --config, or --root/--datalist with --layout", file=sys.stderr)
        return 2
    try:
        if args.config:
            cfg = load_data_config(args.config)
        else:
            options = {"root": args.root or "", "layout": args.layout,
                       "spatial_dims": 2 if args.layout == "folder2d" else args.spatial_dims}
            options["patch_size"] = [1] * options["spatial_dims"]
            if args.datalist:
                options["datalist"] = args.datalist
            if args.mask_threshold is not None:
                options["mask_threshold"] = args.mask_threshold
            cfg = from_dict(DataConfig, options, "data")
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = check_dataset(cfg, progress=True)
    print(report.format())
    return 0 if report.ok else 1


def _convert(args: argparse.Namespace) -> int:
    try:
        if args.to == "nnunet":
            cfg = load_data_config(args.config) if args.config else from_dict(
                DataConfig, {"root": args.src, "layout": args.layout}, "data")
            cfg.root = args.src
            out = convert_to_nnunet(cfg, args.dst, args.file_ending, progress=True)
        else:
            out = convert_to_nifti(args.src, args.dst, series_id=args.series)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data`` with its sub-commands to ``subparsers``; returns the ``data`` parser."""
    data = subparsers.add_parser(
        "data", help="synthesise, check and convert datasets",
        description="Dataset utilities: write a synthetic BraTS-like set, check a dataset "
                    "for problems, convert DICOM/NRRD/MHA to NIfTI.")
    commands = data.add_subparsers(dest="data_command", metavar="{synth,check,convert}",
                                   required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    synth = commands.add_parser(
        "synth", formatter_class=fmt, help="write synthetic BraTS-like NIfTI cases",
        description="Write seeded synthetic BraTS-like cases: a head with four MRI contrasts "
                    "and a tumour (necrotic core, edema, enhancing rim) in the BraTS folder "
                    "layout. Needs no download; the demo and tests use it.")
    synth.add_argument("--out", required=True, help="output folder (one sub-folder per case)")
    synth.add_argument("--cases", type=int, default=20, help="number of cases")
    synth.add_argument("--layout", choices=("brats2021", "brats2023"), default="brats2021",
                       help="file naming and label values (2021: ET=4, 2023: ET=3)")
    synth.add_argument("--size", type=int, default=96, help="cube edge in voxels")
    synth.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    synth.set_defaults(func=_synth)

    check = commands.add_parser(
        "check", formatter_class=fmt, help="report every problem in a dataset",
        description="Read every case and report every problem with its file: missing "
                    "modality or label, unreadable files, shape/affine mismatch, label values "
                    "outside the declared set, NaN/Inf voxels, empty dataset (errors) and "
                    "unusual spacing (warnings). Exit status 1 on errors.")
    check.add_argument("--config", help="YAML config whose 'data' section describes the set")
    check.add_argument("--root", help="dataset folder (with --layout)")
    check.add_argument("--layout", choices=LAYOUTS, default="brats2021",
                       help="folder layout when using --root")
    check.add_argument("--datalist", help="JSON/CSV datalist for --layout datalist")
    check.add_argument("--spatial-dims", type=int, choices=(2, 3), default=3,
                       help="2 or 3 (folder2d is always 2)")
    check.add_argument("--mask-threshold", type=float, default=None,
                       help="binarise anti-aliased masks at this value (skips the label "
                            "value check)")
    check.set_defaults(func=_check)

    convert = commands.add_parser(
        "convert", help="DICOM series / NRRD / MHA -> NIfTI; dataset -> nnU-Net",
        description="Convert a DICOM series folder or an NRRD/MHA/NIfTI file to NIfTI with "
                    "SimpleITK, keeping spacing, origin and direction. With --to nnunet, "
                    "write the dataset at SRC (--layout or --config) as an nnU-Net v2 raw "
                    "folder DST named Dataset<XXX>_<Name> (labels renumbered to 0..n-1, "
                    "regions as nnU-Net regions).",
        epilog="examples:\n  kanseg data convert scan_dicom/ ct.nii.gz\n"
               "  kanseg data convert demo_data/synth nnUNet_raw/Dataset501_Synth "
               "--to nnunet --layout brats2021",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    convert.add_argument("src", help="DICOM series folder, or an image file; a dataset root "
                                     "with --to nnunet")
    convert.add_argument("dst", help="output .nii.gz file, or a folder to write <name>.nii.gz; "
                                     "the Dataset<XXX>_<Name> folder with --to nnunet")
    convert.add_argument("--to", choices=("nifti", "nnunet"), default="nifti",
                         help="output format (default nifti)")
    convert.add_argument("--layout", choices=LAYOUTS, default="brats2021",
                         help="layout of the dataset at SRC (--to nnunet; default brats2021)")
    convert.add_argument("--config", help="YAML config whose 'data' section describes SRC "
                                          "(labels, regions, modalities; --to nnunet)")
    convert.add_argument("--file-ending", choices=NNUNET_ENDINGS, default=".nii.gz",
                         help="image format of the nnU-Net folder (--to nnunet; default .nii.gz)")
    convert.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several")
    convert.set_defaults(func=_convert)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kanseg")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
