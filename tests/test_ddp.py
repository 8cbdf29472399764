"""2-process CPU DDP (gloo) through `torchrun` (Accelerate reads its environment): both ranks end with identical weights,
equal to a 1-process run with the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kanseg.engine.checkpoint import load_weights

WORKER = textwrap.dedent("""
    import sys
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from kanseg.engine.checkpoint import save_weights
    from kanseg.engine.config import LossConfig, TrainerConfig
    from kanseg.engine.losses import build_loss
    from kanseg.engine.trainer import Trainer, seed_everything
    from kanseg.models import create_model

    out, batch = sys.argv[1], int(sys.argv[2])
    seed_everything(0)
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = (x > 0.5).float()
    model = create_model("ukanet", spatial_dims=2, in_channels=1, out_channels=1, width=4,
                         depth=1, degree=2)
    # SGD: Adam would amplify float-rounding differences of near-zero gradients to +-lr
    cfg = TrainerConfig(max_epochs=2, optimizer="sgd", lr=0.05, log_every=1, grad_clip=1.0,
                        ema=0.5)
    loss = build_loss(LossConfig(name="dice_bce"), overlapping_labels=True)
    trainer = Trainer(model, loss, DataLoader(TensorDataset(x, y), batch_size=batch), cfg, out)
    trainer.fit()
    rank = trainer.acc.process_index
    save_weights(trainer.acc.unwrap_model(trainer.model).state_dict(), f"{out}/rank{rank}.safetensors")
    print("processes", trainer.acc.num_processes, "steps", trainer.state.step)
""")


def _launch(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", cwd=cwd, timeout=240)


def _run(cmd: list[str], cwd) -> str:
    result = _launch(cmd, cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _torchrun(worker, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--standalone", str(worker), *args]


def _assert_same_weights(ddp, single) -> None:
    """Both DDP ranks saved equal weights, equal to the 1-process run's."""
    rank0, rank1 = (load_weights(ddp / f"rank{r}.safetensors") for r in (0, 1))
    reference = load_weights(single / "rank0.safetensors")
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), f"ranks differ at {key}"
        torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{key}: DDP vs 1 process: {m}")


def test_two_process_ddp_matches_single_process(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    out = _run(_torchrun(worker, str(ddp), "1"), tmp_path)
    assert "processes 2 steps 8" in out
    assert "processes 1 steps 8" in _run([sys.executable, str(worker), str(single), "2"], tmp_path)
    _assert_same_weights(ddp, single)
    # the checkpoint written by rank 0 holds the same (EMA) weights on both layouts
    ema_ddp = load_weights(ddp / "checkpoints/last/model.safetensors")
    ema_single = load_weights(single / "checkpoints/last/model.safetensors")
    for key, value in ema_ddp.items():
        torch.testing.assert_close(value, ema_single[key], rtol=1e-4, atol=1e-5)


MOE_WORKER = textwrap.dedent("""
    import sys
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    import kanseg.engine.trainer as trainer_module
    from kanseg.engine.checkpoint import save_weights
    from kanseg.engine.config import LossConfig, TrainerConfig
    from kanseg.engine.losses import build_loss
    from kanseg.engine.trainer import Trainer, seed_everything
    from kanseg.layers.moe import MoEKANConv
    from kanseg.models import create_model

    out, batch, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if mode == "plain-ddp":  # what the trainer did before: DDP without unused-parameter search
        trainer_module.leaves_parameters_unused = lambda model: False
    seed_everything(0)
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = (x > 0.5).float()
    # top-1 of 4 experts, deterministic gates, no load-balancing term: each sample runs
    # through one expert, so a 1-sample step leaves 3 of 4 experts of each mixture unused
    model = create_model("ukanet", spatial_dims=2, in_channels=1, out_channels=1, width=4,
                         depth=1, degree=2, moe_experts=4, moe_top_k=1,
                         moe_noisy_gating=False, moe_loss_coef=0.0)
    mixtures = [m for m in model.modules() if isinstance(m, MoEKANConv)]
    gates = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in mixtures:
            m.w_gate.copy_(torch.randn(m.w_gate.shape, generator=gates) * 3)
    cfg = TrainerConfig(max_epochs=1, optimizer="sgd", lr=0.05, log_every=1, grad_clip=1.0)
    loss = build_loss(LossConfig(name="dice_bce"), overlapping_labels=True)
    trainer = Trainer(model, loss, DataLoader(TensorDataset(x, y), batch_size=batch), cfg, out)
    trainer.fit()
    rank = trainer.acc.process_index
    save_weights(trainer.acc.unwrap_model(trainer.model).state_dict(), f"{out}/rank{rank}.safetensors")
    print("processes", trainer.acc.num_processes, "steps", trainer.state.step,
          "mixtures", len(mixtures))
""")


@pytest.mark.slow
def test_moe_model_trains_under_two_process_ddp(tmp_path):
    """A mixture of experts leaves unselected experts without gradients: plain DDP refuses the
    next step; the trainer's DDP looks for unused parameters when the model has mixtures, and
    2-process training then equals 1-process training with the same global batch."""
    worker = tmp_path / "moe_worker.py"
    worker.write_text(MOE_WORKER)
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    plain = _launch(_torchrun(worker, str(tmp_path / "plain"), "1", "plain-ddp"), tmp_path)
    assert plain.returncode != 0 and "find_unused_parameters" in plain.stderr
    out = _run(_torchrun(worker, str(ddp), "1", "trainer"), tmp_path)
    assert "processes 2 steps 4" in out
    assert "processes 1 steps 4" in _run([sys.executable, str(worker), str(single), "2",
                                          "trainer"], tmp_path)
    _assert_same_weights(ddp, single)
