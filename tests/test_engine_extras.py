"""Lion and the Tversky loss against formulas written here; both reachable from a config."""
from __future__ import annotations

import pytest
import torch

from kanseg.engine.config import LossConfig, TrainerConfig
from kanseg.engine.losses import build_loss
from kanseg.engine.optimizers import Lion
from kanseg.engine.trainer import build_optimizer

SMOOTH = 1e-5


def test_lion_matches_the_update_rule():
    torch.manual_seed(0)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    lr, wd, (b1, b2) = 0.01, 0.1, (0.9, 0.99)
    opt = Lion([w], lr=lr, betas=(b1, b2), weight_decay=wd)
    ref, m = w.detach().clone(), torch.zeros(5, dtype=torch.float64)
    for step in range(4):
        grad = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        w.grad = grad.clone()
        opt.step()
        ref = ref * (1 - lr * wd) - lr * torch.sign(b1 * m + (1 - b1) * grad)
        m = b2 * m + (1 - b2) * grad
        torch.testing.assert_close(w.detach(), ref)


def test_lion_from_config_and_bad_values():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer(params, TrainerConfig(optimizer="lion", lr=1e-4)), Lion)
    with pytest.raises(ValueError, match="betas"):
        Lion(params, betas=(0.9, 1.0))


def test_tversky_matches_formula():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 1, 4, 4)).double()
    cfg = LossConfig(name="tversky", tversky_alpha=0.3, tversky_beta=0.7)
    got = build_loss(cfg)(logits, labels)
    prob = torch.softmax(logits, 1)
    onehot = torch.stack([(labels[:, 0] == c).double() for c in range(3)], 1)
    values = []
    for b in range(2):
        for c in range(3):
            p, g = prob[b, c], onehot[b, c]
            tp, fp, fn = (p * g).sum(), (p * (1 - g)).sum(), ((1 - p) * g).sum()
            values.append(1 - (tp + SMOOTH) / (tp + 0.3 * fp + 0.7 * fn + SMOOTH))
    assert float(got) == pytest.approx(float(sum(values) / len(values)), rel=1e-5)
