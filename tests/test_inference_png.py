"""2D inference writes PNG masks for PNG inputs: named like the input, height x width of the
input, raw label values; ``--format nifti`` keeps the NIfTI output (in MONAI's (W, H) order)."""
from __future__ import annotations

import nibabel as nib
import numpy as np
from PIL import Image

from kanseg.cli import main

H, W = 20, 28


def test_png_in_png_out(tmp_path, saved_run):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        pixels = (rng.random((H, W)) * 255).astype(np.uint8)
        pixels[4:12, 6:20] = 255  # a bright block, not symmetric under transposition
        Image.fromarray(pixels).save(images / f"{name}.png")
    run = saved_run({
        "data": {"root": str(tmp_path / "data"), "layout": "folder2d", "spatial_dims": 2,
                 "patch_size": [16, 16], "labels": ["background", "lesion"],
                 "label_values": [0, 7], "intensity": "none", "orientation": None},
        "model": {"name": "ukanet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
                  "depth": 1, "width": 4},
        "loss": {"name": "dice_ce"},
    })

    assert main(["infer", "--checkpoint", str(run), "--input", str(images),
                 "--output", str(tmp_path / "png")]) == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["a.png", "b.png"]
    with Image.open(tmp_path / "png" / "a.png") as mask:
        assert mask.size == (W, H) and mask.mode == "L"
        png = np.asarray(mask)
    assert set(np.unique(png).tolist()) == {0, 7}  # raw label values, both present

    assert main(["infer", "--checkpoint", str(run), "--input", str(images / "a.png"),
                 "--output", str(tmp_path / "nii"), "--format", "nifti"]) == 0
    nifti = np.asarray(nib.load(tmp_path / "nii" / "a.nii.gz").dataobj)
    assert nifti.shape == (W, H) and np.array_equal(nifti.T, png)
