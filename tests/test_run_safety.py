"""Run folders are never clobbered or shared: a finished run is refused without --resume,
--overwrite moves it aside whole, train.lock keeps a second (real) process out, and a
resume after a kill during the end-of-epoch checkpoint keeps the epoch's metrics, and
malicious pickles are refused with one line naming the file."""
from __future__ import annotations

import csv
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kanseg.cli import main
from kanseg.engine.checkpoint import UnsafeFileError
from test_train import synth_root, tiny_config  # noqa: F401 (fixture)

HOLDER = """
import sys, time
from kanseg.engine.rundir import claim_run_dir
with claim_run_dir(sys.argv[1], resume=False, overwrite=False):
    print("locked", flush=True)
    time.sleep(120)
"""


def _train(config: Path, run: Path, *extra: str) -> int:
    return main(["train", "--config", str(config), "--run-dir", str(run), "--no-check", *extra])


def test_finished_run_is_refused_and_overwrite_moves_it_aside(tmp_path, synth_root, capsys):
    config = tiny_config(tmp_path, synth_root, max_epochs=1)
    run = tmp_path / "run"
    assert _train(config, run) == 0
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*")
              if p.is_file() and p.name != "train.log"}
    capsys.readouterr()
    assert _train(config, run) == 1
    err = capsys.readouterr().err
    assert str(run) in err and "--resume" in err and "--overwrite" in err
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*")
             if p.is_file() and p.name != "train.log"}
    assert after == before, "a refused run changed the folder"
    assert not (run / "train.lock").exists()

    assert _train(config, run, "--overwrite") == 0
    [old] = tmp_path.glob("run.replaced-*")
    assert (old / "metrics.csv").read_bytes() == before[Path("metrics.csv")]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.is_symlink()) == \
        ["epoch-0001"]
    assert _train(config, run, "--resume", "--overwrite") == 1


def test_lock_keeps_a_second_process_out_and_stale_locks_are_taken_over(tmp_path, synth_root,
                                                                        capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = tiny_config(tmp_path, synth_root, max_epochs=1)
        assert _train(config, run) == 1
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "train.lock" in err
        assert not (run / "config.yaml").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (run / "train.lock").exists()  # killed: the lock is stale now
    assert _train(config, run) == 0
    assert (run / "metrics.csv").is_file() and not (run / "train.lock").exists()


def _rows(run: Path) -> list[dict]:
    return list(csv.DictReader(open(run / "metrics.csv")))


def test_resume_after_a_kill_in_each_end_of_epoch_checkpoint_phase_keeps_the_epoch_means(
        tmp_path, synth_root):
    # 4 batches per epoch: step-00000004 is written at the last batch, then epoch-0001
    config = tiny_config(tmp_path, synth_root, max_epochs=1, ckpt_every_steps=4, keep_last=3)
    full = tmp_path / "full"
    assert _train(config, full) == 0
    [row] = _rows(full)
    assert float(row["train_loss"]) > 0 and float(row["patches_per_s"]) > 0
    ckpts = full / "checkpoints"
    assert os.readlink(ckpts / "last") == "epoch-0001" and (ckpts / "step-00000004").is_dir()

    # killed while epoch-0001 was staged: last still points at the step checkpoint, which
    # holds every batch of the epoch, and no metrics.csv was written yet
    staged = tmp_path / "staged"
    shutil.copytree(full, staged, symlinks=True)
    os.replace(staged / "checkpoints/epoch-0001", staged / "checkpoints/.tmp-epoch-0001")
    os.remove(staged / "checkpoints/last")
    os.remove(staged / "checkpoints/best")
    os.symlink("step-00000004", staged / "checkpoints/last")
    os.remove(staged / "metrics.csv")
    # killed after epoch-0001 was published and linked, before metrics.csv was written
    published = tmp_path / "published"
    shutil.copytree(full, published, symlinks=True)
    os.remove(published / "metrics.csv")

    for run in (staged, published):
        assert main(["train", "--run-dir", str(run), "--resume", "--no-check"]) == 0
        [resumed] = _rows(run)
        assert resumed["train_loss"] == row["train_loss"], run.name
        assert float(resumed["patches_per_s"]) > 0, run.name


class Evil:
    """Unpickling this creates the marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_malicious_pickles_are_refused_in_one_line_naming_the_file(tmp_path, synth_root, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"weight": Evil(marker)}, evil)
    (tmp_path / "config.json").write_text('{"input_channels": 1, "num_classes": 2}')
    from kanpeft.cli import main as kanpeft_main

    assert kanpeft_main(["methods", "--backbone", str(evil), "--num-classes", "2"]) == 1
    err = capsys.readouterr().err
    assert f"refused to load {evil}" in err and "Traceback" not in err

    run = tmp_path / "run"
    assert _train(tiny_config(tmp_path, synth_root, max_epochs=1), run) == 0
    state = run / "checkpoints/last/training_state.pt"
    torch.save({"trainer": Evil(marker)}, state)
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), "--resume", "--no-check"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"kanseg train: error: refused to load {state.resolve()}"), err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(UnsafeFileError):  # --debug: the traceback
        main(["--debug", "train", "--run-dir", str(run), "--resume", "--no-check"])
    assert not marker.exists()


def _kill_when(cmd: list[str], path: Path) -> None:
    """Run ``cmd`` and SIGKILL it as soon as ``path`` appears."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.lexists(path) and proc.poll() is None:
        time.sleep(0.0005)
    assert proc.poll() is None, f"the run ended before {path.name} appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("phase", [".tmp-epoch-0001", "epoch-0001", ".tmp-epoch-0002"])
def test_real_sigkill_during_end_of_epoch_checkpoint_then_resume(tmp_path, synth_root, phase):
    config = tiny_config(tmp_path, synth_root, max_epochs=2, ckpt_every_steps=4, keep_last=5)
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _train(config, full) == 0
    cmd = [sys.executable, "-m", "kanseg.cli", "train", "--config", str(config), "--run-dir",
           str(cut), "--no-check"]
    _kill_when(cmd, cut / "checkpoints" / phase)
    assert main(["train", "--run-dir", str(cut), "--resume", "--no-check"]) == 0
    expected, got = _rows(full), _rows(cut)
    assert [r["train_loss"] for r in got] == [r["train_loss"] for r in expected]
    assert all(float(r["patches_per_s"]) > 0 for r in got)


@pytest.mark.slow
def test_full_disk_during_training_is_one_line_and_leaves_no_partial_checkpoint(tmp_path,
                                                                                synth_root):
    def limit() -> None:  # a full disk without tmpfs: no file may grow past 40 kB (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "kanseg.cli", "train", "--config",
         str(tiny_config(tmp_path, synth_root, max_epochs=1)), "--run-dir", str(run),
         "--no-check"], capture_output=True, text=True, preexec_fn=limit,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    [line] = [x for x in result.stderr.splitlines() if x.startswith("kanseg train: error:")]
    assert f"cannot write checkpoint {run / 'checkpoints' / 'epoch-0001'} (File too large)" in line
    assert "file-size limit" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == []
    assert not (run / "train.lock").exists()


def test_run_folder_in_a_read_only_folder_is_one_line_naming_it(tmp_path, synth_root,
                                                                 read_only_folder, capsys):
    config = tiny_config(tmp_path, synth_root, max_epochs=1)
    run = read_only_folder / "run"
    assert _train(config, run) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and str(run) in lines[0] and "Traceback" not in err, err
    assert list(read_only_folder.iterdir()) == []
