"""benchmarks/peft_finetune.py: the table aggregates each row over its seeds."""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peft_finetune  # noqa: E402


def result(row: str, seed: int, dice: float, trainable: int, wall: float, peak: float) -> dict:
    return {"row": row, "seed": seed, "val_dice_mean": dice, "trainable": trainable,
            "wall_s": wall, "peak_mem_mb": peak, "config": {"trainer": {"lr": 0.005}}}


def test_table_gives_mean_sd_per_seed_median_time_and_max_memory():
    runs = {"full": [result("full", s, d, 1000, w, 900 + s)
                     for s, (d, w) in enumerate([(0.90, 10), (0.92, 30), (0.94, 12)])],
            "lora": [result("lora", 0, 0.8, 50, 7, 500)]}
    lines = peft_finetune.table("cxr_lung", runs).splitlines()
    assert lines[0].split(" | ")[-3:] == ["Dice per seed", "wall time (s)", "peak RSS (MB) |"]
    full = [cell.strip() for cell in lines[2].strip("|").split("|")]
    sd = math.sqrt(((0.90 - 0.92) ** 2 + (0.94 - 0.92) ** 2) / 2)  # sample sd, written out
    assert full == ["full", "1,000", "100.00%", "0.005", f"0.9200 ± {sd:.4f}",
                    "0.9000 / 0.9200 / 0.9400", "12", "902"]
    lora = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert lora == ["lora", "50", "5.00%", "0.005", "0.8000", "0.8000", "7", "500"]
