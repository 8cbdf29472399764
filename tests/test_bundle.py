"""``kanseg export RUN --bundle DIR``: the MONAI bundle loads with ``monai.bundle``'s
ConfigParser, its inference.json runs on NIfTI files (3D runs) or PNG files (2D runs) and
gives the labels of ``kanseg infer``."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from kanseg.bundle import to_labels_expression
from kanseg.cli import main
from kanseg.data.layouts import LabelSpec
from kanseg.data.synth import write_dataset
from kanseg.inference import probabilities_to_labels
from test_train import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle_run")
    for _ in write_dataset(folder / "synth", cases=3, size=16, seed=2):
        pass
    config = tiny_config(folder, folder / "synth", max_epochs=1)
    assert main(["train", "--config", str(config), "--run-dir", str(folder / "run")]) == 0
    return folder


def test_bundle_runs_with_monai_and_matches_kanseg_infer(run):
    bundle = run / "bundle"
    assert main(["export", str(run / "run"), "--bundle", str(bundle)]) == 0
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 4 and image["spatial_shape"] == [16, 16, 16]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == \
        {"0": "TC", "1": "WT", "2": "ET"}
    assert meta["labels"]["values"] == [[1, 4], [1, 2, 4], [4]]
    assert meta["intensity"]["mode"] == "mri" and (bundle / "models/model.ts").is_file()

    case = run / "synth" / "BraTS2021_00001"
    files = [str(case / f"BraTS2021_00001_{m}.nii.gz") for m in ("t1", "t1ce", "t2", "flair")]
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/inference.json"))
    parser.read_meta(str(bundle / "configs/metadata.json"))
    parser["bundle_root"] = str(bundle)
    parser["datalist"] = [files]
    parser["output_dir"] = str(run / "bundle_pred")
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("run")
    assert torch.is_grad_enabled()  # the bundle leaves no global state behind
    got = nib.load(run / "bundle_pred" / "BraTS2021_00001_t1_seg.nii.gz")

    assert main(["infer", "--checkpoint", str(run / "run"), "--input", str(case),
                 "--output", str(run / "kanseg_pred")]) == 0
    want = nib.load(run / "kanseg_pred" / "BraTS2021_00001.nii.gz")
    assert got.shape == want.shape and np.allclose(got.affine, want.affine, atol=1e-5)
    assert got.get_data_dtype() == want.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))
    assert len(np.unique(np.asarray(want.dataobj))) > 1  # not a constant map


@pytest.mark.parametrize("spec", [
    LabelSpec("regions", ("TC", "WT", "ET"), ((1, 4), (1, 2, 4), (4,)), "sigmoid"),
    LabelSpec("classes", ("background", "a", "b"), ((0,), (1,), (5,)), "softmax"),
])
def test_label_expression_equals_kanseg_labels(spec):
    probs = torch.rand(spec.out_channels, 6, 7, 5, generator=torch.Generator().manual_seed(0))
    if spec.activation == "softmax":
        probs = torch.softmax(probs * 4, 0)
    to_labels = eval(to_labels_expression(spec, 0.5)[1:], {"torch": torch})
    assert np.array_equal(to_labels(probs)[0].numpy(), probabilities_to_labels(probs, spec))


def test_2d_bundle_writes_the_png_masks_of_kanseg_infer(tmp_path, saved_run):
    images = tmp_path / "images"
    images.mkdir()
    pixels = (np.random.default_rng(0).random((20, 28)) * 255).astype(np.uint8)
    pixels[4:12, 6:20] = 255  # a bright block, not symmetric under transposition
    Image.fromarray(pixels).save(images / "a.png")
    (images / "notes.txt").write_text("not an image")
    run = saved_run({
        "data": {"root": str(tmp_path), "layout": "folder2d", "spatial_dims": 2,
                 "patch_size": [16, 16], "labels": ["background", "lesion"],
                 "label_values": [0, 7]},
        "model": {"name": "ukanet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
                  "depth": 1, "width": 4},
        "loss": {"name": "dice_ce"},
    })
    bundle = tmp_path / "bundle"
    assert main(["export", str(run), "--bundle", str(bundle)]) == 0
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [16, 16]

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/inference.json"))
    parser["bundle_root"] = str(bundle)
    parser["dataset_dir"] = str(images)
    parser["output_dir"] = str(tmp_path / "bundle_pred")
    parser.get_parsed_content("run")
    assert main(["infer", "--checkpoint", str(run), "--input", str(images),
                 "--output", str(tmp_path / "kanseg_pred")]) == 0
    with Image.open(tmp_path / "bundle_pred" / "a_seg.png") as got, \
            Image.open(tmp_path / "kanseg_pred" / "a.png") as want:
        assert got.size == want.size == (28, 20) and got.mode == want.mode == "L"
        assert np.array_equal(np.asarray(got), np.asarray(want))
        assert set(np.unique(np.asarray(want)).tolist()) == {0, 7}  # raw values, not constant
