"""Cost reporting: FLOP counts against analytic values, ``kanseg models --cost``."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from kanseg.cli import main
from kanseg.layers import create_kan_conv
from kanseg.models.cost import forward_gflops, model_cost

TINY_UKANET = ["--model-arg", "width=2", "--model-arg", "depth=1", "--model-arg", "degree=1"]


def test_conv_flops_are_analytic():
    cin, cout, k, h, w = 2, 3, 3, 16, 16
    model = nn.Conv2d(cin, cout, k, padding=1, bias=False)
    expected = 2 * cin * cout * k * k * h * w
    assert forward_gflops(model, torch.randn(1, cin, h, w)) * 1e9 == pytest.approx(expected)


def test_kan_conv_counts_its_expanded_convolution():
    conv = create_kan_conv("kagn", spatial_dims=2, in_channels=2, out_channels=3,
                           kernel_size=3, padding=1, degree=3)
    floor = 2 * 2 * 3 * 9 * 16 * 16 / 1e9  # a plain conv of the same shape
    gflops = forward_gflops(conv, torch.randn(1, 2, 16, 16))
    assert gflops > floor
    # base slot + degree Gram polynomials per input channel, P_0 = 1 as one all-ones image
    assert conv.n_convolved == conv.n_expanded - 1 == 4
    assert gflops == pytest.approx(floor * conv.n_convolved + 2 * 3 * 9 * 16 * 16 / 1e9)
    conv.train()  # the recomputing autograd Function is counted as well
    counter = torch.utils.flop_counter.FlopCounterMode(display=False)
    with counter:
        conv(torch.randn(1, 2, 16, 16))
    assert counter.get_total_flops() / 1e9 == pytest.approx(gflops)


def test_model_cost_3d_deep_supervision():
    cost = model_cost("ukanet", [8, 8, 8], 1, 2, batch=1, steps=1, width=2, depth=2,
                      degree=1, deep_supervision=True, supervision_levels=2)
    assert cost["params"] > 0 and cost["gflops"] > 0 and cost["patches_per_s"] > 0
    assert cost["patch"] == [8, 8, 8]


def test_model_cost_channels_last_measures_the_model_with_channels_last_weights(capsys):
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.Conv3d(4, 2, 3, padding=1))
    cost = model_cost(model, [8, 8, 8], 2, 2, batch=1, steps=1, channels_last=True)
    assert cost["patches_per_s"] > 0
    assert all(conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
               and not conv.weight.is_contiguous() for conv in model)
    assert main(["models", "--cost", "--patch", "16,16", "--models", "ukanet", "--steps", "1",
                 "--batch", "1", "--channels-last", *TINY_UKANET]) == 0
    assert "channels-last" in capsys.readouterr().out


def test_cli_cost_json():
    out = subprocess.run(
        [sys.executable, "-m", "kanseg.cli", "models", "--cost", "--patch", "16,16", "--models",
         "ukanet", "--steps", "1", "--batch", "1", "--json", *TINY_UKANET],
        capture_output=True, text=True, encoding="utf-8", timeout=300, check=True)
    rows = json.loads(out.stdout)
    assert [r["name"] for r in rows] == ["ukanet"]
    assert rows[0]["kwargs"] == {"width": 2, "depth": 1, "degree": 1}
    assert rows[0]["gflops"] > 0 and rows[0]["patches_per_s"] > 0
    assert "measuring ukanet" in out.stderr


def test_cli_cost_table_relative_to_monai_unet(capsys):
    assert main(["models", "--cost", "--patch", "16,16", "--models", "ukanet,monai_unet",
                 "--steps", "1", "--batch", "1", "--model-arg", "width=4",
                 "--model-arg", "ukanet.depth=1", "--model-arg", "ukanet.degree=1"]) == 0
    out = capsys.readouterr().out
    assert "vs monai_unet" in out and "1.00x" in out


@pytest.mark.parametrize("patch", ["16,x", "16,16,16,16", "0,16", ""])
def test_cli_bad_patch(patch, capsys):
    with pytest.raises(SystemExit):
        main(["models", "--cost", "--patch", patch])
    assert "--patch" in capsys.readouterr().err


@pytest.mark.parametrize("name, patch, message", [("reskanet18", "16,16", "segmentation"),
                                                  ("segresnet", "16", "supports")])
def test_cli_refuses_unsuitable_model(name, patch, message, capsys):
    assert main(["models", "--cost", "--patch", patch, "--models", name]) == 1
    assert message in capsys.readouterr().err


def test_cli_unused_model_arg(capsys):
    assert main(["models", "--cost", "--patch", "16,16", "--models", "monai_unet",
                 "--model-arg", "degree=2"]) == 1
    assert "taken by none" in capsys.readouterr().err
