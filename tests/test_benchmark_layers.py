"""benchmarks/layers.py: one small run end to end prints every column for every candidate."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_layers", REPO / "benchmarks" / "layers.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_layers_table(capsys, tmp_path):
    bench.main(["--families", "kacn", "--dims", "3", "--groups", "2", "--repeats", "1",
                "--tck", str(tmp_path / "absent")])
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| family"))
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    assert set(rows) == {"family", "kacn", "plain"}
    assert len(rows["kacn"].split("|")) == len(header.split("|"))
    cells = [c.strip() for c in rows["kacn"].split("|")[1:-1]]
    assert float(cells[5]) > 0 and float(cells[9]) > 0  # x floor, fwd+bwd and no-grad
    assert cells[6] == "-"  # torch-conv-kan absent: column skipped


@pytest.mark.slow
def test_layers_table_compiled(capsys, tmp_path):
    bench.main(["--families", "kacn", "--dims", "3", "--groups", "1", "--repeats", "1",
                "--compile", "--compile-expansion", "kacn", "--tck", str(tmp_path / "absent")])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| kacn")]
    assert [row.split("|")[1].strip() for row in rows] == ["kacn", "kacn compiled",
                                                           "kacn compile_expansion"]


def test_timed_runs_forget_memoized_tensors():
    """A module memoizing on its input (as torch-conv-kan's KAGN layers memoize their Gram
    polynomials) keeps nothing alive between timed runs, in subclasses and submodules too."""
    import functools

    import torch
    from torch import nn

    class Memoizing(nn.Module):
        @functools.lru_cache(maxsize=128)
        def square(self, x: torch.Tensor) -> torch.Tensor:
            return x * x

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.square(torch.tanh(x))  # a new tensor at every call: never a hit

    class Subclass(Memoizing):
        pass

    module = nn.Sequential(Subclass())
    x = torch.randn(2, 3, requires_grad=True)
    for make_run in bench.MODES.values():
        make_run(module, x)()
        assert Memoizing.square.cache_info().currsize == 0
    module[0](x)
    assert Memoizing.square.cache_info().currsize == 1  # memoizes outside the timed runs
    bench.forget_memoized(module)
    assert Memoizing.square.cache_info().currsize == 0
