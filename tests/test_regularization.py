"""Regularisers (kanseg.layers.regularization) and auxiliary losses against independent
formulas: weight and activation penalties, noise injection, dropout placements, and the
trainer adding and logging the auxiliary terms."""
from __future__ import annotations

import copy
import csv
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kanseg.config import load_config
from kanseg.engine.config import TrainerConfig
from kanseg.engine.trainer import Trainer
from kanseg.layers import KANConv, create_kan_conv
from kanseg.layers.auxiliary import collect_auxiliary_losses
from kanseg.layers.regularization import (ActivationPenalty, NoiseInjection, WeightPenalty,
                                          attach_penalties)
from kanseg.models import accepted_arguments, create_model
from kanseg.schema import ConfigError

from conftest import TCK

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo3d.yaml"
L1, L2, L1_ACT, L2_ACT = 0.01, 0.1, 0.003, 0.02


def _layer(**options) -> nn.Module:
    return create_kan_conv("kagn", 2, 3, 4, 3, padding=1, degree=2, **options)


def _weight_formula(layer: nn.Module, l1: float, l2: float) -> torch.Tensor:
    """l1 * sum|w| + l2 / 2 * sum w^2 over every trainable parameter of the layer."""
    flat = torch.cat([p.reshape(-1) for p in layer.parameters() if p.requires_grad])
    return l1 * flat.abs().sum() + 0.5 * l2 * (flat * flat).sum()


def _activation_formula(y: torch.Tensor, l1: float, l2: float) -> torch.Tensor:
    """torch-conv-kan's trainers: norms over the batch, mean over channels and positions."""
    return l1 * y.abs().sum(0).mean() + l2 * (y * y).sum(0).sqrt().mean()


def test_weight_penalty_equals_formula_and_has_the_reference_gradient():
    torch.manual_seed(0)
    layer = _layer(l1_penalty=L1, l2_penalty=L2).train()
    layer(torch.randn(2, 3, 5, 5))
    term = layer.weight_penalty.auxiliary_loss()
    torch.testing.assert_close(term, _weight_formula(layer, L1, L2))
    term.backward()  # torch-conv-kan's L1 / L2 hooks write l1 * sign(w) and l2 * w
    for p in layer.parameters():
        torch.testing.assert_close(p.grad, L1 * torch.sign(p.detach()) + L2 * p.detach())


def test_activation_penalty_equals_formula():
    torch.manual_seed(1)
    layer = _layer(l1_activation_penalty=L1_ACT, l2_activation_penalty=L2_ACT).train()
    y = layer(torch.randn(3, 3, 5, 5))
    assert not hasattr(layer, "weight_penalty")  # only the penalties asked for
    torch.testing.assert_close(layer.activation_penalty.auxiliary_loss(),
                               _activation_formula(y, L1_ACT, L2_ACT))


def test_penalties_only_in_train_mode_and_state_dict_unchanged():
    torch.manual_seed(2)
    plain = _layer()
    layer = _layer(l1_penalty=L1, l1_activation_penalty=L1_ACT)
    assert layer.state_dict().keys() == plain.state_dict().keys()
    layer.eval()
    layer(torch.randn(2, 3, 5, 5))
    assert collect_auxiliary_losses(layer) == {}
    layer.train()(torch.randn(2, 3, 5, 5))
    assert layer.weight_penalty.auxiliary_loss() is not None
    copied = copy.deepcopy(layer)  # (EMA) the term has a graph, which deepcopy cannot copy
    assert copied.weight_penalty.auxiliary_loss() is None


def test_collect_by_module_name_and_by_kind():
    torch.manual_seed(3)
    model = nn.Sequential(_layer(l1_penalty=L1, l2_activation_penalty=L2_ACT),
                          create_kan_conv("kagn", 2, 4, 2, 1, l1_penalty=L1))
    model.train()(torch.randn(2, 3, 4, 4))
    by_name = collect_auxiliary_losses(model)
    assert sorted(by_name) == ["0.activation_penalty", "0.weight_penalty", "1.weight_penalty"]
    by_kind = collect_auxiliary_losses(model, by_kind=True)
    assert sorted(by_kind) == ["activation_penalty", "weight_penalty"]
    torch.testing.assert_close(by_kind["weight_penalty"],
                               _weight_formula(model[0], L1, 0) + _weight_formula(model[1], L1, 0))

    class LoadBalance(nn.Module):  # the convention: any module with auxiliary_loss()
        def auxiliary_loss(self):
            return torch.tensor(0.5)

    model.append(LoadBalance())
    assert collect_auxiliary_losses(model, by_kind=True)["load_balance"] == 0.5


def test_penalty_strengths_are_checked():
    with pytest.raises(ValueError, match="l2_activation_penalty must be a number >= 0"):
        attach_penalties(nn.Linear(2, 2), l2_activation_penalty=-1.0)


# ---------------------------------------------------------------- noise injection
def _channel_std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std of each channel over batch and space, shaped (1, C, 1...)."""
    per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
    mean = per_channel.mean(1, keepdim=True)
    var = ((per_channel - mean) ** 2).sum(1) / (per_channel.shape[1] - 1)
    return var.sqrt().view((1, -1) + (1,) * (x.dim() - 2))


@pytest.mark.parametrize("multiplicative", [False, True])
def test_noise_injection_formula_in_train_mode_identity_in_eval(multiplicative):
    x = torch.randn(4, 3, 5, 5)
    p, alpha, beta = 0.3, 0.2, 0.05
    noise = NoiseInjection(p, alpha, multiplicative=multiplicative, beta=beta)
    torch.manual_seed(4)
    got = noise(x)
    torch.manual_seed(4)  # draws in torch-conv-kan's order: masks, then noises
    mask = (torch.rand(x.shape) < p).float()
    expected = x.clone()
    if multiplicative:
        mask_m = (torch.rand(x.shape) < p).float()
        expected = expected + x * mask_m * (1 + beta * torch.randn(x.shape))
    expected = expected + alpha * mask * torch.randn(x.shape) * _channel_std(x)
    torch.testing.assert_close(got, expected)
    assert 0 < int((got != x).sum()) < x.numel()
    assert noise.eval()(x) is x


@pytest.mark.parametrize("multiplicative", [False, True])
def test_noise_injection_matches_torch_conv_kan(multiplicative):
    path = TCK / "utils" / "regularization.py"
    if not path.is_file():
        pytest.skip(f"torch-conv-kan reference not found at {TCK}")
    spec = importlib.util.spec_from_file_location("tck_regularization", path)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    if multiplicative:
        ref, ours = (reference.NoiseMultiplicativeInjection(0.2, 0.1, 0.03),
                     NoiseInjection(0.2, 0.1, multiplicative=True, beta=0.03))
    else:
        ref, ours = reference.NoiseInjection(0.2, 0.1), NoiseInjection(0.2, 0.1)
    x = torch.randn(2, 3, 6)
    torch.manual_seed(5)
    expected = ref(x)
    torch.manual_seed(5)
    torch.testing.assert_close(ours(x), expected)


# ---------------------------------------------------------------- dropout placements
def _mask(shape: tuple[int, ...], p: float, dims: int) -> torch.Tensor:
    """The scaled channel mask torch's Dropout{dims}d draws for an input of ``shape``."""
    ones = torch.ones(shape[:2] + (1,) * dims)
    return {1: nn.Dropout1d, 2: nn.Dropout2d, 3: nn.Dropout3d}[dims](p)(ones)


def _by_hand(layer: KANConv, x: torch.Tensor, placement: str | None, p: float) -> torch.Tensor:
    """Base conv of silu(x) plus basis conv of the channel-major basis stack, with the
    placement's dropout (None: no dropout)."""
    dims = x.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    x_base = x_basis = x
    if placement in ("full", "poly"):
        x_basis = x * _mask(x.shape, p, dims)
        x_base = x_basis if placement == "full" else x
    stack = layer.basis(x_basis).flatten(1, 2)
    if placement == "degree":
        stack = stack * _mask(stack.shape, p, dims)
    return (conv(F.silu(x_base), layer.base_weight, padding=1)
            + conv(stack, layer.basis_weight, padding=1))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("placement", ["full", "poly", "degree"])
def test_dropout_placements_in_train_and_eval_mode(placement, dims):
    torch.manual_seed(6)
    p = 0.5
    layer = create_kan_conv("kagn", dims, 3, 2, 3, padding=1, degree=2, norm="none",
                            activation=None, dropout=p, dropout_placement=placement)
    x = torch.randn((2, 3) + (4,) * dims, requires_grad=True)
    torch.manual_seed(7)
    got = layer.train()(x)
    torch.manual_seed(7)
    expected = _by_hand(layer, x, placement, p)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got.square().sum(), [x, layer.basis_weight])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, layer.basis_weight])
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), _by_hand(layer, x, None, p))


def test_noise_at_a_placement_and_bad_options():
    torch.manual_seed(8)
    layer = _layer(dropout=0.3, dropout_placement="degree", dropout_type="multiplicative_noise",
                   noise_scale=0.2)
    assert isinstance(layer.dropout, NoiseInjection) and layer.dropout.multiplicative
    assert layer.dropout.alpha == 0.2
    x = torch.randn(2, 3, 5, 5)
    assert not torch.equal(layer.train()(x), layer(x))  # fresh noise each call
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    with pytest.raises(ValueError, match="dropout_placement must be one of"):
        _layer(dropout_placement="after")
    with pytest.raises(ValueError, match="dropout_type must be one of"):
        _layer(dropout=0.1, dropout_type="gaussian")
    with pytest.raises(ValueError, match="noise_scale must be a number >= 0"):
        _layer(dropout=0.1, dropout_type="noise", noise_scale=-0.1)
    with pytest.raises(ValueError, match="bottleneck KAN convs support dropout_placement"):
        _layer(bottleneck=True, dropout_placement="poly")


def test_options_reach_models_from_config_keys():
    options = dict(dropout=0.1, dropout_placement="poly", dropout_type="noise",
                   l1_penalty=1e-6, l2_activation_penalty=1e-6)
    assert set(options) <= accepted_arguments("ukanet")
    model = create_model("ukanet", spatial_dims=2, in_channels=1, out_channels=2, depth=2,
                         width=4, **options)
    kinds = {type(m) for m in model.modules()}
    assert {WeightPenalty, ActivationPenalty, NoiseInjection} <= kinds
    model.train()(torch.randn(1, 1, 8, 8))
    assert set(collect_auxiliary_losses(model, by_kind=True)) == {"weight_penalty",
                                                                  "activation_penalty"}
    cfg = load_config(DEMO, ["model.l1_penalty=1e-6", "model.dropout_type=noise",
                             "model.dropout=0.1", "model.dropout_placement=degree"])
    with torch.device("meta"):
        penalties = [m for m in cfg.model.build().modules() if isinstance(m, WeightPenalty)]
    assert penalties and all(m.l1 == 1e-6 for m in penalties)  # YAML's "1e-6" string too
    for override, message in [("model.dropout_placement=after", "model.dropout_placement: "),
                              ("model.l2_penalty=-1", "model.l2_penalty: ")]:
        with pytest.raises(ConfigError, match=message):
            load_config(DEMO, [override])


# ---------------------------------------------------------------- trainer
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.kan = _layer(norm="batch", l1_penalty=L1, l2_penalty=L2,
                          l1_activation_penalty=L1_ACT, l2_activation_penalty=L2_ACT)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.kan(x))


def test_trainer_adds_and_logs_the_auxiliary_terms(tmp_path):
    torch.manual_seed(9)
    model = _Net()
    x, y = torch.randn(2, 3, 5, 5), torch.randn(2, 1, 5, 5)
    reference = copy.deepcopy(model).train()
    hidden = reference.kan(x)
    data_loss = F.mse_loss(reference.head(hidden), y).item()
    penalty = (_weight_formula(reference.kan, L1, L2)
               + _activation_formula(hidden, L1_ACT, L2_ACT)).item()
    assert penalty > 1e-3 * data_loss

    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    config = TrainerConfig(max_epochs=1, lr=0.1, optimizer="sgd", log_every=1)
    Trainer(model, nn.MSELoss(), loader, config, tmp_path).fit()
    with open(tmp_path / "metrics.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert float(row["train_loss"]) == pytest.approx(data_loss + penalty, rel=1e-5)
    assert float(row["aux_loss"]) == pytest.approx(penalty, rel=1e-5)
    assert float(row["aux_weight_penalty"]) + float(row["aux_activation_penalty"]) == \
        pytest.approx(penalty, rel=1e-5)
    assert f"(aux {float(row['aux_loss']):.4g})" in (tmp_path / "train.log").read_text()
