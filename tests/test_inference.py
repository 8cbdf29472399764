"""Sliding-window inference: geometry of the written NIfTI, equivalences, TTA, label decoding."""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from kanseg.data.config import DataConfig
from kanseg.data.layouts import LabelSpec
from kanseg.config import InferenceConfig
from kanseg.inference import (
    InferenceError, Predictor, find_checkpoint, list_input_cases,
    probabilities_to_labels, run_inference,
)
from kanseg.layers import create_kan_conv
from kanseg.models import create_model

SOFTMAX2 = LabelSpec("classes", ("background", "fg"), ((0,), (1,)), "softmax")
BRATS21 = LabelSpec("regions", ("TC", "WT", "ET"), ((1, 4), (1, 2, 4), (4,)), "sigmoid")

# Non-RAS (axes permuted and flipped: voxel axes point P, L, I), anisotropic, off-origin.
LPI_PERMUTED = np.array([
    [0.0, -0.8, 0.0, 40.0],
    [-1.5, 0.0, 0.0, 30.0],
    [0.0, 0.0, -3.0, 12.0],
    [0.0, 0.0, 0.0, 1.0],
])


def _head(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A positive blob (zero outside an ellipsoid) with texture, so crops and z-scores act."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = sum((g / 0.8) ** 2 for g in grid) < 1
    return (inside * (50 + 40 * grid[0] + 10 * rng.random(shape))).astype(np.float32)


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _data_cfg(**kw) -> DataConfig:
    base = dict(layout="datalist", datalist="unused.json", labels=["background", "fg"],
                patch_size=[16, 16, 16])
    return DataConfig(**{**base, **kw})


def _config(**data_options):
    """The parts of a kanseg config that inference reads: data, and a model trained on any
    number of channels."""
    return SimpleNamespace(data=_data_cfg(**data_options), model=SimpleNamespace(kwargs={}))


def _settings(**kw) -> InferenceConfig:
    return InferenceConfig(**{"roi_size": (16, 16, 16), "device": "cpu", **kw})


def _tiny_unet(in_channels: int = 1, out_channels: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return create_model("ukanet", spatial_dims=3, in_channels=in_channels,
                        out_channels=out_channels, depth=1, width=4).eval()


class ThresholdModel(nn.Module):
    """Pointwise logits [0, x0]: softmax picks class 1 exactly where channel 0 is > 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, :1]], dim=1)


def test_infer_restores_non_ras_geometry_and_voxel_order(tmp_path):
    raw = _head((13, 11, 9))
    src = _save(tmp_path / "case_a.nii.gz", raw, LPI_PERMUTED)
    cfg = _config(orientation="RAS", spacing=None)
    out = run_inference(cfg, ThresholdModel(), list_input_cases(src, cfg.data), tmp_path / "out",
                        _settings(), progress=False)
    assert out == [tmp_path / "out" / "case_a.nii.gz"]
    pred, ref = nib.load(str(out[0])), nib.load(str(src))
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine)
    assert nib.aff2axcodes(pred.affine) == nib.aff2axcodes(ref.affine) == ("P", "L", "I")
    assert pred.header["qform_code"] == 1 and pred.header["sform_code"] == 1
    np.testing.assert_allclose(pred.header.get_zooms(), ref.header.get_zooms())
    # z-score over nonzero voxels: class 1 exactly where raw > mean(raw[raw > 0]), in the
    # input's own voxel order (a wrong inverse orientation / crop would shift or flip this).
    expected = (raw > raw[raw > 0].mean()).astype(np.uint8)
    np.testing.assert_array_equal(np.asanyarray(pred.dataobj), expected)
    assert pred.get_data_dtype() == np.uint8


def test_infer_4d_multichannel_input_writes_3d_label_map(tmp_path):
    raw = _head((12, 10, 8), seed=3)
    volume = np.stack([raw, raw[::-1]], axis=-1)  # MSD style: channels last in one 4D file
    src = _save(tmp_path / "multi.nii.gz", volume, LPI_PERMUTED)
    cfg = _config(orientation="RAS", spacing=None)
    out = run_inference(cfg, ThresholdModel(), list_input_cases(src, cfg.data), tmp_path / "out",
                        _settings(), progress=False)
    pred = nib.load(str(out[0]))
    assert pred.shape == (12, 10, 8) and pred.header["dim"][0] == 3
    np.testing.assert_allclose(pred.affine, LPI_PERMUTED)
    expected = raw > raw[raw > 0].mean()  # channel 0 z-scored over its nonzero voxels
    np.testing.assert_array_equal(np.asanyarray(pred.dataobj), expected)


def test_infer_resampled_anisotropic_input_round_trips_geometry(tmp_path):
    src = _save(tmp_path / "aniso.nii.gz", _head((14, 10, 7), seed=1), LPI_PERMUTED)
    cfg = _config(orientation="RAS", spacing=[1.0, 1.0, 1.0])
    out = run_inference(cfg, _tiny_unet(), list_input_cases(src, cfg.data), tmp_path / "out",
                        _settings(roi_size=(16, 16, 16), save_probabilities=True), progress=False)
    pred, ref = nib.load(str(out[0])), nib.load(str(src))
    assert pred.shape == ref.shape == (14, 10, 7)
    np.testing.assert_allclose(pred.affine, ref.affine)
    prob = nib.load(str(tmp_path / "out" / "probabilities" / "aniso.nii.gz"))
    assert prob.shape == (14, 10, 7, 2)
    np.testing.assert_allclose(prob.affine, ref.affine)
    p = prob.get_fdata()
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(pred.dataobj), p.argmax(-1))


def test_sliding_window_equals_whole_volume_when_roi_covers_it():
    model = _tiny_unet(in_channels=2, out_channels=3)
    x = torch.randn(2, 16, 12, 8)
    spec = LabelSpec("classes", ("a", "b", "c"), ((0,), (1,), (2,)), "softmax")
    for mode in ("gaussian", "constant"):
        got = Predictor(model, spec, _settings(roi_size=(16, 12, 8), mode=mode))(x)
        with torch.no_grad():
            want = torch.softmax(model(x[None]), 1)[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_channels_last_predicts_the_same_with_channels_last_weights():
    x = torch.randn(2, 21, 17, 11)
    spec = LabelSpec("classes", ("a", "b", "c"), ((0,), (1,), (2,)), "softmax")
    settings = _settings(roi_size=(16, 12, 8), overlap=0.5)
    want = Predictor(_tiny_unet(in_channels=2, out_channels=3), spec, settings)(x)
    predictor = Predictor(_tiny_unet(in_channels=2, out_channels=3), spec,
                          dataclasses.replace(settings, channels_last=True))
    weight = predictor.model.stem.basis_weight  # (4, 2 * 4, 3, 3, 3)
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
    torch.testing.assert_close(predictor(x), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_overlapping_windows_equal_plain_forward_for_pointwise_model(mode):
    """With a 1x1x1 KAN conv every window agrees on every voxel, so the blended output must
    equal one forward pass over the whole volume: checks window placement and blending."""
    torch.manual_seed(1)
    model = create_kan_conv("kagn", 3, 2, 3, kernel_size=1, norm="none").eval()
    x = torch.randn(2, 21, 17, 11)
    spec = LabelSpec("regions", ("a", "b", "c"), ((1,), (2,), (3,)), "sigmoid")
    got = Predictor(model, spec, _settings(roi_size=(8, 8, 8), overlap=0.5, mode=mode,
                                           sw_batch_size=3))(x)
    with torch.no_grad():
        want = torch.sigmoid(model(x[None]))[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_flip_tta_averages_all_flip_combinations():
    torch.manual_seed(2)
    model = create_kan_conv("kagn", 3, 1, 2, kernel_size=3, padding=1, norm="none").eval()
    x = torch.randn(1, 6, 5, 4)
    got = Predictor(model, SOFTMAX2, _settings(roi_size=(6, 5, 4), tta_flips=True))(x)
    with torch.no_grad():
        outs = []
        for n in range(4):
            for axes in itertools.combinations((2, 3, 4), n):
                y = torch.softmax(model(x[None].flip(axes)), 1)
                outs.append(y.flip(axes))
    assert len(outs) == 8
    torch.testing.assert_close(got, torch.stack(outs).mean(0)[0], atol=1e-5, rtol=1e-5)
    plain = Predictor(model, SOFTMAX2, _settings(roi_size=(6, 5, 4)))(x)
    assert not torch.allclose(got, plain, atol=1e-4)  # the model is not flip-invariant


def test_brats_regions_decode_to_standard_labels():
    # voxels: nothing, WT only, WT+TC, WT+TC+ET, and a below-threshold WT
    tc = [0.1, 0.2, 0.9, 0.9, 0.1]
    wt = [0.1, 0.8, 0.9, 0.9, 0.5]
    et = [0.1, 0.1, 0.2, 0.7, 0.1]
    probs = torch.tensor([tc, wt, et])
    np.testing.assert_array_equal(probabilities_to_labels(probs, BRATS21), [0, 2, 1, 4, 0])
    brats23 = LabelSpec("regions", ("TC", "WT", "ET"), ((1, 3), (1, 2, 3), (3,)), "sigmoid")
    np.testing.assert_array_equal(probabilities_to_labels(probs, brats23), [0, 2, 1, 3, 0])


def test_softmax_decodes_to_raw_label_values():
    spec = LabelSpec("classes", ("bg", "liver", "tumour"), ((0,), (5,), (9,)), "softmax")
    probs = torch.tensor([[0.7, 0.1, 0.2], [0.2, 0.8, 0.3], [0.1, 0.1, 0.5]])
    np.testing.assert_array_equal(probabilities_to_labels(probs, spec), [0, 5, 9])


def test_corrupt_input_error_names_the_file(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file")
    cfg = _config()
    with pytest.raises(InferenceError, match="broken.nii.gz"):
        run_inference(cfg, ThresholdModel(), list_input_cases(bad, cfg.data), tmp_path / "out",
                      _settings(), progress=False)
    with pytest.raises(InferenceError, match="missing.nii.gz"):
        list_input_cases(tmp_path / "missing.nii.gz", cfg.data)


def test_wrong_channel_count_error_names_the_file(tmp_path):
    src = _save(tmp_path / "one_channel.nii.gz", _head((8, 8, 8)), np.eye(4))
    cfg = _config()
    with pytest.raises(InferenceError, match="one_channel.nii.gz"):
        run_inference(cfg, _tiny_unet(in_channels=4), list_input_cases(src, cfg.data),
                      tmp_path / "out", _settings(), progress=False)


def test_brats_case_folder_input_gives_folder_name(tmp_path):
    case = tmp_path / "BraTS2021_00007"
    case.mkdir()
    for mod in ("t1", "t1ce", "t2", "flair"):
        _save(case / f"BraTS2021_00007_{mod}.nii.gz", _head((8, 8, 8)), np.eye(4))
    cfg = _data_cfg(layout="brats2021", labels=None)
    cases = list_input_cases(case, cfg)
    assert [c["id"] for c in cases] == ["BraTS2021_00007"] and len(cases[0]["image"]) == 4
    assert [c["id"] for c in list_input_cases(tmp_path, cfg)] == ["BraTS2021_00007"]
    assert [c["id"] for c in list_input_cases(tmp_path, cfg, layout="brats2021")] == \
        ["BraTS2021_00007"]


def test_find_checkpoint_prefers_best_then_last(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "last").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    last = run / "checkpoints" / "last" / "model.safetensors"
    last.write_bytes(b"x")
    assert find_checkpoint(run) == (last, run / "config.yaml")
    (run / "checkpoints" / "best").mkdir()
    best = run / "checkpoints" / "best" / "model.safetensors"
    best.write_bytes(b"x")
    assert find_checkpoint(run)[0] == best
    assert find_checkpoint(last)[1].resolve() == (run / "config.yaml").resolve()
    with pytest.raises(InferenceError, match="does not exist"):
        find_checkpoint(tmp_path / "nope")
    with pytest.raises(InferenceError, match="no checkpoint at .*checkpoints/best"):
        find_checkpoint(tmp_path)
