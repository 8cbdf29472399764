"""benchmarks/segmentation.py: variant parsing, one short run end to end, resume."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from kanseg.data.synth import write_dataset
from test_train import TINY as TRAIN_TINY

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_segmentation",
                                              REPO / "benchmarks" / "segmentation.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

# the tiny training config of test_train, with a long budget that only the time cap ends
TINY = {**TRAIN_TINY, "trainer": {"max_epochs": 1000, "val_every": 1000, "keep_last": 1}}


def test_parse_variant():
    assert bench.parse_variant("segresnet") == ("segresnet",
                                                ["model.name=segresnet", "model.width=16"])
    assert bench.parse_variant("k:model.degree=2,model.kan_levels=[2,3],trainer.lr=0.01") == (
        "k", ["model.degree=2", "model.kan_levels=[2,3]", "trainer.lr=0.01"])
    for bad in ("nope", "x:model.degree", "a b:model.degree=2"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_variant(bad)


def test_one_run_validates_at_the_budget_and_resumes(tmp_path, capsys):
    for _ in write_dataset(tmp_path / "synth", cases=5, size=24, seed=3):
        pass
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"],
                                                        "root": str(tmp_path / "synth")}}))
    out = tmp_path / "bench"
    argv = ["--config", str(config), "--minutes", "0.02", "--seeds", "0",
            "--variant", "ukanet", "--out", str(out)]
    assert bench.main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    run = report["variants"]["ukanet"]["runs"][0]
    assert run["validations"] == 1  # val_every=1000: only the validation forced by the budget
    assert set(run["final"]) == {"TC", "WT", "ET", "mean"} and run["steps"] >= 1
    assert report["variants"]["ukanet"]["cost"]["gflops"] > 0
    assert "| ukanet |" in (out / "results.md").read_text()
    assert bench.main(argv) == 0  # resumes: the finished run is reused
    assert "finished earlier" in capsys.readouterr().out
