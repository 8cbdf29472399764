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
    rows = {line.split("|")[1].strip(): [float(cell) for cell in line.split("|")[2:5]]
            for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| layer")}
    assert set(rows) == {"unadapted", "unadapted +1 degree", *bench.ADAPTERS}
    assert rows["unadapted"][1:] == [1.0, 1.0]
    assert rows["unadapted +1 degree"][2] == 1.0  # its own degree
    assert rows["lora r=4"][1] == rows["lora r=4"][2]  # same degree: the same baseline
    assert all(ms > 0 and ratio > 0 and own > 0 for ms, ratio, own in rows.values())
    layers = bench.candidates(2, 4, 3, False)
    assert [layers[name][0].basis.degree for name in ("unadapted", "unadapted +1 degree")] == [3, 4]
