"""kanseg.layers.instance_norm: the group-norm forward equals instance norm written out, and
torch's InstanceNormNd (values, gradients, state dict, running-stats and unbatched fallbacks)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kanseg.layers import create_norm
from kanseg.layers.instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d

OURS = {1: InstanceNorm1d, 2: InstanceNorm2d, 3: InstanceNorm3d}
TORCH = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def instance_norm_by_hand(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """Per sample and channel: (x - mean) / sqrt(biased variance + eps), then weight, bias."""
    flat = x.flatten(2)
    mean = flat.sum(-1, keepdim=True) / flat.shape[-1]
    var = ((flat - mean) ** 2).sum(-1, keepdim=True) / flat.shape[-1]
    y = ((flat - mean) / torch.sqrt(var + eps)).view_as(x)
    if weight is not None:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = y * weight.view(shape) + bias.view(shape)
    return y


def pair(dims: int, affine: bool, **options) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ours = OURS[dims](6, affine=affine, **options).double()
    if affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-0.5, 0.5)
    reference = TORCH[dims](6, affine=affine, **options).double()
    reference.load_state_dict(ours.state_dict())
    return ours, reference


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_equals_the_formula_and_torch_instance_norm(dims, affine):
    ours, reference = pair(dims, affine)
    x = (torch.randn((3, 6) + (5,) * dims, dtype=torch.float64) * 3 + 1).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, expected = ours(x), reference(x2)
    torch.testing.assert_close(y, instance_norm_by_hand(x, ours.weight, ours.bias, ours.eps))
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(y)
    y.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x2.grad)
    for mine, theirs in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad)
    ours.eval()
    reference.eval()
    torch.testing.assert_close(ours(x), reference(x))


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck(affine):
    ours, _ = pair(2, affine)
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64, requires_grad=True)
    inputs = (x, ours.weight, ours.bias) if affine else (x,)

    def run(x, *params):
        if affine:
            return torch.func.functional_call(ours, dict(zip(("weight", "bias"), params)), (x,))
        return ours(x)

    assert torch.autograd.gradcheck(run, inputs)


def test_running_stats_and_unbatched_input_run_torch_instance_norm():
    ours, reference = pair(2, True, track_running_stats=True)
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(ours(x), reference(x))
    torch.testing.assert_close(ours.running_mean, reference.running_mean)
    ours.eval()
    reference.eval()
    torch.testing.assert_close(ours(x), reference(x))  # running statistics
    plain, reference = pair(2, True)
    torch.testing.assert_close(plain(x[0]), reference(x[0]))


def test_create_norm_builds_it_as_a_torch_instance_norm():
    norm = create_norm("instance", 3, 8)
    assert isinstance(norm, nn.InstanceNorm3d) and type(norm) is InstanceNorm3d
    assert set(norm.state_dict()) == set(nn.InstanceNorm3d(8, affine=True).state_dict())
    assert repr(norm) == repr(nn.InstanceNorm3d(8, affine=True))


def test_other_channel_count_without_affine_runs_torch_instance_norm():
    ours, reference = pair(2, False)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)  # 4 channels, num_features 6
    torch.testing.assert_close(ours(x), reference(x))
