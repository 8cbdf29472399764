"""Engine pieces against independent formulas: losses, schedules, sampling, checkpoints,
the NaN guard."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kanseg.engine import checkpoint as ckpt
from kanseg.engine.config import LossConfig, TrainerConfig
from kanseg.engine.losses import build_loss
from kanseg.engine.sampling import make_resumable
from kanseg.engine.schedules import build_scheduler
from kanseg.engine.trainer import Trainer, TrainingDiverged

SMOOTH = 1e-5


def plain_dice_loss(prob: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Mean over (batch, channel) of 1 - (2|P.G| + s) / (|P| + |G| + s)."""
    vals = []
    for b in range(prob.shape[0]):
        for c in range(prob.shape[1]):
            p, g = prob[b, c].flatten(), onehot[b, c].flatten()
            vals.append(1 - (2 * float((p * g).sum()) + SMOOTH) / (float(p.sum() + g.sum()) + SMOOTH))
    return torch.tensor(sum(vals) / len(vals), dtype=torch.float64)


def test_dice_bce_matches_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    target = (torch.rand(2, 3, 4, 4) > 0.6).double()
    got = build_loss(LossConfig(name="dice_bce"), overlapping_labels=True)(logits, target)
    prob = 1 / (1 + torch.exp(-logits))
    bce = -(target * torch.log(prob) + (1 - target) * torch.log(1 - prob)).mean()
    assert float(got) == pytest.approx(float(plain_dice_loss(prob, target) + bce), rel=1e-5)


def test_dice_ce_matches_formula_and_deep_supervision_weights():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    half = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 1, 4, 4)).double()
    loss = build_loss(LossConfig(name="dice_ce", deep_supervision_weights=[1.0, 0.25]))

    def reference(lg: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        prob = torch.exp(lg) / torch.exp(lg).sum(1, keepdim=True)
        onehot = torch.stack([(lab[:, 0] == c).double() for c in range(3)], 1)
        ce = -(onehot * torch.log(prob)).sum(1).mean()
        return plain_dice_loss(prob, onehot) + ce

    assert float(loss(logits, labels)) == pytest.approx(float(reference(logits, labels)), rel=1e-5)
    # coarser heads get a nearest-downsampled target (centre samples: 1, 3)
    expected = reference(logits, labels) + 0.25 * reference(half, labels[..., 1::2, 1::2])
    assert float(loss([logits, half], labels)) == pytest.approx(float(expected), rel=1e-5)


def test_focal_matches_formula():
    torch.manual_seed(2)
    logits = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    target = (torch.rand(1, 2, 3, 3) > 0.5).double()
    got = build_loss(LossConfig(name="focal", gamma=2.0), overlapping_labels=True)(logits, target)
    p = 1 / (1 + torch.exp(-logits))
    pt = torch.where(target > 0, p, 1 - p)
    assert float(got) == pytest.approx(float((-(1 - pt) ** 2 * torch.log(pt)).mean()), rel=1e-5)


def test_loss_rejects_activation_that_does_not_fit_labels():
    with pytest.raises(ValueError, match="overlapping regions"):
        build_loss(LossConfig(name="dice_ce"), overlapping_labels=True)
    with pytest.raises(ValueError, match="exclusive classes"):
        build_loss(LossConfig(name="dice_bce"), overlapping_labels=False)


@pytest.mark.parametrize("schedule", ["cosine", "poly", "constant"])
def test_schedule_warmup_then_decay(schedule):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, total_steps=12, warmup_steps=2, schedule=schedule)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [1.0, 2.0]
    for s in range(2, 12):
        t = (s - 2) / 10
        decay = {"cosine": 0.5 * (1 + math.cos(math.pi * t)), "poly": (1 - t) ** 0.9,
                 "constant": 1.0}[schedule]
        expected.append(2.0 * decay)
    assert lrs == pytest.approx(expected)


def test_budget_horizon_decays_with_whichever_of_steps_and_time_is_further():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    spent = [0.0]
    sched = build_scheduler(opt, total_steps=101, warmup_steps=1, schedule="poly",
                            time_progress=lambda: spent[0])
    lrs = []
    for share in (0.0, 0.5, 0.0, 1.0):  # steps 1..4: step progress is 0, .01, .02, .03
        spent[0] = share
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1.0, 0.5 ** 0.9, 0.98 ** 0.9, 0.0])


def test_budget_horizon_needs_a_time_budget():
    with pytest.raises(ValueError, match="schedule_horizon: budget needs a time budget"):
        TrainerConfig(schedule_horizon="budget")


@pytest.mark.parametrize("horizon", ["epochs", "budget"])
def test_run_stopped_by_the_clock_ends_annealed_only_with_budget_horizon(tmp_path, horizon):
    x = torch.rand(64, 2)
    loader = DataLoader(TensorDataset(x, torch.zeros(64, 1)), batch_size=1)
    config = TrainerConfig(max_epochs=1000, max_minutes=0.005, lr=0.1, schedule="cosine",
                           schedule_horizon=horizon)
    trainer = Trainer(nn.Linear(2, 1), nn.MSELoss(), loader, config, tmp_path)
    state = trainer.fit()
    assert state.epoch < 1000  # the clock stopped it
    final_lr = trainer.scheduler.get_last_lr()[0]
    if horizon == "budget":
        assert final_lr < 0.01  # cosine at >= 0.95 of the budget: <= 0.6% of the base lr
    else:
        assert final_lr > 0.099  # a few hundred of 64000 steps: still at the base lr


def test_sampler_order_depends_only_on_seed_and_epoch():
    ds = TensorDataset(torch.arange(10.0))
    loader_a, sampler_a = make_resumable(DataLoader(ds, batch_size=3), seed=5)
    loader_b, sampler_b = make_resumable(DataLoader(ds, batch_size=3, num_workers=1), seed=5)
    for epoch in (0, 1):
        sampler_a.set_epoch(epoch)
        sampler_b.set_epoch(epoch)
        a = torch.cat([b[0] for b in loader_a])
        assert torch.equal(a, torch.cat([b[0] for b in loader_b]))
        assert sorted(a.tolist()) == list(range(10))
    sampler_a.set_epoch(0)
    first = torch.cat([b[0] for b in loader_a])
    sampler_a.set_epoch(1)
    assert not torch.equal(first, torch.cat([b[0] for b in loader_a]))


def _write(root, name, value):
    tmp = ckpt.stage(root, name)
    ckpt.save_weights({"w": torch.full((3,), value)}, tmp / ckpt.WEIGHTS)
    ckpt.write_meta(tmp, {"step": int(value), "epoch": 0})
    ckpt.publish(tmp, name)
    ckpt.link(root, "last", name)


def test_failed_checkpoint_write_leaves_previous_intact(tmp_path):
    _write(tmp_path, "step-1", 1.0)
    tmp = ckpt.stage(tmp_path, "step-2")
    with pytest.raises(Exception):
        ckpt.save_weights({"w": "not a tensor"}, tmp / ckpt.WEIGHTS)  # type: ignore[dict-item]
    folder = ckpt.resolve(tmp_path)
    assert folder.name == "step-1"
    assert torch.equal(ckpt.load_weights(folder / ckpt.WEIGHTS)["w"], torch.ones(3))
    assert ckpt.read_meta(folder)["step"] == 1


def test_prune_keeps_last_k_and_linked(tmp_path):
    for i in range(1, 5):
        _write(tmp_path, f"step-{i}", float(i))
        if i == 1:
            ckpt.link(tmp_path, "best", "step-1")
    ckpt.prune(tmp_path, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir() if not p.is_symlink())
    assert names == ["step-1", "step-3", "step-4"]
    assert ckpt.resolve(tmp_path / "best").name == "step-1"


class _Poisoned(nn.Module):
    """A linear model whose loss becomes NaN for inputs marked by x[0] < 0."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.where(x[:, :1] < 0, float("nan"), 1.0)
        return self.lin(x) * scale


def _nan_trainer(tmp_path, x, **cfg):
    y = torch.zeros(len(x), 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=1)
    config = TrainerConfig(max_epochs=1, lr=0.1, log_every=1, **cfg)
    return Trainer(_Poisoned(), nn.MSELoss(), loader, config, tmp_path)


def test_nan_guard_skips_steps(tmp_path):
    x = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, 2.0], [-1.0, 0.0], [2.0, 1.0], [3.0, 0.0]])
    trainer = _nan_trainer(tmp_path, x, nan_max_consecutive=3)  # 2 bad samples: never 3 in a row
    state = trainer.fit()
    assert (state.step, state.skipped) == (4, 2)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nan_guard_stops_after_consecutive_failures(tmp_path):
    x = -torch.rand(5, 2) - 0.1  # every sample poisoned
    trainer = _nan_trainer(tmp_path, x, nan_max_consecutive=3)
    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        trainer.fit()


def test_resolve_policy_best_for_prediction_last_for_resume(tmp_path):
    """One resolver, an explicit policy: ``last`` to resume, ``best`` (else last) to predict."""
    root = tmp_path / "run" / "checkpoints"
    for name in ("epoch-0001", "epoch-0002"):
        (root / name).mkdir(parents=True)
        (root / name / ckpt.WEIGHTS).write_bytes(b"")
    (root / "last").symlink_to("epoch-0002")
    run = tmp_path / "run"
    assert ckpt.resolve(run, prefer="best") == (root / "epoch-0002").resolve()  # no best yet
    (root / "best").symlink_to("epoch-0001")
    assert ckpt.resolve(run) == (root / "epoch-0002").resolve()
    assert ckpt.resolve(run, prefer="best") == (root / "epoch-0001").resolve()
    assert ckpt.resolve(root / "epoch-0001") == (root / "epoch-0001").resolve()
    with pytest.raises(ValueError, match="prefer"):
        ckpt.resolve(run, prefer="first")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.resolve(tmp_path)


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True),
                         nn.SiLU(), nn.Conv3d(4, 1, 1), nn.Flatten(), nn.Linear(210, 1))


def test_channels_last_stores_weights_channels_last_and_trains_the_same(tmp_path):
    """trainer.channels_last changes how conv weights are stored, not what the model learns."""
    torch.manual_seed(1)
    x, y = torch.randn(6, 2, 5, 6, 7), torch.randn(6, 1)
    trained = {}
    for channels_last in (False, True):
        config = TrainerConfig(max_epochs=2, lr=0.05, log_every=1, channels_last=channels_last)
        trainer = Trainer(_conv_net(), nn.MSELoss(), DataLoader(TensorDataset(x, y), batch_size=2),
                          config, tmp_path / str(channels_last))
        weight = trainer.acc.unwrap_model(trainer.model)[0].weight  # (4, 2, 3, 3, 3)
        assert weight.is_contiguous(memory_format=torch.channels_last_3d) == channels_last
        assert weight.is_contiguous() != channels_last
        assert trainer.fit().step == 6
        trained[channels_last] = dict(trainer.acc.unwrap_model(trainer.model).named_parameters())
    assert not torch.equal(trained[True]["0.weight"], _conv_net()[0].weight)  # it trained
    for name, value in trained[False].items():
        torch.testing.assert_close(trained[True][name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_kan_network_computes_the_same(dims):
    """A UKANet with KAN blocks, a refinement head and instance norms gives the same outputs and
    gradients with its weights stored channels-last."""
    from kanseg.models import create_model
    from kanseg.models.memory_format import to_channels_last

    def build() -> nn.Module:
        torch.manual_seed(0)
        return create_model("ukanet", spatial_dims=dims, in_channels=1, out_channels=3, width=4,
                            depth=2, stem_stride=2, kan_levels=[1, 2], refine_channels=4)

    plain, fast = build(), to_channels_last(build())
    x = torch.randn((2, 1) + (16,) * dims)
    outputs, grads = [], []
    for net in (plain, fast):
        y = net(x)
        y.square().mean().backward()
        outputs.append(y)
        grads.append([p.grad for p in net.parameters()])
    assert any(p.dim() == dims + 2 and not p.is_contiguous() for p in fast.parameters())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    for mine, theirs in zip(*grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-5)
