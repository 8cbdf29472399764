"""Loading and writing torch-conv-kan VGG-KAGN checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kanseg.models import create_model
from kanseg.models.torch_conv_kan import (
    CheckpointError, channel_major_to_degree_major, degree_major_to_channel_major,
    load_torch_conv_kan, save_torch_conv_kan,
)
from kanseg.models.vgg import vgg_layout

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures" / "torch-conv-kan"


# --------------------------------------------------------------------------- a slow reference
def gram_basis_degree_major(x: torch.Tensor, beta: torch.Tensor, degree: int) -> torch.Tensor:
    """SiLU of Gram polynomials of tanh(x), stacked degree-major along channels (their layout)."""
    t = torch.tanh(x)
    polys = [torch.ones_like(t), t]
    for i in range(2, degree + 1):
        n, m = i - 1, i
        coeff = (m + n) * (m - n) * n**2 / (m**2 / (4.0 * n**2 - 1.0)) * beta[n]
        polys.append(t * polys[-1] - coeff * polys[-2])
    return F.silu(torch.cat(polys[: degree + 1], dim=1))


def reference_layer(sd, prefix, x, groups, degree, batch_norm, bottleneck):
    """One torch-conv-kan KAGN layer, group by group, from its own state-dict layout."""
    outputs = []
    for g, xg in enumerate(x.chunk(groups, dim=1)):
        base = F.conv2d(F.silu(xg), sd[f"{prefix}.base_conv.{g}.weight"], padding=1)
        h = F.conv2d(xg, sd[f"{prefix}.inner_proj.{g}.weight"]) if bottleneck else xg
        h = gram_basis_degree_major(h, sd[f"{prefix}.beta_weights"], degree)
        y = F.conv2d(h, sd[f"{prefix}.poly_weights"][g], padding=1)
        if bottleneck:
            y = F.conv2d(y, sd[f"{prefix}.out_proj.{g}.weight"])
        y = y + base
        norm = {k: sd[f"{prefix}.layer_norm.{g}.{k}"] for k in ("weight", "bias")}
        if batch_norm:
            y = F.batch_norm(y, sd[f"{prefix}.layer_norm.{g}.running_mean"],
                             sd[f"{prefix}.layer_norm.{g}.running_var"], training=False, **norm)
        else:
            y = F.instance_norm(y, **norm)
        outputs.append(F.silu(y))
    return torch.cat(outputs, dim=1)


def reference_vgg(sd, x, vgg_type, groups, degree, batch_norm, bottleneck):
    for i, item in enumerate(vgg_layout(vgg_type)):
        if item == "M":
            x = F.max_pool2d(x, 2)
        else:
            x = reference_layer(sd, f"features.{i}", x, 1 if i == 0 else groups, degree,
                                batch_norm, bottleneck)
    features = x
    logits = F.linear(x.mean(dim=(2, 3)), sd["classifier.1.weight"], sd["classifier.1.bias"])
    return features, logits


def their_state_dict(vgg_type, in_channels, num_classes, groups, degree, batch_norm,
                     bottleneck, seed=0):
    """A random state dict in torch-conv-kan's key layout (VGGKAGN / VGGKAGN_BN)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    sd, channels = {}, in_channels
    for i, item in enumerate(vgg_layout(vgg_type)):
        if item == "M":
            continue
        g = 1 if i == 0 else groups
        in_g, out_g, p = channels // g, item // g, f"features.{i}"
        inner = in_g
        if bottleneck:
            inner = int(max(in_g / 8, out_g / 8))
            inner = min(16, in_g, out_g) if inner < 16 else inner
        for j in range(g):
            sd[f"{p}.base_conv.{j}.weight"] = rand(out_g, in_g, 3, 3, scale=(in_g * 9) ** -0.5)
            sd[f"{p}.layer_norm.{j}.weight"] = 1 + rand(out_g, scale=0.1)
            sd[f"{p}.layer_norm.{j}.bias"] = rand(out_g, scale=0.1)
            if batch_norm:
                sd[f"{p}.layer_norm.{j}.running_mean"] = rand(out_g, scale=0.2)
                sd[f"{p}.layer_norm.{j}.running_var"] = 0.5 + torch.rand(out_g, generator=gen)
                sd[f"{p}.layer_norm.{j}.num_batches_tracked"] = torch.tensor(7)
            if bottleneck:
                sd[f"{p}.inner_proj.{j}.weight"] = rand(inner, in_g, 1, 1, scale=in_g**-0.5)
                sd[f"{p}.out_proj.{j}.weight"] = rand(out_g, inner, 1, 1, scale=inner**-0.5)
        fan = inner * (degree + 1) * 9
        sd[f"{p}.poly_weights"] = rand(g, out_g if not bottleneck else inner,
                                       inner * (degree + 1), 3, 3, scale=fan**-0.5)
        sd[f"{p}.beta_weights"] = rand(degree + 1, scale=0.3)
        channels = item
    sd["classifier.1.weight"] = rand(num_classes, channels, scale=channels**-0.5)
    sd["classifier.1.bias"] = rand(num_classes, scale=0.1)
    return sd


def their_config(vgg_type, in_channels, num_classes, groups, degree):
    return {"input_channels": in_channels, "num_classes": num_classes, "groups": groups,
            "degree": degree, "dropout": 0.0, "dropout_linear": 0.25, "vgg_type": vgg_type,
            "head_type": "Linear", "expected_feature_shape": [1, 1], "width_scale": 1,
            "affine": True, "l1_decay": 0, "last_attention": False, "sa_inner_projection": None}


CASES = [  # vgg_type, groups, degree, batch_norm, bottleneck
    ("VGG11", 2, 2, False, False),
    ("VGG11", 2, 3, True, True),
    ("VGG13v2", 1, 1, True, False),
]


def write_folder(folder: Path, sd, config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# --------------------------------------------------------------------------- tests
def test_layout_permutation_is_the_documented_index_map():
    out, in_g, n = 3, 4, 5
    w = torch.randn(out, n * in_g, 3)
    ours = degree_major_to_channel_major(w, n)
    for c in range(in_g):
        for d in range(n):
            torch.testing.assert_close(ours[:, c * n + d], w[:, d * in_g + c])
    torch.testing.assert_close(channel_major_to_degree_major(ours, n), w)


@pytest.mark.parametrize("vgg_type,groups,degree,batch_norm,bottleneck", CASES)
def test_hand_built_checkpoint_matches_reference(tmp_path, vgg_type, groups, degree, batch_norm,
                                                 bottleneck):
    torch.manual_seed(0)
    size = 64 if vgg_type.endswith("v2") else 32
    sd = their_state_dict(vgg_type, 3, 5, groups, degree, batch_norm, bottleneck)
    folder = write_folder(tmp_path / "ckpt", sd, their_config(vgg_type, 3, 5, groups, degree))
    model = load_torch_conv_kan(folder)
    assert not model.training
    norm_type = torch.nn.BatchNorm2d if batch_norm else torch.nn.InstanceNorm2d
    assert isinstance(model.features[0].norm, norm_type)
    assert hasattr(model.features[0], "inner_proj") == bottleneck
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features, logits = model.forward_features(x)[-1], model(x)
    ref_features, ref_logits = reference_vgg(sd, x, vgg_type, groups, degree, batch_norm,
                                             bottleneck)
    torch.testing.assert_close(features, ref_features, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("vgg_type,groups,degree,batch_norm,bottleneck", CASES[:2])
def test_save_round_trip_writes_their_exact_layout(tmp_path, vgg_type, groups, degree,
                                                   batch_norm, bottleneck):
    sd = their_state_dict(vgg_type, 3, 5, groups, degree, batch_norm, bottleneck, seed=1)
    config = their_config(vgg_type, 3, 5, groups, degree)
    model = load_torch_conv_kan(write_folder(tmp_path / "in", sd, config))
    out = save_torch_conv_kan(model, tmp_path / "out")
    written = load_file(out / "model.safetensors")
    assert set(written) == set(sd)
    for key, value in sd.items():
        assert torch.equal(written[key], value), key
    assert json.loads((out / "config.json").read_text()) == config
    again = load_torch_conv_kan(out)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)


def test_save_from_a_fresh_model_and_reload(tmp_path):
    model = create_model("vgg_kan", vgg_type="VGG11v4", num_classes=7, bottleneck_convs=True,
                         norm="batch", degree=5, width_scale=1, expected_feature_shape=(1, 1))
    folder = save_torch_conv_kan(model.eval(), tmp_path / "v4")
    written = load_file(folder / "model.safetensors")
    assert "features.0.poly_weights" in written and "features.0.inner_proj.0.weight" in written
    assert written["features.0.poly_weights"].shape == (1, 3, 18, 3, 3)
    loaded = load_torch_conv_kan(folder)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="no torch-conv-kan equivalent"):
        save_torch_conv_kan(create_model("vgg_kan", activation="gelu"), tmp_path / "x")
    with pytest.raises(ValueError, match="kagn"):
        save_torch_conv_kan(create_model("vgg_kan", family="kaln"), tmp_path / "y")


def test_bare_state_dict_files(tmp_path):
    sd = their_state_dict("VGG11", 1, 2, 1, 2, False, False)
    config = their_config("VGG11", 1, 2, 1, 2)
    torch.save(sd, tmp_path / "weights.pt")
    model = load_torch_conv_kan(tmp_path / "weights.pt", config=config)
    save_file(sd, tmp_path / "weights.safetensors")
    other = load_torch_conv_kan(tmp_path / "weights.safetensors", config=config)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), other(x))
    with pytest.raises(CheckpointError, match="no config.json"):
        load_torch_conv_kan(tmp_path / "weights.pt")
    # a pickled non-tensor object is refused by weights_only loading
    torch.save({"w": torch.zeros(1), "obj": object()}, tmp_path / "evil.pt")
    with pytest.raises(Exception):
        load_torch_conv_kan(tmp_path / "evil.pt", config=config)


def test_missing_unknown_and_misshaped_keys_are_listed(tmp_path):
    config = their_config("VGG11", 3, 5, 1, 2)
    sd = their_state_dict("VGG11", 3, 5, 1, 2, False, False)
    broken = dict(sd)
    del broken["features.4.beta_weights"]
    del broken["classifier.1.bias"]
    broken["features.4.extra_thing"] = torch.zeros(1)
    broken["head.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_torch_conv_kan(write_folder(tmp_path / "a", broken, config))
    message = str(err.value)
    for key in ("features.4.beta_weights", "classifier.1.bias", "features.4.extra_thing",
                "head.weight"):
        assert key in message
    wrong_degree = their_state_dict("VGG11", 3, 5, 1, 3, False, False)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_torch_conv_kan(write_folder(tmp_path / "b", wrong_degree, config))
    with pytest.raises(CheckpointError, match="spline_order"):
        load_torch_conv_kan(write_folder(tmp_path / "c", sd, {**config, "spline_order": 3}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "config.json").write_text(json.dumps(config))
        load_torch_conv_kan(tmp_path / "d")


@pytest.mark.parametrize("name", ["vgg_kagn11_small", "vgg_kagn_bn11_small"])
def test_shared_fixtures_are_reproduced(name):
    folder = FIXTURES / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (../shared not available)")
    model = load_torch_conv_kan(folder)
    expected = load_file(folder / "expected.safetensors")
    with torch.no_grad():
        features = model.forward_features(expected["input"])[-1]
        logits = model(expected["input"])
    assert (features - expected["features"]).abs().max() <= 1e-4
    assert (logits - expected["logits"]).abs().max() <= 1e-4


def test_hub_repo_id_resolves_through_the_huggingface_cache(tmp_path):
    """A repo id goes through huggingface_hub.snapshot_download (here offline, from a cache
    laid out as the hub client writes it)."""
    import os
    import subprocess
    import sys

    sd = their_state_dict("VGG11", 3, 4, 1, 2, False, False)
    snapshot = tmp_path / "hub" / "models--someone--vgg_kagn_tiny" / "snapshots" / ("a" * 40)
    write_folder(snapshot, sd, their_config("VGG11", 3, 4, 1, 2))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    code = ("import json, torch; from kanseg.models import load_torch_conv_kan as load\n"
            "try:\n    load('someone/absent')\nexcept ValueError as err:\n    print(err)\n"
            "m = load('someone/vgg_kagn_tiny'); torch.manual_seed(0)\n"
            "print(json.dumps(m(torch.randn(1, 3, 32, 32)).tolist()))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    lines = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, encoding="utf-8", errors="replace", check=True).stdout.strip().splitlines()
    assert "downloading it from the HuggingFace hub failed" in lines[0]
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    _, expected = reference_vgg(sd, x, "VGG11", 1, 2, False, False)
    torch.testing.assert_close(torch.tensor(json.loads(lines[-1])), expected, atol=1e-4,
                               rtol=1e-4)
