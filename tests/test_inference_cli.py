"""End to end: a saved run folder -> `kanseg infer` -> `kanseg evaluate` on synthetic BraTS."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from kanseg.cli import main
from kanseg.config import config_from_dict, save_config
from kanseg.data.synth import write_case
from kanseg.engine.checkpoint import save_weights


@pytest.fixture()
def run_dir(tmp_path):
    """A run folder with config.yaml and checkpoints/best of a tiny BraTS UKANet."""
    cfg = config_from_dict({
        "data": {"root": str(tmp_path / "train_data"), "layout": "brats2021",
                 "patch_size": [16, 16, 16], "spacing": [13.0, 13.0, 13.0]},
        "model": {"name": "ukanet", "spatial_dims": 3, "in_channels": 4, "out_channels": 3,
                  "depth": 1, "width": 4},
        "loss": {"name": "dice_bce"},
        "inference": {"roi_size": [16, 16, 8], "sw_batch_size": 2},
    })
    run = tmp_path / "run"
    (run / "checkpoints" / "best").mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    model = cfg.model.build()
    with torch.no_grad():  # bias the WT/TC/ET heads so that all labels appear
        model.heads[0].bias.copy_(torch.tensor([0.0, 0.5, -0.5]))
    save_weights(model.state_dict(), run / "checkpoints" / "best" / "model.safetensors")
    return run


def test_infer_and_evaluate_commands(tmp_path, run_dir, capsys):
    data = tmp_path / "data"
    cases = [write_case(data, i, size=16, seed=3) for i in range(2)]
    out = tmp_path / "pred"
    assert main(["infer", "--checkpoint", str(run_dir), "--input", str(data), "--layout",
                 "brats2021", "--output", str(out), "--overlap", "0.25"]) == 0
    assert "wrote 2 prediction(s)" in capsys.readouterr().out
    for case in cases:
        pred = nib.load(str(out / f"{case.name}.nii.gz"))
        ref = nib.load(str(case / f"{case.name}_t1.nii.gz"))
        assert pred.shape == ref.shape
        np.testing.assert_allclose(pred.affine, ref.affine)
        assert nib.aff2axcodes(pred.affine) == nib.aff2axcodes(ref.affine) == ("L", "P", "S")
        assert set(np.unique(np.asanyarray(pred.dataobj))) <= {0, 1, 2, 4}

    # a single case folder and a weights file (ROI, TTA overridden) give one file, same name
    single = tmp_path / "single"
    weights = run_dir / "checkpoints" / "best" / "model.safetensors"
    assert main(["infer", "--checkpoint", str(weights), "--input", str(cases[0]),
                 "--output", str(single), "--roi-size", "16", "16", "16",
                 "--tta", "--save-probabilities"]) == 0
    assert sorted(p.name for p in single.glob("*.nii.gz")) == [f"{cases[0].name}.nii.gz"]
    assert nib.load(str(single / "probabilities" / f"{cases[0].name}.nii.gz")).shape == \
        (16, 16, 16, 3)

    report = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(out), "--label", str(data), "--layout", "brats2021",
                 "--config", str(run_dir / "config.yaml"), "--output", str(report)]) == 0
    summary = json.loads((report / "summary.json").read_text())
    assert summary["cases_scored"] == 2 and not summary["problems"]
    assert set(summary["labels"]) == {"NCR", "ED", "TC", "WT", "ET"}


def test_infer_errors_name_the_problem(tmp_path, run_dir, capsys):
    assert main(["infer", "--checkpoint", str(tmp_path / "nope"), "--input", str(tmp_path),
                 "--output", str(tmp_path / "o")]) == 1
    assert "nope" in capsys.readouterr().err
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"broken")
    assert main(["infer", "--checkpoint", str(run_dir), "--input", str(bad),
                 "--output", str(tmp_path / "o")]) == 1
    assert "bad.nii.gz" in capsys.readouterr().err


def test_infer_checks_inputs_predicts_the_good_cases_and_never_overwrites(tmp_path, run_dir,
                                                                           capsys):
    data = tmp_path / "data"
    cases = [write_case(data, i, size=16, seed=3) for i in range(4)]
    nan_file = cases[1] / f"{cases[1].name}_t1.nii.gz"
    image = nib.load(str(nan_file))
    volume = image.get_fdata()
    volume[2, 3, 4], volume[5, 5, 5] = np.nan, np.inf
    nib.save(nib.Nifti1Image(volume, image.affine), str(nan_file))
    corrupt = cases[2] / f"{cases[2].name}_t2.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b truncated")
    missing = cases[3] / f"{cases[3].name}_flair.nii.gz"
    missing.unlink()
    out = tmp_path / "pred"
    infer = ["infer", "--checkpoint", str(run_dir), "--input", str(data), "--layout",
             "brats2021", "--output", str(out)]
    assert main(infer) == 1
    err = capsys.readouterr().err
    assert "3 of 4 case(s) failed (1 prediction(s) written" in err
    assert f"{nan_file}: 2 NaN/Inf voxels" in err
    assert f"{corrupt}: unreadable or corrupt" in err
    assert f"{missing}: missing image / modality file (case {cases[3].name})" in err
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{cases[0].name}.nii.gz"]

    before = (out / f"{cases[0].name}.nii.gz").read_bytes()
    assert main(infer) == 1
    err = capsys.readouterr().err
    assert "already holds 1 of the predictions" in err and "--overwrite" in err
    assert (out / f"{cases[0].name}.nii.gz").read_bytes() == before
    assert main([*infer, "--overwrite"]) == 1
    assert "3 of 4 case(s) failed" in capsys.readouterr().err


def _file_size_limit(limit: int):
    def apply() -> None:  # a full disk without tmpfs: writes past `limit` bytes fail (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_is_one_clean_line_and_leaves_no_partial_file(tmp_path, run_dir):
    case = write_case(tmp_path / "data", 0, size=16, seed=3)
    out = tmp_path / "pred"
    result = subprocess.run(
        [sys.executable, "-m", "kanseg.cli", "infer", "--checkpoint", str(run_dir), "--input",
         str(case), "--output", str(out), "--save-probabilities"],
        capture_output=True, text=True, preexec_fn=_file_size_limit(8000),
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    probabilities = out / "probabilities" / f"{case.name}.nii.gz"
    assert f"cannot write {probabilities}: File too large" in lines[0]
    assert "file-size limit" in lines[0]
    assert [p.name for p in (out / "probabilities").iterdir()] == []


def test_read_only_output_is_one_clean_line_naming_the_file(tmp_path, run_dir, read_only_folder):
    case = write_case(tmp_path / "data", 0, size=16, seed=3)
    result = subprocess.run(
        [sys.executable, "-m", "kanseg.cli", "infer", "--checkpoint", str(run_dir), "--input",
         str(case), "--output", str(read_only_folder)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and str(read_only_folder / f"{case.name}.nii.gz") in lines[0], lines
    assert "Operation not permitted" in lines[0] or "Permission denied" in lines[0]
    assert list(read_only_folder.iterdir()) == []


def test_infer_refuses_an_image_with_another_channel_count(tmp_path, run_dir, capsys):
    """A 3-channel model given 4-modality cases: stopped before the model runs, naming the
    file and both counts."""
    cfg_text = (run_dir / "config.yaml").read_text().replace("in_channels: 4", "in_channels: 3")
    assert "in_channels: 3" in cfg_text
    (run_dir / "config.yaml").write_text(cfg_text)
    from kanseg.config import load_config

    model = load_config(run_dir / "config.yaml").model.build()
    save_weights(model.state_dict(), run_dir / "checkpoints" / "best" / "model.safetensors")
    case = write_case(tmp_path / "data", 0, size=16, seed=3)
    assert main(["infer", "--checkpoint", str(run_dir), "--input", str(case),
                 "--output", str(tmp_path / "pred")]) == 1
    err = capsys.readouterr().err
    assert f"{case.name}_t1.nii.gz" in err, err
    assert "has 4 channel(s) after loading, but the model was trained on 3" in err, err
