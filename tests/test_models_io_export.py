"""Saving/loading our models, TorchScript / ONNX export and the `models` / `export` commands."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kanseg.cli import main
from kanseg.models import create_model, list_models, load_model, save_model
from kanseg.models.export import export_model, max_abs_error, run_onnx


def small_ukanet3d(**kwargs):
    torch.manual_seed(0)
    return create_model("ukanet", spatial_dims=3, in_channels=2, out_channels=3, depth=2,
                        width=4, degree=2, **kwargs)


def test_save_load_round_trip(tmp_path):
    model = create_model("reskanet18", width=4, num_classes=3, family="kaln", degree=1)
    model.eval()
    folder = save_model(model, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    assert config["name"] == "reskanet18" and config["family"] == "kaln"
    loaded = load_model(folder)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert not [p for p in tmp_path.rglob(".*")]  # no temp files left behind


def test_load_errors_name_the_problem(tmp_path):
    folder = save_model(small_ukanet3d(), tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    state.pop("heads.0.bias")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys: \['heads.0.bias'\].*\n.*extra.weight"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({"name": "ukanet", "depht": 2}))
    with pytest.raises(ValueError, match="depht"):
        load_model(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="create_model"):
        save_model(torch.nn.Linear(1, 1), tmp_path / "x")


@pytest.mark.parametrize("fmt,suffix", [("torchscript", "pt"), ("onnx", "onnx")])
def test_export_small_ukanet3d_matches_eager(tmp_path, fmt, suffix):
    model = small_ukanet3d().eval()
    example = torch.randn(1, 2, 16, 16, 16)
    path = export_model(model, example, tmp_path / f"m.{suffix}", fmt)
    check = max_abs_error(fmt, path, model, example)
    assert check["max_abs_error"] < 1e-4, check
    other = torch.randn(2, 2, 16, 16, 16)  # a new input, and a new batch size for ONNX
    with torch.no_grad():
        expected = model(other)
    if fmt == "onnx":
        got = torch.from_numpy(run_onnx(path, other)[0])
    else:
        got = torch.jit.load(str(path))(other[:1])
        expected = expected[:1]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_dynamo_onnx_export(tmp_path):
    model = small_ukanet3d().eval()
    example = torch.randn(1, 2, 16, 16, 16)
    path = export_model(model, example, tmp_path / "m.onnx", "onnx", dynamo=True)
    got = torch.from_numpy(run_onnx(path, example.repeat(2, 1, 1, 1, 1))[0])
    with torch.no_grad():
        torch.testing.assert_close(got[1:], model(example), atol=1e-4, rtol=1e-4)


def test_onnx_reference_evaluator_agrees(tmp_path):
    """onnx's own reference evaluator (used when onnxruntime is absent) runs our graph too."""
    from onnx.reference import ReferenceEvaluator

    model = create_model("ukanet", spatial_dims=2, in_channels=1, out_channels=2, depth=1,
                         width=2, degree=1).eval()
    example = torch.randn(1, 1, 8, 8)
    path = export_model(model, example, tmp_path / "m.onnx", "onnx")
    got = ReferenceEvaluator(str(path)).run(None, {"input": example.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(example), atol=1e-4, rtol=1e-4)


def test_models_command_lists_every_model(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list_models()
    ukanet = next(r for r in rows if r["name"] == "ukanet")
    with torch.device("meta"):
        expected = sum(p.numel() for p in create_model("ukanet").parameters())
    assert ukanet["params"] == expected and ukanet["counted_dims"] == 3
    assert main(["models"]) == 0
    assert "u2kanet_small" in capsys.readouterr().out


def test_export_command(tmp_path, capsys):
    folder = save_model(small_ukanet3d(), tmp_path / "m")
    out = tmp_path / "out" / "m.onnx"
    assert main(["export", str(folder), "--output", str(out), "--input-size", "8", "8", "8"]) == 0
    assert out.is_file() and "max abs error" in capsys.readouterr().out
    assert main(["export", str(folder), "--output", str(tmp_path / "m.pt")]) == 1
    assert "--input-size is required" in capsys.readouterr().err
    assert main(["export", str(folder), "--output", str(tmp_path / "m.pt"),
                 "--input-size", "8", "8"]) == 1
    assert "needs 3 sizes" in capsys.readouterr().err


def test_export_command_from_a_run_folder(tmp_path, capsys):
    """A training run folder: config.yaml + checkpoints/best/model.safetensors."""
    model = create_model("ukanet", spatial_dims=3, in_channels=4, out_channels=3, depth=2,
                         width=4, degree=1)
    (tmp_path / "checkpoints" / "best").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              tmp_path / "checkpoints" / "best" / "model.safetensors")
    (tmp_path / "config.yaml").write_text(
        f"data: {{root: {tmp_path}, layout: brats2021, spatial_dims: 3, "
        "patch_size: [12, 16, 16]}\n"
        "model: {name: ukanet, spatial_dims: 3, in_channels: 4, out_channels: 3, depth: 2, "
        "width: 4, degree: 1}\n"
        "loss: {name: dice_bce}\n")
    out = tmp_path / "m.pt"
    assert main(["export", str(tmp_path), "--output", str(out)]) == 0
    assert "input (1, 4, 12, 16, 16)" in capsys.readouterr().out
    example = torch.randn(1, 4, 12, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(out))(example), model.eval()(example))
