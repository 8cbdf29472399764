"""Deprecated names: torch-conv-kan's U-Nets take ``bottleneck`` as the old name of
``bottleneck_convs``; the ``kanpeft`` CLI shows deprecations as plain lines, as ``kanseg`` does."""
from __future__ import annotations

import inspect

import pytest
import torch

from kanseg.layers import KANBottleneckConv
from kanseg.models import create_model, get_model_spec

#: small layouts of torch-conv-kan's U-Nets and a ``bottleneck_convs`` unlike its default
TCK_UNETS = [
    ("tck_ukanet", dict(in_channels=1, out_channels=2, layers=(1, 1, 1, 1), degree=1), True),
    ("tck_ukagnet", dict(in_channels=1, out_channels=2, depth=2, layers=1, degree=1), False),
]


@pytest.mark.parametrize("name, options, value", TCK_UNETS)
def test_tck_unets_take_bottleneck_as_a_deprecated_name(name, options, value):
    def shapes(model: torch.nn.Module) -> dict:
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    assert "bottleneck" not in inspect.signature(get_model_spec(name).builder).parameters
    with torch.device("meta"):
        new = create_model(name, bottleneck_convs=value, **options)
        with pytest.warns(DeprecationWarning,
                          match="model option bottleneck is deprecated; use bottleneck_convs"):
            old = create_model(name, bottleneck=value, **options)
        default = create_model(name, **options)
    assert shapes(old) == shapes(new) != shapes(default)
    assert any(isinstance(m, KANBottleneckConv) for m in new.modules()) == value
    assert old.model_config == new.model_config


def test_kanpeft_shows_a_deprecation_as_one_plain_line(tmp_path, capsys):
    from kanpeft.cli import main

    config = tmp_path / "finetune.yaml"
    config.write_text("task: segmentation\nsegmentation:\n  loss:\n    lambda_ce: 0.5\n")
    assert main(["finetune", "--config", str(config), "--set", "trainer.max_epochs=many"]) == 1
    err = capsys.readouterr().err
    assert ("kanpeft: warning: config key segmentation.loss.lambda_ce is deprecated; use "
            "segmentation.loss.lambda_voxel") in err.splitlines(), err
    assert "kanpeft finetune: error: " in err and "FutureWarning" not in err
