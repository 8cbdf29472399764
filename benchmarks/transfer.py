"""Transfer and PEFT on real data at equal wall-clock: pretrain the config's network on source
cases, then adapt it to target cases with each way of fine-tuning, for the same budget.

The split comes from the config's own fold (default: hippocampus fold 0). Its validation cases
are the target's validation set. Its training cases are permuted (seed 0) and cut into the
target's training cases (``--target-cases``, a small labelled set: the adaptation setting) and
the source (``--source-val-cases`` of them validate the pretraining, so that the checkpoint
``--init-from`` picks never saw a target case). Source and target come from the same scanner
and site: this measures low-data adaptation of a pretrained network, not a domain shift.

Rows (each trained with ``kanseg train`` through ``benchmarks/segmentation.py``):
``scratch`` (no init), ``full`` (init, every parameter), ``decoder`` (init, only ``up``,
``decoder`` and ``heads`` train: ``peft.trainable`` without a method), and the kanpeft
methods ``basis``, ``scales``, ``lora`` (init, adapter + heads). The table gives per row the
trainable parameters and their share, final and best target Dice (mean ± sd over seeds), the
optimiser steps, patches/s, wall time and peak memory; written to ``OUT/results.md`` and
``OUT/results.json``. Interrupted runs resume as in ``segmentation.py``.

    python benchmarks/transfer.py                          # ~45 min on 2 CPU cores
    python benchmarks/transfer.py --rows full scales --seeds 0 --minutes 1
    python benchmarks/transfer.py --set model.refine_channels=0     # a variant of the network
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import segmentation as seg
from kanseg.config import load_config
from kanseg.data.layouts import load_cases, split_cases

#: row -> overrides of the adaptation runs; {init} is the pretrained run folder. Adapters start
#: at the identity and take larger steps (the lr of configs/msd_hippocampus_peft.yaml).
ROWS: dict[str, list[str]] = {
    "scratch": [],
    "full": ["trainer.init_from={init}"],
    "decoder": ["trainer.init_from={init}", "peft.trainable=[up, decoder, heads]"],
    "basis": ["trainer.init_from={init}", "peft.method=basis",
              "peft.options={extra_degrees: 1}", "peft.trainable=[heads]", "trainer.lr=0.01"],
    "scales": ["trainer.init_from={init}", "peft.method=scales", "peft.trainable=[heads]",
               "trainer.lr=0.01"],
    "lora": ["trainer.init_from={init}", "peft.method=lora", "peft.options={r: 4, alpha: 8.0}",
             "peft.trainable=[heads]", "trainer.lr=0.005"],
}
SOURCE = "source"
TRAINABLE = re.compile(r"peft .*?: ([\d,]+) of ([\d,]+) parameters train")


def split(config: Path, target_cases: int, source_val_cases: int) -> dict[str, list[str]]:
    """Case ids of the source (train, val) and the target (train, val) of ``config``'s fold."""
    cfg = load_config(config)
    train, val = split_cases(load_cases(cfg.data), cfg.data)
    ids = [c["id"] for c in train]
    if target_cases + source_val_cases >= len(ids):
        raise SystemExit(f"--target-cases {target_cases} + --source-val-cases "
                         f"{source_val_cases} leave no source training case of {len(ids)}")
    order = [ids[i] for i in np.random.default_rng(0).permutation(len(ids))]
    return {"target_train": sorted(order[:target_cases]), "target_val": [c["id"] for c in val],
            "source_val": sorted(order[target_cases:target_cases + source_val_cases]),
            "source_train": sorted(order[target_cases + source_val_cases:])}


def cases_overrides(train: list[str], val: list[str]) -> str:
    return f"data.train_cases=[{', '.join(train)}],data.val_cases=[{', '.join(val)}]"


def adaptation_variants(rows: Sequence[str], overrides: Sequence[str], init: Path,
                        ids: dict[str, list[str]]) -> list[str]:
    """``segmentation.py --variant`` values of the rows: the common ``overrides``, the row's
    own (initialised from ``init``) and the target cases."""
    target = cases_overrides(ids["target_train"], ids["target_val"])
    return [f"{row}:{','.join([*overrides, *ROWS[row], target])}"
            .replace("{init}", str(init.resolve())) for row in rows]


def trainable(run_dir: Path) -> tuple[int, int] | None:
    """(trainable, total) parameters from the run's train.log; None when every one trains."""
    match = TRAINABLE.search((run_dir / "train.log").read_text())
    return (int(match[1].replace(",", "")), int(match[2].replace(",", ""))) if match else None


def markdown(report: dict[str, Any]) -> str:
    """The transfer table with the conditions of the run."""
    env, sizes = report["environment"], {k: len(v) for k, v in report["split"].items()}
    lines = [
        f"Transfer at equal wall-clock: `{report['config']}`; pretrained {report['pretrain_minutes']}"
        f" min on {sizes['source_train']} source cases (source validation Dice "
        f"{report['source_dice']:.3f}); each row {report['minutes']} min on {sizes['target_train']}"
        f" target cases, validated on {sizes['target_val']}; seeds {report['seeds']}.",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}; {env['cpus']} CPUs, {env['device']}, torch {env['torch']}",
        f"- load average (1/5/15 min) at start {env['load_start']}, at end {env['load_end']}",
        "",
        "| row | trainable | share | final Dice | best Dice | steps | patches/s | wall s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["rows"].items():
        s = row["summary"]
        if not s:
            lines.append(f"| {name} | failed: see `{report['out']}/adapt/logs` |" + " |" * 7)
            continue
        wall = np.median([r["wall_s"] for r in row["runs"] if "final" in r])
        lines.append(
            f"| {name} | {row['trainable']:,} | {100 * row['share']:.2f}% | "
            f"{seg.fmt(s['final']['mean'])} | {seg.fmt(s['best']['mean'])} | {s['steps']:.0f} | "
            f"{s['patches_per_s']:.2f} | {wall:.0f} | {s['peak_rss_mb']} |")
    lines += ["", "Dice: target validation Dice (mean over classes) at the end of the budget "
              "(final) and the best validation of the run, mean ± sd over seeds; steps, "
              "patches/s, wall time (with start-up and validation): median over seeds; peak "
              "RSS: the largest over seeds.", ""]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/msd_hippocampus.yaml"),
                   help="dataset and network config (default configs/msd_hippocampus.yaml)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS),
                   help=f"rows to run (default: all of {', '.join(ROWS)})")
    p.add_argument("--pretrain-minutes", type=float, default=6.0, help="default 6")
    p.add_argument("--minutes", type=float, default=2.5,
                   help="budget of every adaptation run (default 2.5)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="default 0 1")
    p.add_argument("--target-cases", type=int, default=40, help="default 40")
    p.add_argument("--source-val-cases", type=int, default=20, help="default 20")
    p.add_argument("--out", type=Path, default=Path("runs/bench_transfer"),
                   help="output folder (default runs/bench_transfer)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the pretraining and every row (repeatable), "
                        "e.g. model.refine_channels=0")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    load_start = seg.load_average()
    ids = split(args.config, args.target_cases, args.source_val_cases)
    (args.out / "split.json").write_text(json.dumps(ids, indent=2))
    common = ["--config", str(args.config), "--fold", "0"]
    source_ids = ids["source_train"], ids["source_val"]
    source = f"{SOURCE}:{','.join([*args.overrides, cases_overrides(*source_ids)])}"
    print(f"pretraining on {len(ids['source_train'])} source cases", flush=True)
    if seg.main([*common, "--minutes", str(args.pretrain_minutes), "--seeds", "0",
                 "--out", str(args.out / "pretrain"), "--variant", source]) != 0:
        return 1
    init = args.out / "pretrain" / f"{SOURCE}-s0"
    variants = adaptation_variants(args.rows, args.overrides, init, ids)
    status = seg.main([*common, "--minutes", str(args.minutes), "--seeds",
                       *map(str, args.seeds), "--out", str(args.out / "adapt"),
                       *[a for v in variants for a in ("--variant", v)]])
    adapted = json.loads((args.out / "adapt" / "results.json").read_text())
    pretrain = json.loads((args.out / "pretrain" / "results.json").read_text())
    report: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/transfer.py",
                               *(sys.argv[1:] if argv is None else argv)]),
        "date": adapted["date"], "config": str(args.config), "out": str(args.out),
        "pretrain_minutes": args.pretrain_minutes, "minutes": args.minutes,
        "seeds": args.seeds, "split": ids,
        "source_dice": pretrain["variants"][SOURCE]["summary"]["best"]["mean"]["mean"],
        "environment": {**adapted["environment"], "load_start": load_start}, "rows": {}}
    for name, variant in adapted["variants"].items():
        done = [Path(r["run_dir"]) for r in variant["runs"] if "final" in r]
        total = variant["cost"]["params"] if variant["cost"] else 0
        n, total = (trainable(done[0]) if done else None) or (total, total)
        report["rows"][name] = {**variant, "trainable": n, "share": n / total if total else 0.0}
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (args.out / "results.md").write_text(text)
    print(f"\n{text}\nwrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
