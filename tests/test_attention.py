"""Self-KAN-attention, RoPE and KAN focal modulation (kanseg.layers.attention), torch-conv-kan's
U-Nets (kanseg.models.tck_ukanet), the VGG ``sa`` types, and their conversion from
torch-conv-kan (kanseg.models.convert_attention): slow formulas written here, parity with the
reference classes (eval mode, 1e-4), 1D/2D/3D builds, gradcheck, saved-for-backward."""
from __future__ import annotations

import cmath
import copy
import inspect
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kanseg.layers.attention import KANFocalModulation, KANSelfAttention, RotaryEmbedding
from kanseg.models import convert_torch_conv_kan, create_model, load_torch_conv_kan
from kanseg.models.tck_ukanet import TCKUKAGNet, TCKUKANet
from conftest import import_reference
from test_models_convert import _randomise

NORMS = {1: (nn.InstanceNorm1d, nn.BatchNorm1d), 2: (nn.InstanceNorm2d, nn.BatchNorm2d),
         3: (nn.InstanceNorm3d, nn.BatchNorm3d)}
#: spatial sizes whose token count minus one is a square (torch-conv-kan's axial RoPE needs it)
SIZES = {1: (10,), 2: (2, 5), 3: (2, 1, 5)}


@pytest.fixture(scope="module")
def tck():
    """torch-conv-kan's ``kan_convs`` and ``models`` packages, imported from ../shared."""
    return import_reference("kan_convs", "models.ukanet", "models.vggkan")


def _assert_converts(ref: nn.Module, x: torch.Tensor, kind: type) -> nn.Module:
    torch.manual_seed(1)
    _randomise(ref)
    ref.eval()
    ours = convert_torch_conv_kan(ref)
    assert isinstance(ours, kind) and not ours.training
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)
    return ours


# ----------------------------------------------------------------------------- slow formulas
def _slow_rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """(B, N, C): token j >= 1 at raster position p = j - 1 (width sqrt(N - 1)) has pair i turned
    by x(p) * freqs[0, i] + y(p) * freqs[1, i], as complex numbers."""
    out = t.clone()
    n = t.shape[1]
    width = math.sqrt(n - 1)
    for j in range(1, n):
        px, py = (j - 1) % width, math.floor((j - 1) / width)
        for i in range(t.shape[2] // 2):
            turn = cmath.exp(1j * (px * float(freqs[0, i]) + py * float(freqs[1, i])))
            for b in range(t.shape[0]):
                z = complex(float(t[b, j, 2 * i]), float(t[b, j, 2 * i + 1])) * turn
                out[b, j, 2 * i], out[b, j, 2 * i + 1] = z.real, z.imag
    return out


def _slow_attention(layer: KANSelfAttention, x: torch.Tensor, scaled: bool) -> torch.Tensor:
    """norm(gamma x + outer(sum_j softmax_j(q_i . k_j * s) v_j)) head by head, explicitly."""
    att = x if layer.inner_proj is None else layer.inner_proj(x)
    q, k, v = (p(att).flatten(2).transpose(1, 2) for p in (layer.proj_q, layer.proj_k, layer.proj_v))
    if layer.rope is not None:
        q, k = _slow_rope(q, layer.rope.freqs), _slow_rope(k, layer.rope.freqs)
    width = q.shape[2] // layer.heads
    scale = 1 / math.sqrt(width) if scaled else 1.0
    out = torch.zeros_like(v)
    for h in range(layer.heads):
        cols = slice(h * width, (h + 1) * width)
        energy = q[:, :, cols] @ k[:, :, cols].transpose(1, 2) * scale
        weights = energy.exp() / energy.exp().sum(dim=-1, keepdim=True)
        out[:, :, cols] = weights @ v[:, :, cols]
    out = out.transpose(1, 2).reshape(att.shape)
    if layer.outer_proj is not None:
        out = layer.outer_proj(out)
    return layer.norm_layer(layer.gamma * x + out)


def _slow_focal(layer: KANFocalModulation, x: torch.Tensor) -> torch.Tensor:
    c, levels = x.shape[1], layer.focal_level
    projected = layer.f(x)
    q, ctx, gates = projected[:, :c], projected[:, c:2 * c], projected[:, 2 * c:]
    total = 0.0
    for level in range(levels):
        ctx = layer.focal_layers[level](ctx)
        total = total + ctx * gates[:, level:level + 1]
    pooled = total.flatten(2).mean(-1).view(total.shape[:2] + (1,) * (x.dim() - 2))
    total = (total + pooled * gates[:, levels:levels + 1]) / (levels + 1)
    return layer.proj(layer.norm_layer(q * layer.h(total)))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("heads, scaled, rope, inner", [(1, False, None, None),
                                                        (2, True, "mixed", 8),
                                                        (1, False, "axial", None)])
def test_attention_matches_the_slow_formula(dims, heads, scaled, rope, inner):
    torch.manual_seed(0)
    layer = KANSelfAttention(4 if inner else 8, dims, "kagn", heads=heads, scaled=scaled,
                             rope=rope, inner_channels=inner, norm="instance").double().eval()
    with torch.no_grad():
        layer.gamma.fill_(0.7)
        x = torch.randn((2, layer.channels) + SIZES[dims], dtype=torch.float64)
        torch.testing.assert_close(layer(x), _slow_attention(layer, x, scaled), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_focal_modulation_matches_the_slow_formula(dims):
    torch.manual_seed(0)
    layer = KANFocalModulation(6, dims, "kagn", focal_level=2, norm="instance",
                               post_norm="instance").double().eval()
    x = torch.randn((2, 6) + SIZES[dims], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _slow_focal(layer, x), rtol=1e-6, atol=1e-6)


def test_rope_rotates_pairs_and_keeps_the_first_token():
    rope = RotaryEmbedding(8, mode="axial")
    t = torch.randn(1, 5, 8)
    out = rope(t)
    torch.testing.assert_close(out[:, 0], t[:, 0])
    pairs = lambda a: a.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pairs(out), pairs(t))  # rotations keep each pair's length
    with pytest.raises(ValueError, match="divisible by 4"):
        RotaryEmbedding(6)


# ----------------------------------------------------------------------------- builds, grads
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("family, bottleneck", [("kagn", True), ("relukan", False)])
def test_layers_build_and_train_in_every_dims(dims, family, bottleneck):
    size = (4,) * dims
    for layer in (KANSelfAttention(8, dims, family, bottleneck=bottleneck, heads=2, rope="mixed"),
                  KANFocalModulation(8, dims, family, bottleneck=bottleneck)):
        x = torch.randn((2, 8) + size, requires_grad=True)
        y = layer(x)
        assert y.shape == x.shape
        y.square().mean().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_gradcheck_float64():
    torch.manual_seed(0)
    attention = KANSelfAttention(4, 2, "kagn", heads=2, scaled=True, rope="mixed",
                                 norm="instance").double()
    focal = KANFocalModulation(4, 1, "kagn", norm="instance", post_norm="instance").double()
    with torch.no_grad():
        attention.gamma.fill_(0.5)
    for layer, shape in ((attention, (1, 4, 2, 3)), (focal, (1, 4, 5))):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)


def _saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Distinct storages autograd keeps for backward, plus ``x`` (the checkpoint holds it)."""
    storages = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes()}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(storages.values())


@pytest.mark.parametrize("make", [lambda: KANSelfAttention(16, 2, "kagn", norm="instance"),
                                  lambda: KANFocalModulation(16, 2, "kagn", norm="instance")],
                         ids=["attention", "focal"])
def test_saved_for_backward_within_four_times_the_input(make):
    layer = make()
    x = torch.randn(2, 16, 16, 16, requires_grad=True)
    saved = _saved_bytes(layer, x) / (x.numel() * x.element_size())
    assert saved <= 4, saved
    layer.recompute = False
    assert _saved_bytes(layer, x) / (x.numel() * x.element_size()) > 2 * saved


def test_recompute_gives_the_same_gradients_and_running_statistics():
    torch.manual_seed(0)
    lean = KANSelfAttention(8, 2, "kagn", norm="batch", rope="mixed", dropout=0.2)
    full = copy.deepcopy(lean)
    full.recompute = False
    x = torch.randn(2, 8, 5, 5)
    grads = []
    for layer in (lean, full):
        torch.manual_seed(3)
        layer(x).square().sum().backward()
        grads.append([p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    for a, b in zip(lean.buffers(), full.buffers()):
        torch.testing.assert_close(a, b)  # the recomputation did not update them again


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="heads"):
        KANSelfAttention(6, 2, heads=4)
    with pytest.raises(ValueError, match="focal_level"):
        KANFocalModulation(6, 2, focal_level=0)
    with pytest.raises(ValueError, match=r"\(B, 6, 2 spatial dims\)"):
        KANSelfAttention(6, 2)(torch.randn(1, 6, 4))


# ----------------------------------------------------------------------------- parity
def _attention_cases(tck, dims):
    ac = tck[0].attention_conv
    norm = NORMS[dims][1]
    common = dict(kernel_size=3, padding=1, groups=2, norm_layer=norm, affine=True)
    cases = [ac.__dict__[f"SelfKAGNtention{dims}D"](8, degree=3, **common),
             ac.__dict__[f"SelfKAGNtention{dims}D"](8, inner_projection=4, degree=2,
                                                     **{**common, "norm_layer": NORMS[dims][0]}),
             ac.__dict__[f"BottleNeckSelfKAGNtention{dims}D"](8, degree=3, **common),
             ac.__dict__[f"SelfReLUKANtention{dims}D"](8, **common)]
    for mixed in (True, False):
        cases.append(ac.__dict__[f"RoPEBottleNeckSelfKAGNtention{dims}D"](
            8, degree=3, rope_mixed=mixed, **{**common, "groups": 1}))
    if dims < 3:  # the reference's 3D bottleneck ReLU-KAN attention builds 2D convs
        cases.append(ac.__dict__[f"BottleNeckSelfReLUKANtention{dims}D"](8, **common))
    return cases


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_reference_attention_classes_convert(tck, dims):
    x = torch.randn((2, 8) + SIZES[dims])
    for ref in _attention_cases(tck, dims):
        _assert_converts(ref, x, KANSelfAttention)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_reference_focal_modulations_convert(tck, dims):
    ac = tck[0].attention_conv
    x = torch.randn((2, 6) + (6,) * dims)
    for name in ("KAGNFocalModulation", "BottleNeckKAGNFocalModulation"):
        for full_kan in (True, False):
            ref = ac.__dict__[f"{name}{dims}D"](6, focal_level=2, degree=3, full_kan=full_kan,
                                                norm_layer=NORMS[dims][1], affine=True)
            _assert_converts(ref, x, KANFocalModulation)


def test_reference_generic_classes_convert(tck):
    kan_convs = tck[0]
    ac = kan_convs.attention_conv
    x2 = torch.randn(2, 8, 4, 4)
    # no norm_layer: timm's LayerNorm2d after the attention, instance-normed KALN convs
    _assert_converts(ac.SelfKANtentionND(8, kan_convs.KALNConv2DLayer, kernel_size=3, padding=1,
                                         degree=3), x2, KANSelfAttention)
    _assert_converts(ac.RoPESelfKANtentionND(8, kan_convs.KACNConv1DLayer, kernel_size=3,
                                             padding=1, degree=3, norm_layer=nn.BatchNorm1d),
                     torch.randn(2, 8, 9), KANSelfAttention)
    focal = ac.KANFocalModulationND(
        8, kan_convs.KALNConv2DLayer, {"layer": nn.InstanceNorm2d, "params": {"affine": True}},
        focal_window=3, focal_level=2, use_postln_in_modulation=True, degree=3)
    _assert_converts(focal, x2, KANFocalModulation)


def test_every_reference_attention_class_is_covered(tck):
    """Each class of attention_conv.py is tested above, but the documented exception."""
    ac = tck[0].attention_conv
    defined = {name for name, cls in vars(ac).items()
               if inspect.isclass(cls) and cls.__module__ == ac.__name__}
    tested = {type(ref).__name__ for dims in (1, 2, 3) for ref in _attention_cases(tck, dims)}
    tested |= {f"{name}{d}D" for name in ("KAGNFocalModulation", "BottleNeckKAGNFocalModulation")
               for d in (1, 2, 3)}
    tested |= {"SelfKANtentionND", "RoPESelfKANtentionND", "KANFocalModulationND",
               "BottleNeckSelfReLUKANtention3D"}
    assert defined == tested


def test_reference_3d_bottleneck_relukan_attention_is_refused(tck):
    ref = tck[0].attention_conv.BottleNeckSelfReLUKANtention3D(8, kernel_size=3, padding=1)
    with pytest.raises(ValueError, match="cannot run"):
        convert_torch_conv_kan(ref)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_reference_kagn_v2_converts(tck, dims, groups):
    cls = getattr(tck[0].kagn_conv_v2, f"KAGNConv{dims}DLayerV2")
    ref = cls(6, 6, 3, degree=3, groups=groups, padding=1, norm_layer=NORMS[dims][1], affine=True)
    _assert_converts(ref, torch.randn((2, 6) + (5,) * dims), nn.Module)


# ----------------------------------------------------------------------------- networks
@pytest.mark.parametrize("mixer, bottleneck", [
    ("self-att", False), ("focal", False),
    pytest.param("conv", True, marks=pytest.mark.slow),
    pytest.param("self-att", True, marks=pytest.mark.slow),
    pytest.param("focal", True, marks=pytest.mark.slow)])
def test_reference_ukagnet_converts(tck, mixer, bottleneck):
    ref = tck[1].UKAGNet(input_channels=2, num_classes=3, unet_depth=2, unet_layers=2,
                         use_bottleneck=bottleneck, mixer_type=mixer, degree=2,
                         inner_projection_attention=8 if bottleneck else None)
    _assert_converts(ref, torch.randn(2, 2, 4, 4), TCKUKAGNet)


@pytest.mark.slow
def test_reference_ukagnet_converts_at_depth_three(tck):
    ref = tck[1].UKAGNet(input_channels=2, num_classes=3, unet_depth=3, unet_layers=2,
                         mixer_type="focal", degree=2)
    _assert_converts(ref, torch.randn(2, 2, 8, 8), TCKUKAGNet)


@pytest.mark.parametrize("factory", ["ukagnet_18", pytest.param("ukagnetnb_18", marks=pytest.mark.slow),
                                     pytest.param("ukalnet_18", marks=pytest.mark.slow)])
def test_reference_ukanet_converts(tck, factory):
    ref = getattr(tck[1], factory)(2, 3, degree=2)
    _assert_converts(ref, torch.randn(1, 2, 16, 16), TCKUKANet)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_tck_unets_build_in_every_dims(dims):
    x = torch.randn((1, 2) + (3,) * dims)  # padded to the levels' multiple, cropped back
    for mixer in ("self-att", "focal"):
        model = create_model("tck_ukagnet", spatial_dims=dims, in_channels=2, out_channels=3,
                             depth=2, layers=1, mixer=mixer, degree=1, norm="instance")
        assert model(x).shape == (1, 3) + x.shape[2:]
    size = (9,) if dims == 1 else (8,) * dims
    model = create_model("tck_ukanet", spatial_dims=dims, in_channels=2, out_channels=3,
                         layers=(1, 1, 1, 1), degree=1, norm="batch")
    assert model(torch.randn((2, 2) + size)).shape == (2, 3) + size
    with pytest.raises(ValueError, match="mixer"):
        create_model("tck_ukagnet", mixer="transformer")


# ----------------------------------------------------------------------------- VGG sa
@pytest.mark.parametrize("vgg_type, bottleneck", [
    ("VGG11sa", False), pytest.param("VGG11v4sa", True, marks=pytest.mark.slow)])
def test_vgg_attention_checkpoint_loads_with_equal_outputs(tck, tmp_path, vgg_type, bottleneck):
    cls = tck[2].VGGKAGN_BN if bottleneck else tck[2].VGGKAGN
    config = dict(input_channels=2, num_classes=5, vgg_type=vgg_type, degree=2, affine=True,
                  expected_feature_shape=[1, 1], last_attention=True, sa_inner_projection=2,
                  groups=1, dropout=0.0, l1_decay=0.0, dropout_linear=0.25, head_type="Linear",
                  width_scale=1)
    ref = cls(**config)
    _randomise(ref)
    ref.eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
              tmp_path / "model.safetensors")
    ours = load_torch_conv_kan(tmp_path / "model.safetensors", config=config)
    assert sum(isinstance(m, KANSelfAttention) for m in ours.features) == 3
    x = torch.randn(1, 2, 64 if "v4" in vgg_type else 32, 64 if "v4" in vgg_type else 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)
