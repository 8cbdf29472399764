"""`kanseg train` end to end on tiny synthetic BraTS-like data, exact resume after SIGKILL,
refusal on data errors."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kanseg.cli import main
from kanseg.config import load_config
from kanseg.data.synth import write_dataset
from kanseg.engine.checkpoint import load_weights

TINY = {
    "data": {"layout": "brats2021", "patch_size": [16, 16, 16], "batch_size": 1,
             "num_workers": 0, "cache": "memory", "samples_per_case": 1,
             "augment": {"rotate_prob": 0.0, "zoom_prob": 0.0}},
    "model": {"name": "ukanet", "spatial_dims": 3, "in_channels": 4, "out_channels": 3,
              "family": "kagn", "degree": 1, "width": 2, "depth": 1, "plain_stem": True},
    "loss": {"name": "dice_bce"},
    "trainer": {"max_epochs": 2, "lr": 0.01, "log_every": 1, "val_every": 1, "keep_last": 2},
    "inference": {"roi_size": [16, 16, 16], "sw_batch_size": 2},
}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    for _ in write_dataset(root, cases=5, size=24, seed=3):
        pass
    return root


def tiny_config(folder: Path, root: Path, **trainer) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["root"] = str(root)
    cfg["trainer"].update(trainer)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_cli_writes_run_folder(tmp_path, synth_root):
    config = tiny_config(tmp_path, synth_root)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run),
                 "--set", "trainer.ema=0.9"]) == 0
    for name in ("config.yaml", "metrics.csv", "train.log", "loss.png", "dice.png"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"val_dice_TC", "val_dice_WT", "val_dice_ET", "val_dice_mean"} <= set(rows[0])
    for link in ("last", "best"):
        meta = json.loads((run / "checkpoints" / link / "meta.json").read_text())
        assert {"epoch", "step", "metric"} <= set(meta)
    assert json.loads((run / "checkpoints/last/meta.json").read_text())["epoch"] == 2
    # the saved weights (EMA) load into the model that the resolved config builds
    cfg = load_config(run / "config.yaml")
    assert cfg.trainer.ema == 0.9
    model = cfg.model.build()
    model.load_state_dict(load_weights(run / "checkpoints/best/model.safetensors"))


def test_train_refuses_broken_dataset(tmp_path, synth_root, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for case in sorted(synth_root.iterdir())[:3]:
        (broken / case.name).symlink_to(case, target_is_directory=True)
    bad = broken / "BraTS2021_99999"
    bad.mkdir()
    (bad / "BraTS2021_99999_t1.nii.gz").write_bytes(b"not a nifti file")
    config = tiny_config(tmp_path, broken)
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "BraTS2021_99999" in err and "kanseg data check" in err


def _train_cmd(config: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kanseg.cli", "train", "--config", str(config),
            "--run-dir", str(run), *extra]


def _run(cmd: list[str], env: dict) -> None:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert result.returncode == 0, result.stderr[-3000:]


def _last_step(run: Path) -> int:
    """The step of ``run``'s ``last`` checkpoint, -1 while there is none."""
    try:
        return json.loads((run / "checkpoints" / "last" / "meta.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


@pytest.mark.parametrize("channels_last", [False, True])
def test_resume_after_sigkill_is_exact(tmp_path, synth_root, channels_last):
    config = tiny_config(tmp_path, synth_root, max_epochs=3, ckpt_every_steps=2, val_every=2,
                         ema=0.8, channels_last=channels_last)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run(_train_cmd(config, full), env)

    proc = subprocess.Popen(_train_cmd(config, cut), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # wait until `last` (not just the checkpoint folder: `last` moves after it) is step 6:
    # epoch 2 of 3, mid-epoch (4 batches per epoch)
    deadline = time.monotonic() + 240
    while _last_step(cut) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "checkpoints" / "epoch-0003").exists()
    meta = json.loads((cut / "checkpoints/last/meta.json").read_text())
    assert meta["step"] < 12 and meta["batch_in_epoch"] > 0, meta

    _run(_train_cmd(config, cut, "--resume"), env)
    for name in ("model.safetensors", "train_model.safetensors"):
        a = load_weights(full / "checkpoints/last" / name)
        b = load_weights(cut / "checkpoints/last" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"
    rows_full = list(csv.DictReader(open(full / "metrics.csv")))
    rows_cut = list(csv.DictReader(open(cut / "metrics.csv")))
    assert [r["val_dice_mean"] for r in rows_full] == [r["val_dice_mean"] for r in rows_cut]


def test_cli_help_lists_and_wires_every_command(capsys):
    from kanseg.cli import COMMANDS

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert command in text
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0, command
        assert f"usage: kanseg {command}" in capsys.readouterr().out
