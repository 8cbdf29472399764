"""``compile_expansion=True``: the expansion and its backward through inductor-compiled kernels
equal the eager layer (values and gradients of x, weights and basis parameters), save no more
for backward, fall back to eager with a warning where ``torch.compile`` cannot run, and reach
the networks through their options."""
from __future__ import annotations

import logging

import pytest
import torch
from torch._inductor import config as inductor_config

from kanseg.layers import OptionError, create_kan_conv
from kanseg.layers import compiled
from kanseg.models import create_model

from test_layers import saved_bytes
from test_layers_vjp import GEOMETRY, _grads


def _pair(family: str, dims: int, **options):
    """The same layer eager and with ``compile_expansion=True`` (shared weights)."""
    g = GEOMETRY
    eager = create_kan_conv(family, dims, g["cin"], g["cout"], g["kernel_size"],
                            stride=g["stride"], padding=g["padding"], dilation=g["dilation"],
                            groups=g["groups"], **options)
    fused = create_kan_conv(family, dims, g["cin"], g["cout"], g["kernel_size"],
                            stride=g["stride"], padding=g["padding"], dilation=g["dilation"],
                            groups=g["groups"], compile_expansion=True, **options)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


@pytest.mark.parametrize("family, dims", [
    ("kagn", 2),
    pytest.param("kaln", 3, marks=pytest.mark.slow),  # each compiles for 10-40 s
    pytest.param("fastkan", 1, marks=pytest.mark.slow),
])
def test_compiled_expansion_equals_eager(family, dims):
    """Forward, no-grad forward and every gradient (x, both weights, basis parameters); KAGN's
    beta and FastKAN (no analytic backward) included."""
    torch.manual_seed(0)
    eager, fused = _pair(family, dims)
    x = torch.randn((2, GEOMETRY["cin"]) + (9,) * dims)
    for got, want in zip(_grads(fused, x), _grads(eager, x)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), rtol=1e-4, atol=1e-5)


def test_compiled_expansion_gradcheck():
    torch.manual_seed(0)
    layer = create_kan_conv("kagn", 2, 2, 2, 3, padding=1, groups=2, norm=None,
                            compile_expansion=True).double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_frozen_basis_parameters_get_no_gradient():
    """As kanpeft freezes them: no gradient for frozen parameters, the others still match."""
    torch.manual_seed(0)
    eager, fused = _pair("kagn", 2)
    for layer in (eager, fused):
        layer.basis.requires_grad_(False)
    x = torch.randn(2, GEOMETRY["cin"], 9, 9)
    for got, want in zip(_grads(fused, x), _grads(eager, x)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert fused.basis.beta_weights.grad is None


@pytest.mark.parametrize("groups", [1, 4])
def test_saved_for_backward_same_as_eager(groups):
    """The compiled backward recomputes from x: autograd keeps what the eager layer keeps."""
    saved = []
    for compile_expansion in (False, True):
        layer = create_kan_conv("kagn", 2, 16, 16, 3, padding=1, groups=groups,
                                compile_expansion=compile_expansion)
        x = torch.randn(2, 16, 24, 24, requires_grad=True)
        saved.append(saved_bytes(lambda: layer(x))[1])
    assert saved[1] == saved[0] <= 4 * x.numel() * x.element_size()


def test_kernels_keep_their_versions_past_dynamos_recompile_limit():
    """Every family, option set and shape compiles another version of the same kernels; past
    dynamo's recompile limit (8 by default, 1 here, made to fail instead of falling back to
    eager) the kernels still compile, up to ``compiled.KERNEL_VERSIONS`` versions."""
    if not compiled.compile_available(torch.device("cpu"), "this test"):
        pytest.skip("torch.compile cannot run here: the layers run eagerly")
    torch.manual_seed(0)
    x = torch.randn(2, 2, 7)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for degree in (1, 2):
            layer = create_kan_conv("kagn", 1, 2, 2, 3, padding=1, degree=degree,
                                    compile_expansion=True)
            with torch.no_grad():
                layer(x)


def test_without_a_compiler_the_layer_warns_once_and_runs_eagerly(monkeypatch, caplog):
    """A C++ compiler that does not exist makes the probe fail: one warning, eager results."""
    torch._dynamo.reset()
    monkeypatch.setattr(compiled, "_AVAILABLE", {})
    torch.manual_seed(0)
    eager, fused = _pair("kagn", 2)
    x = torch.randn(2, GEOMETRY["cin"], 9, 9)
    no_compiler = {"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}
    with caplog.at_level(logging.WARNING, logger="kanseg"), inductor_config.patch(no_compiler):
        got = [_grads(fused, x), _grads(fused, x)]
    torch._dynamo.reset()
    warnings = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warnings) == 1 and "the KAN layers' expansion" in warnings[0], warnings
    for run in got:
        for a, b in zip(run, _grads(eager, x)):
            torch.testing.assert_close(a, b)


def _ukanet(compile_expansion: bool):
    torch.manual_seed(0)
    return create_model("ukanet", spatial_dims=2, in_channels=1, out_channels=2, width=4,
                        depth=2, compile_expansion=compile_expansion)


def test_option_is_validated_and_reaches_every_kan_conv_of_a_network():
    with pytest.raises(OptionError, match="compile_expansion"):
        create_kan_conv("kagn", 2, 4, 4, 3, compile_expansion="yes")
    flags = [m.compile_expansion for m in _ukanet(True).modules()
             if hasattr(m, "compile_expansion")]
    assert flags and all(flags)


@pytest.mark.slow
def test_ukanet_with_compiled_expansion_equals_eager():
    x = torch.randn(2, 1, 16, 16)
    eager, fused = _ukanet(False), _ukanet(True)
    for got, want in zip(_grads(fused, x), _grads(eager, x)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
