"""``kanseg infer``: sliding-window prediction of NIfTI cases in the input's own geometry."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ..data.config import LAYOUTS

EXAMPLES = """\
examples:
  kanseg infer --checkpoint runs/demo --input scan.nii.gz --output pred/
  kanseg infer --checkpoint runs/demo --input BraTS2021_00000/ --output pred/ --tta
  kanseg infer --checkpoint runs/demo --input demo_data/synth --layout brats2021 --output pred/
  kanseg infer --checkpoint runs/ct --input ct_series/ --output pred/ --format dicom-seg
  kanseg infer --checkpoint runs/demo/checkpoints/last/model.safetensors --input imgs/ \\
               --output pred/ --roi-size 96 96 96 --overlap 0.25 --save-probabilities

--checkpoint is a run folder (checkpoints/best, else checkpoints/last) or a model.safetensors
file (its run's config.yaml is found in a parent folder, or pass --config). --input is one
image file, one BraTS case folder, a folder of image files, or a dataset root with --layout.
Writes OUTPUT/<case id>.nii.gz: an integer label map (raw dataset labels, e.g. BraTS
{0,1,2,4}) with the input's shape, affine and header, so it overlays the input in 3D Slicer
or ITK-SNAP; PNG/JPEG/TIFF/BMP inputs get OUTPUT/<name>.png masks of the input's height x
width instead (--format nifti keeps NIfTI). A folder holding one DICOM series is a case too:
it is converted with SimpleITK and gets OUTPUT/<folder name>.nii.gz plus a DICOM-SEG
OUTPUT/<folder name>.seg.dcm referencing the source series (--format auto or dicom-seg;
segments named from the config). A folder holding several series is refused with their list;
pick one with --input FOLDER#<SeriesInstanceUID>. --save-probabilities adds
OUTPUT/probabilities/<case id>.nii.gz (channels last).
Sliding-window settings default to the run config's `inference` section. Inputs are checked
as `kanseg data check` does (unreadable files, NaN/Inf voxels...); a bad case is reported and
the others are still predicted (exit code 1 when any case failed).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "infer", help="sliding-window inference, written in the input's geometry",
        description="Predict every case with MONAI sliding-window inference (Gaussian "
                    "blending, optional flip TTA), undo the preprocessing (orientation, "
                    "spacing, crop) and write NIfTI label maps aligned with the inputs.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="run folder or model.safetensors file")
    p.add_argument("--input", required=True, type=Path,
                   help="image file, case folder, folder of images, or dataset root (--layout)")
    p.add_argument("--output", required=True, type=Path, help="folder for <case id>.nii.gz")
    p.add_argument("--config", type=Path, help="config.yaml of the run (default: found "
                                               "next to the checkpoint)")
    p.add_argument("--layout", choices=LAYOUTS,
                   help="treat --input as a dataset root of this layout and predict every case")
    p.add_argument("--roi-size", type=int, nargs="+", metavar="N",
                   help="sliding-window ROI (default: inference.roi_size or data.patch_size)")
    p.add_argument("--overlap", type=float, help="window overlap in [0, 1) (default 0.5)")
    p.add_argument("--mode", choices=("gaussian", "constant"), help="window blending")
    p.add_argument("--sw-batch-size", type=int, help="windows per forward pass")
    p.add_argument("--tta", action="store_true", default=None,
                   help="average predictions over all flips of the spatial axes")
    p.add_argument("--save-probabilities", action="store_true", default=None,
                   help="also write class/region probability maps")
    p.add_argument("--threshold", type=float, help="sigmoid threshold for regions (0.5)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace predictions that OUTPUT already holds (refused without it)")
    p.add_argument("--format", dest="output_format",
                   choices=("auto", "nifti", "png", "dicom-seg"),
                   help="label maps: auto (default) writes <id>.png (H x W, label values) "
                        "for PNG/JPEG/TIFF/BMP inputs, <id>.nii.gz otherwise, and also "
                        "<id>.seg.dcm for a DICOM series folder; dicom-seg insists on DICOM")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... or auto (default from config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the run config (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..dicom_seg import dicom_as_nifti
    from ..inference import list_input_cases, load_run, run_inference, settings_from_config

    cfg, model = load_run(args.checkpoint, args.config, args.overrides)
    settings = settings_from_config(
        cfg, roi_size=args.roi_size, overlap=args.overlap, mode=args.mode,
        sw_batch_size=args.sw_batch_size, tta_flips=args.tta,
        save_probabilities=args.save_probabilities, threshold=args.threshold,
        device=args.device, output_format=args.output_format)
    with tempfile.TemporaryDirectory(prefix="kanseg-dicom-") as work:  # converted DICOM input
        cases = [dicom_as_nifti(c, Path(work)) for c in
                 list_input_cases(args.input, cfg.data, args.layout)]
        written = run_inference(cfg, model, cases, args.output, settings,
                                overwrite=args.overwrite)
    print(f"wrote {len(written)} prediction(s) to {args.output}"
          + (f" (probabilities in {args.output / 'probabilities'})"
             if settings.save_probabilities else ""))
    return 0
