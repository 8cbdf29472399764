"""benchmarks/transfer.py: the adaptation runs carry the common --set overrides, their row's
own overrides and the target cases, as benchmarks/segmentation.py parses them."""
from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import segmentation  # noqa: E402
import transfer  # noqa: E402


def test_adaptation_variants_carry_common_overrides(tmp_path):
    ids = {"target_train": ["t1", "t2"], "target_val": ["v1"]}
    args = transfer.parse_args(["--rows", "scratch", "lora", "--set", "model.refine_channels=0"])
    variants = transfer.adaptation_variants(args.rows, args.overrides, tmp_path / "base", ids)
    parsed = dict(segmentation.parse_variant(v) for v in variants)
    target = ["data.train_cases=[t1, t2]", "data.val_cases=[v1]"]
    assert parsed["scratch"] == ["model.refine_channels=0", *target]
    assert parsed["lora"] == [
        "model.refine_channels=0", f"trainer.init_from={(tmp_path / 'base').resolve()}",
        "peft.method=lora", "peft.options={r: 4, alpha: 8.0}", "peft.trainable=[heads]",
        "trainer.lr=0.005", *target]
