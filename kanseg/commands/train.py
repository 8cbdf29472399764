"""``kanseg train``: train a segmentation network from a YAML config."""
from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """\
examples:
  kanseg train --config configs/demo3d.yaml
  kanseg train --config configs/brats3d.yaml --set data.root=/data/BraTS2021 \\
               --set trainer.max_epochs=2 --set trainer.mixed_precision=bf16
  kanseg train --config configs/demo3d.yaml --run-dir runs/demo      # fixed run folder
  kanseg train --run-dir runs/demo --resume                            # continue exactly
  kanseg train --config configs/demo3d.yaml --run-dir runs/demo --overwrite  # old run aside
  kanseg train --config configs/msd_hippocampus.yaml --init-from runs/demo  # transfer weights
  accelerate launch --num_processes 4 -m kanseg.cli train --config configs/brats3d.yaml  # 4 GPUs
  torchrun --nproc_per_node 2 -m kanseg.cli train --config configs/demo3d.yaml    # 2 CPU procs

The run folder (default runs/<config name>-<UTC time>) receives config.yaml (resolved),
train.log, metrics.csv, tb/ (TensorBoard), loss.png / dice.png and checkpoints/{last,best}/
(model.safetensors + meta.json; last/ also holds the full resumable state).
A folder that holds a run is refused unless --resume or --overwrite; train.lock (pid, host)
keeps a second training out while one runs.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a segmentation network from a YAML config",
        description="Check the dataset, then train with Accelerate (CPU, GPU, multi-GPU or "
                    "multi-node via `accelerate launch`/`torchrun`), validating with "
                    "sliding-window Dice, logging to TensorBoard/CSV and checkpointing atomically.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path,
                   help="YAML config (optional with --resume: the run's config.yaml is used)")
    p.add_argument("--run-dir", type=Path, help="run folder (default runs/<config>-<time>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, YAML value (repeatable): --set trainer.lr=3e-4")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="resume exactly from PATH (run folder or checkpoint folder); without "
                        "PATH, from <run-dir>/checkpoints/last")
    p.add_argument("--overwrite", action="store_true",
                   help="move a previous run in --run-dir aside (to <run-dir>.replaced-<time>) "
                        "and start afresh; without it, a folder holding a run is refused")
    p.add_argument("--init-from", metavar="PATH",
                   help="initialise the network from PATH (run folder: its best checkpoint; "
                        "checkpoint folder; or model.safetensors): every tensor whose name and "
                        "shape match is loaded, the others (e.g. a head with other classes) are "
                        "re-initialised and listed in train.log; same as trainer.init_from. "
                        "--set trainer.init_strict=true makes any difference an error")
    p.add_argument("--no-check", action="store_true", help="skip the dataset check")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from accelerate.utils import broadcast_object_list

    from ..config import load_config
    from ..engine.checkpoint import resolve
    from ..training import default_run_dir, train
    from ..engine.trainer import process_state

    process_state()  # join the process group first (torchrun / accelerate launch)

    resume = args.resume
    run_dir = args.run_dir
    if resume is not None:
        if resume == "":
            if run_dir is None:
                raise ValueError("--resume without a PATH needs --run-dir")
            resume = run_dir
        if run_dir is None:  # <run>/checkpoints/<name> -> <run>
            run_dir = resolve(resume).parent.parent
    config = args.config
    if config is None:
        if run_dir is None or not (Path(run_dir) / "config.yaml").is_file():
            raise ValueError("--config is required (or --resume with a run folder that holds "
                             "config.yaml)")
        config = Path(run_dir) / "config.yaml"
    overrides = list(args.overrides)
    if args.init_from is not None:  # the run's config.yaml records where it started from
        overrides.append(f"trainer.init_from={Path(args.init_from).expanduser().resolve()}")
    cfg = load_config(config, overrides)
    if run_dir is None:  # every process must agree on the timestamped folder
        run_dir = broadcast_object_list([default_run_dir(config)])[0]
    state = train(cfg, run_dir, resume=resume, check=not args.no_check,
                  overwrite=args.overwrite)
    print(f"done: {state.epoch} epochs, {state.step} steps; best {cfg.trainer.monitor} = "
          f"{state.best if state.best is not None else 'n/a'}; run folder: {run_dir}")
    return 0
