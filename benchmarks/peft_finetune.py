"""kanpeft evidence: full fine-tuning, head-only and the three PEFT methods from one pretrained
backbone, same budget and seed, on PneumoniaMNIST (classification) and the chest X-ray lungs
(segmentation, U-Net with the backbone as encoder).

Each run is ``kanpeft finetune`` in its own process (so that peak memory is per run), once
per seed (``trainer.seed``: initialisation of the new head or decoder, adapters, data order);
the table (trainable parameters and share, accuracy/AUC or Dice as mean +- sd over seeds and
per seed, median wall time, peak RSS) is printed and written to ``runs/bench_peft/results.md``
plus ``results.json``. The pretrained backbone (``pipelines/peft_pretrain.py``) is built
first when missing.

    .venv/bin/python benchmarks/peft_finetune.py --seeds 0 1 2    # both tasks, all rows
    .venv/bin/python benchmarks/peft_finetune.py --tasks pneumonia --rows scales lora
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from kanseg.files import atomic_write_text
from segmentation import fmt, mean_sd

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"pneumonia": ROOT / "configs" / "peft_pneumonia.yaml",
         "cxr_lung": ROOT / "configs" / "peft_cxr_lung.yaml"}
#: row -> (method, options, learning rate); the budget (data, epochs, seed) is the same for all.
#: Adapters start at the identity and are small, so they take larger steps than full FT.
#: "+norm" also trains the norm layers (BatchNorm affine + statistics: a few k parameters).
ROWS = {
    "full": ("full", {}, 2e-3),
    "head": ("head", {}, 1e-2),
    "basis": ("basis", {"degrees": [3], "extra_degrees": 0}, 2e-3),
    "scales": ("scales", {}, 1e-2),
    "lora": ("lora", {"r": 4, "alpha": 8.0}, 5e-3),
    "scales+norm": ("scales", {"train_norm": True}, 1e-2),
}
METRICS = {"pneumonia": [("test_accuracy", "accuracy"), ("test_auc", "AUC")],
           "cxr_lung": [("val_dice_mean", "Dice")]}


def run(task: str, row: str, seed: int, out: Path, backbone: Path, extra: list[str]) -> dict:
    """One fine-tuning run in a subprocess; returns its results.json (plus row and seed)."""
    method, options, lr = ROWS[row]
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "kanpeft.cli", "finetune", "--config", str(TASKS[task]),
           "--output", str(out), "--set", f"backbone={backbone}",
           "--set", f"peft.method={method}", "--set", f"peft.options={json.dumps(options)}",
           "--set", f"trainer.lr={lr}", "--set", f"trainer.seed={seed}",
           *[a for item in extra for a in ("--set", item)]]
    print(f"[{task}] {row} seed {seed}: {' '.join(cmd[3:])}", flush=True)
    if not (out / "results.json").is_file():  # re-running the script resumes
        with open(out / "stdout.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return {"row": row, "seed": seed, **json.loads((out / "results.json").read_text())}


def table(task: str, runs: dict[str, list[dict]]) -> str:
    """Markdown table of one task: a line per row, metrics over the row's seeds."""
    full = runs.get("full")
    names = METRICS[task]
    head = ["row", "trainable", "share of full FT", "lr"] + [n for _, n in names] + \
        [f"{names[0][1]} per seed", "wall time (s)", "peak RSS (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, seeds in runs.items():
        first = seeds[0]
        share = f"{first['trainable'] / full[0]['trainable']:.2%}" if full else "-"
        metrics = [fmt(mean_sd([r[key] for r in seeds]), digits=4) for key, _ in names]
        per_seed = " / ".join(f"{r[names[0][0]]:.4f}" for r in seeds)
        wall = statistics.median(r["wall_s"] for r in seeds)
        peak = max(r["peak_mem_mb"] for r in seeds)
        lr = first["config"]["trainer"]["lr"]
        lines.append("| " + " | ".join([row, f"{first['trainable']:,}", share, f"{lr:g}", *metrics,
                                         per_seed, f"{wall:.0f}", f"{peak:.0f}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="trainer.seed of each run (every row runs once per seed)")
    parser.add_argument("--backbone", type=Path, default=ROOT / "runs/backbones/vgg_kagn11_ct")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench_peft")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every run, e.g. trainer.max_epochs=1")
    args = parser.parse_args()
    if not (args.backbone / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "pipelines/peft_pretrain.py"),
                        "--out", str(args.backbone)], check=True, cwd=ROOT)
    results = {task: {row: [run(task, row, seed, args.out / task / row / f"seed{seed}",
                                args.backbone, args.extra) for seed in args.seeds]
                      for row in args.rows} for task in args.tasks}
    text = "\n\n".join(f"### {task}\n\n{table(task, rows)}" for task, rows in results.items())
    print(text)
    atomic_write_text(args.out / "results.md", text + "\n")
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
