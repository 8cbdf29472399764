"""KAN convolution core: every family against slow references written from the definitions."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from kanseg.layers import BASIS_REGISTRY, KANBottleneckConv, KANConv, OptionError, create_kan_conv
from kanseg.layers.basis import tanh

FAMILIES = ["kagn", "kaln", "kacn", "kajn", "kabn", "fastkan", "kan", "wavkan", "relukan"]
WAVELETS = ["mexican_hat", "morlet", "dog", "meyer"]
# torch-conv-kan's base branch per family (None: the family has no base branch)
BASE_ACT = {"kagn": F.silu, "kaln": None, "kacn": "absent", "kajn": None, "kabn": None,
            "fastkan": F.silu, "kan": F.gelu, "wavkan": F.silu, "relukan": F.silu}
DEGREE_OPTION = {"kagn": "degree", "kaln": "degree", "kacn": "degree", "kajn": "degree",
                 "kabn": "degree", "kan": "spline_order", "relukan": "order"}


# ----------------------------------------------------------------- slow references
def ref_conv(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int):
    """Convolution by explicit loops over output channel, input channel and kernel tap."""
    d = x.dim() - 2
    ks = weight.shape[2:]
    xp = F.pad(x, [p for pad in reversed(padding) for p in (pad, pad)])
    out_size = [(xp.shape[2 + i] - dilation[i] * (ks[i] - 1) - 1) // stride[i] + 1 for i in range(d)]
    out = x.new_zeros((x.shape[0], weight.shape[0], *out_size))
    cin_g, cout_g = x.shape[1] // groups, weight.shape[0] // groups
    for o in range(weight.shape[0]):
        g = o // cout_g
        for ci in range(cin_g):
            channel = xp[:, g * cin_g + ci]
            for tap in itertools.product(*[range(k) for k in ks]):
                window = tuple(
                    slice(tap[i] * dilation[i], tap[i] * dilation[i] + stride[i] * (out_size[i] - 1) + 1,
                          stride[i])
                    for i in range(d)
                )
                out[:, o] += weight[(o, ci) + tap] * channel[(slice(None),) + window]
    return out


def gram_ref(t, degree, w):
    def beta(n, m):
        return w[n] * (m + n) * (m - n) * n**2 / (m**2 / (4.0 * n**2 - 1.0))

    polys = [torch.ones_like(t), t][: degree + 1]
    for i in range(2, degree + 1):
        polys.append(t * polys[i - 1] - beta(i - 1, i) * polys[i - 2])
    return [F.silu(p) for p in polys]


def legendre_explicit(s, n):
    return sum(math.comb(n, k) ** 2 * ((s - 1) / 2) ** (n - k) * ((s + 1) / 2) ** k
               for k in range(n + 1))


def gbinom(a, k):
    return math.gamma(a + 1) / (math.gamma(k + 1) * math.gamma(a - k + 1))


def jacobi_explicit(t, n, a, b):
    return sum(gbinom(n + a, n - s) * gbinom(n + b, s) * ((t - 1) / 2) ** s * ((t + 1) / 2) ** (n - s)
               for s in range(n + 1))


def bspline_scalar(v, i, p, knots):
    """Cox-de Boor recursion on one scalar."""
    if p == 0:
        return 1.0 if knots[i] <= v < knots[i + 1] else 0.0
    left = (v - knots[i]) / (knots[i + p] - knots[i]) * bspline_scalar(v, i, p - 1, knots)
    right = (knots[i + p + 1] - v) / (knots[i + p + 1] - knots[i + 1]) * bspline_scalar(v, i + 1, p - 1, knots)
    return left + right


def wavelet_ref(name, z):
    if name == "mexican_hat":
        return 2 / (math.sqrt(3) * math.pi**0.25) * (z**2 - 1) * torch.exp(-z**2 / 2)
    if name == "morlet":
        return torch.cos(5 * z) * torch.exp(-z**2 / 2)
    if name == "dog":
        return -z * torch.exp(-z**2 / 2)
    v = z.abs()  # meyer, piecewise by definition

    def nu(u):
        return u**4 * (35 - 84 * u + 70 * u**2 - 20 * u**3)

    out = torch.zeros_like(v)
    inner = v <= 0.5
    out[inner] = torch.sin(math.pi * v[inner])
    mid = (v > 0.5) & (v < 1)
    out[mid] = torch.sin(math.pi * v[mid]) * torch.cos(math.pi / 2 * nu(2 * v[mid] - 1))
    return out


def ref_basis(layer: KANConv, x: torch.Tensor, c: int, groups: int):
    """List of basis functions of channel ``c`` of ``x``, from the family's definition."""
    basis, fam = layer.basis, layer.basis.family
    xc = x[:, c]
    cg = c % (x.shape[1] // groups)  # index of the channel inside its group
    if fam == "kagn":
        return gram_ref(torch.tanh(xc), basis.degree, basis.beta_weights)
    if fam == "kaln":
        size = x.shape[1] // groups
        group = x[:, (c // size) * size:(c // size + 1) * size]
        s = 2 * (xc - group.min()) / (group.max() - group.min()) - 1
        return [legendre_explicit(s, n) for n in range(basis.degree + 1)]
    if fam == "kacn":
        return [torch.cos(n * torch.acos(torch.tanh(xc))) for n in range(basis.degree + 1)]
    if fam == "kajn":
        return [jacobi_explicit(torch.tanh(xc), n, basis.alpha, basis.beta) for n in range(basis.degree + 1)]
    if fam == "kabn":
        t, n = torch.sigmoid(xc), basis.degree
        return [math.comb(n, k) * t**k * (1 - t) ** (n - k) for k in range(n + 1)]
    if fam == "fastkan":
        dims = tuple(range(1, xc.dim()))
        z = (xc - xc.mean(dims, keepdim=True)) / torch.sqrt(xc.var(dims, unbiased=False, keepdim=True) + 1e-5)
        grid = torch.linspace(-2, 2, basis.n_basis, dtype=torch.float64)
        h = 4 / (basis.n_basis - 1)
        return [torch.exp(-((z - g) / h) ** 2) for g in grid]
    if fam == "kan":
        k, n = basis.order, basis.n_basis
        size = n - k
        h = 2 / size
        knots = [-1 + (i - k) * h for i in range(size + 2 * k + 1)]
        flat = xc.flatten().tolist()
        return [xc.new_tensor([bspline_scalar(v, i, k, knots) for v in flat]).view_as(xc) for i in range(n)]
    if fam == "wavkan":
        return [wavelet_ref(basis.wavelet, (xc - basis.translation[cg, j]) / basis.scale[cg, j])
                for j in range(basis.n_basis)]
    if fam == "relukan":
        g, k = basis.n_basis - basis.order, basis.order
        r = 4 * g * g / (k + 1) ** 2
        return [(r * torch.relu(xc - basis.phase_low[cg, j]) * torch.relu(basis.phase_high[cg, j] - xc)) ** 2
                for j in range(basis.n_basis)]
    raise AssertionError(fam)


def ref_layer(layer: KANConv, x: torch.Tensor) -> torch.Tensor:
    """Slow layer: base and basis branches by explicit definitions, then the layer's norm/act."""
    geometry = (layer.stride, layer.padding, layer.dilation, layer.groups)
    expanded = torch.stack([torch.stack(ref_basis(layer, x, c, layer.groups), dim=1)
                            for c in range(x.shape[1])], dim=1).flatten(1, 2)  # c * n + j
    y = ref_conv(expanded, layer.basis_weight, *geometry)
    base_act = BASE_ACT[layer.basis.family]
    if base_act == "absent":
        assert layer.base_weight is None
    else:
        y = y + ref_conv(x if base_act is None else base_act(x), layer.base_weight, *geometry)
    return layer.act(layer.norm(y))


def make(family, dims=2, cin=2, cout=3, groups=1, **kw):
    torch.manual_seed(0)
    layer = create_kan_conv(family, dims, cin, cout, kw.pop("kernel_size", 3), groups=groups, **kw).double()
    with torch.no_grad():  # move learnable basis parameters off their symmetric initial values
        for p in layer.basis.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


# ----------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-7), (torch.float64, 5e-16)])
def test_tanh_matches_torch_tanh(dtype, atol):
    x = torch.cat([torch.linspace(-30, 30, 100_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30,
                                                                   1e4, -1e4, math.inf, -math.inf])])
    x = x.to(dtype).requires_grad_(True)
    got = tanh(x)
    expected = torch.tanh(x.detach().double())
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=atol)
    assert got.detach().abs().max() <= 1
    (grad,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(grad.double(), 1 - expected**2, rtol=0, atol=4 * atol)
    assert tanh(torch.tensor([math.nan], dtype=dtype)).isnan().all()
    with torch.no_grad():  # the in-place no-grad path gives the same values
        torch.testing.assert_close(tanh(x), got.detach(), rtol=0, atol=0)


def test_tanh_is_torch_tanh_in_low_precision_and_under_tracing():
    x = torch.randn(64)
    assert torch.equal(tanh(x.bfloat16()), torch.tanh(x.bfloat16()))
    traced = torch.jit.trace(tanh, x)
    assert "aten::tanh" in str(traced.graph)


def test_registry_has_every_family():
    assert sorted(BASIS_REGISTRY) == sorted(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_reference(family):
    layer = make(family, padding=1)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ref_layer(layer, x))


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_wavelets_match_reference(wavelet):
    layer = make("wavkan", wavelet=wavelet, norm="none", n_wavelets=3)
    x = 1.5 * torch.randn(2, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ref_layer(layer, x))


@pytest.mark.parametrize("family, options", [("kajn", {"alpha": 0.5, "beta": -0.3}),
                                             ("kan", {"grid_size": 3, "spline_order": 2}),
                                             ("relukan", {"grid_size": 3, "order": 1}),
                                             ("fastkan", {"grid_size": 4})])
def test_family_options_match_reference(family, options):
    layer = make(family, norm="none", **options)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ref_layer(layer, x))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("family", ["kagn", "kaln", "wavkan", "relukan"])
def test_grouped_strided_dilated_matches_reference(family, dims):
    """groups=2, stride 2, dilation 2: fast path (recompute on and off) equals the loop reference."""
    layer = make(family, dims=dims, cin=4, cout=6, groups=2, kernel_size=2, stride=2, dilation=2,
                 padding=1, norm="none")
    x = torch.randn((2, 4) + (6,) * dims, dtype=torch.float64, requires_grad=True)
    expected = ref_layer(layer, x)
    for recompute in (True, False):
        layer.recompute = recompute
        torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_grouped_equals_per_group_layers(dims):
    """A grouped layer equals one ungrouped layer per group on its slice of channels and weights."""
    layer = make("kagn", dims=dims, cin=6, cout=4, groups=2, kernel_size=3, stride=2, dilation=2,
                 padding=2, norm="none", activation=None)
    x = torch.randn((2, 6) + (7,) * dims, dtype=torch.float64)
    parts = []
    for g in range(2):
        single = make("kagn", dims=dims, cin=3, cout=2, kernel_size=3, stride=2, dilation=2, padding=2,
                      norm="none", activation=None)
        single.load_state_dict({"base_weight": layer.base_weight[2 * g:2 * g + 2],
                                "basis_weight": layer.basis_weight[2 * g:2 * g + 2],
                                "basis.beta_weights": layer.basis.beta_weights})
        parts.append(single(x[:, 3 * g:3 * g + 3]))
    for recompute in (True, False):
        layer.recompute = recompute
        torch.testing.assert_close(layer(x), torch.cat(parts, dim=1))


def _gradcheck_layer(layer, x):
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    params = [p.detach().clone().requires_grad_() for n, p in layer.named_parameters() if p.requires_grad]

    def fn(inp, *ps):
        return functional_call(layer, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradcheck(family, recompute):
    layer = make(family, dims=1, cin=2, cout=2, recompute=recompute, padding=1, groups=2,
                 **({"norm": "instance"} if family in ("wavkan", "fastkan") else {}))
    x = torch.randn(2, 2, 5, dtype=torch.float64, requires_grad=True)
    _gradcheck_layer(layer, x)


@pytest.mark.parametrize("family", ["kagn", "relukan"])
def test_bottleneck_matches_composition(family):
    torch.manual_seed(0)
    layer = create_kan_conv(family, 2, 4, 4, 3, padding=1, bottleneck=True, dim_reduction=2,
                            min_internal=2).double()
    assert isinstance(layer, KANBottleneckConv) and layer.inner_channels == 2
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    core = layer.core
    inner = F.conv2d(x, layer.inner_proj.weight)
    expanded = torch.stack([torch.stack(ref_basis(core, inner, c, 1), 1) for c in range(2)], 1).flatten(1, 2)
    basis_out = F.conv2d(ref_conv(expanded, core.basis_weight, (1, 1), (1, 1), (1, 1), 1),
                         layer.out_proj.weight)
    base = ref_conv(F.silu(x), layer.base_weight, (1, 1), (1, 1), (1, 1), 1)
    expected = F.silu(F.instance_norm(base + basis_out, weight=layer.norm.weight, bias=layer.norm.bias))
    torch.testing.assert_close(layer(x), expected)
    layer(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_degree_zero(family):
    option = DEGREE_OPTION.get(family)
    layer = make(family, norm="none", **({option: 0} if option else {}))
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    y = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref_layer(layer, x))


@pytest.mark.parametrize("family", sorted(DEGREE_OPTION))
def test_negative_degree_raises(family):
    option = DEGREE_OPTION[family]
    with pytest.raises(ValueError, match=option):
        create_kan_conv(family, 2, 2, 2, 3, **{option: -1})


@pytest.mark.parametrize("kwargs, match", [
    (dict(family="nope"), "family must be one of .*kagn"),
    (dict(in_channels=5, groups=2), "in_channels"),
    (dict(out_channels=5, groups=2, in_channels=4), "out_channels"),
    (dict(groups=0), "groups"),
    (dict(spatial_dims=4), "spatial_dims"),
    (dict(kernel_size=(3, 3, 3)), "kernel_size"),
    (dict(norm="weird"), "norm"),
    (dict(activation="weird"), "activation"),
    (dict(dropout=1.5), "dropout"),
    (dict(conv_strategy="fast"), "conv_strategy"),
    (dict(degree=2.5), "degree"),
    (dict(colour="red"), "colour"),
    (dict(family="wavkan", wavelet="haar"), "wavelet"),
    (dict(family="wavkan", n_wavelets=0), "n_wavelets"),
    (dict(family="kajn", alpha=-2.0), "alpha"),
    (dict(family="fastkan", grid_size=1), "grid_size"),
    (dict(family="kan", grid_range=(1, -1)), "grid_range"),
    (dict(family="kagn", bottleneck=True, groups=3, in_channels=4), "groups"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    args = dict(family="kagn", spatial_dims=2, in_channels=4, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        create_kan_conv(**args)


@pytest.mark.parametrize("kwargs, key", [
    (dict(out_channels=5, groups=2), "groups"),
    (dict(dropout=1.5), "dropout"),
    (dict(conv_strategy="fast"), "conv_strategy"),
    (dict(stride=(1, 1, 1)), "stride"),
    (dict(activation="tanhh"), "activation"),
    (dict(base_activation="tanhh"), "base_activation"),
    (dict(base_activation="tanhh", bottleneck=True), "base_activation"),
])
def test_kan_conv_option_errors_carry_the_key(kwargs, key):
    """KANConv's constructor checks name their option (configs report ``model.<key>``)."""
    with pytest.raises(OptionError) as err:
        create_kan_conv(**{**dict(family="kagn", spatial_dims=2, in_channels=4, out_channels=4,
                                  kernel_size=3), **kwargs})
    assert err.value.key == key


def test_bad_input_shape_raises():
    layer = create_kan_conv("kagn", 2, 4, 4, 3)
    with pytest.raises(ValueError, match=r"\(B, 4"):
        layer(torch.randn(1, 3, 5, 5))


@pytest.mark.parametrize("family", FAMILIES)
def test_large_inputs_and_autocast_stay_finite(family):
    torch.manual_seed(0)
    layer = create_kan_conv(family, 2, 4, 4, 3, padding=1)
    x = torch.randn(2, 4, 6, 6) * 1e4
    x[0, 0, 0, :3] = torch.tensor([1e4, -1e4, 0.0])
    dtypes = [torch.bfloat16, torch.float16]
    for cast in [None] + dtypes:
        inp = x.clone().requires_grad_()
        layer.zero_grad()
        with torch.autocast("cpu", dtype=cast or torch.bfloat16, enabled=cast is not None):
            y = layer(inp)
        y.float().square().mean().backward()
        assert torch.isfinite(y).all(), cast
        assert torch.isfinite(inp.grad).all(), cast
        if cast is not torch.float16:  # fp16 weight gradients of 1e4-scale inputs overflow in any conv
            assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None), cast


def test_autocast_runs_conv_in_low_precision():
    layer = create_kan_conv("kagn", 2, 4, 4, 3, padding=1, norm="none", activation=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(1, 4, 6, 6, requires_grad=True))
    assert y.dtype == torch.bfloat16


def saved_bytes(fn) -> tuple[object, int]:
    """``fn()`` and the bytes of the distinct storages autograd saved for backward in it."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(storages.values())


def test_saved_tensors_within_four_times_input():
    """3x3 KAGN degree 3 + instance norm + SiLU with recompute saves <= 4x the input bytes."""
    layer = create_kan_conv("kagn", 2, 16, 16, 3, padding=1, degree=3, norm="instance",
                            activation="silu", recompute=True)
    x = torch.randn(2, 16, 32, 32, requires_grad=True)
    y, total = saved_bytes(lambda: layer(x))
    assert total <= 4 * x.numel() * x.element_size(), total / (x.numel() * x.element_size())
    layer.recompute = False
    y2, kept = saved_bytes(lambda: layer(x))
    assert kept > total  # the expansion is kept without recompute
    torch.testing.assert_close(y, y2)


@pytest.mark.parametrize("family", FAMILIES)
def test_jit_trace(family):
    layer = create_kan_conv(family, 2, 2, 3, 3, padding=1).eval()
    x = torch.randn(2, 2, 6, 6)
    traced = torch.jit.trace(layer, x, check_trace=False)
    other = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(traced(other), layer(other))


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_basis_fullgraph_captures(family):
    """Dynamo captures each basis as one graph (no graph breaks); eager backend keeps it fast."""
    torch._dynamo.reset()  # every family compiles Basis.forward: stay under the recompile limit
    basis = create_kan_conv(family, 2, 2, 3, 3).basis
    compiled = torch.compile(basis, fullgraph=True, backend="eager")
    x = torch.randn(2, 2, 5, 5)
    torch.testing.assert_close(compiled(x), basis(x))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_compile_every_basis_fullgraph_inductor(family):
    torch._dynamo.reset()
    basis = create_kan_conv(family, 2, 2, 3, 3).basis
    compiled = torch.compile(basis, fullgraph=True)
    x = torch.randn(2, 2, 5, 5)
    torch.testing.assert_close(compiled(x), basis(x))


@pytest.mark.parametrize("dims", [1, 3])
def test_dense_block_diagonal_strategy_equals_grouped(dims):
    """The block-diagonal dense execution gives the grouped layer's outputs and gradients."""
    x = torch.randn((2, 6) + (5,) * dims, dtype=torch.float64, requires_grad=True)
    results = []
    for strategy in ("grouped", "dense", "auto", "heuristic"):
        layer = make("kagn", dims=dims, cin=6, cout=9, groups=3, padding=1, stride=2, conv_strategy=strategy)
        y = layer(x)
        grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
        results.append((y, grads))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0])


@pytest.mark.parametrize("dims, groups, expected", [
    (2, 4, "grouped"), (3, 1, "grouped"), (3, 4, "dense"), (3, 8, "dense"), (3, 16, "grouped"),
])
def test_default_strategy_is_deterministic_without_timing(monkeypatch, dims, groups, expected):
    """The default strategy is ``heuristic``: a fixed rule on CPU that never runs the timer."""
    from kanseg.layers import strategy

    def no_timing(*args, **kwargs):
        raise AssertionError("the default strategy must not time convolutions")

    monkeypatch.setattr(strategy, "_best_times", no_timing)
    layer = create_kan_conv("kagn", dims, 2 * groups, 2 * groups, 3, padding=1, groups=groups)
    for module in (layer, create_kan_conv("kagn", dims, 16, 16, 3, groups=groups, bottleneck=True)):
        assert all(m.conv_strategy == "heuristic" for m in module.modules() if isinstance(m, KANConv))
    x = torch.randn((1, 2 * groups) + (4,) * dims)
    layer(x).sum().backward()
    assert layer.conv_weight(x)[1] == (1 if expected == "dense" else groups)
    with torch.no_grad():  # inference: grouped (oneDNN's grouped 3D forward is fast)
        layer(x)
        assert layer.conv_weight(x)[1] == groups


def test_gradcheck_learnable_base_activation_with_recompute():
    """Parameters of the base activation (PReLU) get gradients through the recompute path."""
    layer = make("kagn", dims=1, cin=2, cout=2, padding=1, base_activation="prelu", recompute=True)
    _gradcheck_layer(layer, torch.randn(2, 2, 5, dtype=torch.float64, requires_grad=True))
