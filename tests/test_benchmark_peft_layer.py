"""benchmarks/peft_layer.py: a tiny run prints one row per adapter with a positive ratio."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_peft_layer",
                                              REPO / "benchmarks" / "peft_layer.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_peft_layer_table(capsys):
    bench.main(["--channels", "4", "--size", "8", "--batch", "2", "--repeats", "2"])
    rows = {line.split("|")[1].strip(): line.split("|")[2:4]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert set(rows) == {"layer", "unadapted", *bench.ADAPTERS}
    assert float(rows["unadapted"][1]) == 1.0
    assert all(float(ms) > 0 and float(ratio) > 0 for name, (ms, ratio) in rows.items()
               if name != "layer")
