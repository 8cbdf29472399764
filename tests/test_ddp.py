"""2-process CPU DDP (gloo) through `torchrun` (Accelerate reads its environment): both ranks end with identical weights,
equal to a 1-process run with the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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


def _run(cmd: list[str], cwd) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=cwd, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_two_process_ddp_matches_single_process(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--standalone", str(worker), str(ddp), "1"], tmp_path)
    assert "processes 2 steps 8" in out
    assert "processes 1 steps 8" in _run([sys.executable, str(worker), str(single), "2"], tmp_path)
    rank0, rank1 = (load_weights(ddp / f"rank{r}.safetensors") for r in (0, 1))
    reference = load_weights(single / "rank0.safetensors")
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), f"ranks differ at {key}"
        torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{key}: DDP vs 1 process: {m}")
    # the checkpoint written by rank 0 holds the same (EMA) weights on both layouts
    ema_ddp = load_weights(ddp / "checkpoints/last/model.safetensors")
    ema_single = load_weights(single / "checkpoints/last/model.safetensors")
    for key, value in ema_ddp.items():
        torch.testing.assert_close(value, ema_single[key], rtol=1e-4, atol=1e-5)
