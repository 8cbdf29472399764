"""Transfer: ``kanseg train --init-from`` / ``trainer.init_from`` loads every matching tensor and
reports the rest; ``trainer.init_strict`` makes differences an error."""
from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file

from kanseg.cli import main
from kanseg.engine.checkpoint import load_weights
from kanseg.models import create_model
from kanseg.models.io import load_matching

from test_train import synth_root, tiny_config  # noqa: F401  (fixture)


def _ukanet(out_channels: int) -> torch.nn.Module:
    torch.manual_seed(out_channels)
    return create_model("ukanet", spatial_dims=2, in_channels=1, out_channels=out_channels,
                        width=4, depth=1)


def test_matching_tensors_load_and_a_new_head_is_reported():
    source, target = _ukanet(3), _ukanet(2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_matching(target, source.state_dict())
    assert report.mismatched and not report.missing and not report.unexpected
    assert all(name.split(":")[0].startswith("head") for name in report.mismatched)
    for name, value in target.state_dict().items():
        expected = before[name] if name.startswith("head") else source.state_dict()[name]
        assert torch.equal(value, expected), name
    with pytest.raises(ValueError, match=r"re-initialised \(shape differs\): head"):
        load_matching(_ukanet(2), source.state_dict(), strict=True)


def test_init_from_a_run_starts_from_its_weights(tmp_path, synth_root):  # noqa: F811
    config = tiny_config(tmp_path, synth_root, max_epochs=1)
    first = tmp_path / "first"
    assert main(["train", "--config", str(config), "--run-dir", str(first)]) == 0
    second = tmp_path / "second"  # a learning rate that cannot move the weights
    assert main(["train", "--config", str(config), "--run-dir", str(second),
                 "--init-from", str(first), "--set", "trainer.lr=1e-12"]) == 0
    source = load_weights(first / "checkpoints/best/model.safetensors")
    result = load_weights(second / "checkpoints/last/model.safetensors")
    for name, value in source.items():
        torch.testing.assert_close(result[name], value, rtol=0, atol=1e-6)
    saved = yaml.safe_load((second / "config.yaml").read_text())
    assert saved["trainer"]["init_from"] == str(first.resolve())
    assert "initialised from" in (second / "train.log").read_text()


def test_strict_init_names_the_differences(tmp_path, synth_root, capsys):  # noqa: F811
    config = tiny_config(tmp_path, synth_root, max_epochs=1)
    first = tmp_path / "first"
    assert main(["train", "--config", str(config), "--run-dir", str(first)]) == 0
    code = main(["train", "--config", str(config), "--run-dir", str(tmp_path / "wider"),
                 "--init-from", str(first), "--set", "model.width=3",
                 "--set", "trainer.init_strict=true"])
    assert code == 1
    err = capsys.readouterr().err
    assert "trainer.init_from" in err and "shape differs" in err


def test_bad_init_sources_are_one_line_errors_and_nothing_is_unpickled(tmp_path, synth_root,
                                                                      capsys):  # noqa: F811
    config = tiny_config(tmp_path, synth_root, max_epochs=1)
    marker = tmp_path / "unpickled"
    pickled = tmp_path / "model.pt"
    torch.save({"weight": _Marker(marker)}, pickled)
    other = tmp_path / "other.safetensors"  # a run of another architecture
    save_file({k: v.contiguous() for k, v in
               create_model("monai_unet", spatial_dims=2, in_channels=1, out_channels=2,
                            width=4, depth=2).state_dict().items()}, str(other))
    cases = {tmp_path / "nowhere": "cannot read weights", pickled: "cannot read weights",
             other: "none of its"}
    for i, (source, expected) in enumerate(cases.items()):
        code = main(["train", "--config", str(config), "--run-dir", str(tmp_path / f"r{i}"),
                     "--init-from", str(source)])
        err = capsys.readouterr().err
        assert code == 1 and "trainer.init_from" in err and expected in err, err
        assert str(source) in err and "Traceback" not in err
    assert not marker.exists()


class _Marker:
    """Unpickling this creates ``marker``: proof that a pickle was executed."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")
