"""``torch.compile`` of KAN layers and UKANet against eager, and the ``trainer.compile`` option."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch._inductor import config as inductor_config
from torch.utils.data import DataLoader, TensorDataset

from kanseg.engine import checkpoint as ckpt
from kanseg.engine.config import TrainerConfig
from kanseg.engine.trainer import Trainer
from kanseg.layers import compiled, create_kan_conv
from kanseg.models import create_model
from kanseg.schema import ConfigError, from_dict


def tiny_ukanet(depth: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return create_model("ukanet", spatial_dims=2, in_channels=1, out_channels=2, width=4,
                        depth=depth)


def _outputs_and_grads(model: nn.Module, fn, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = fn(x)
    y = y[0] if isinstance(y, (list, tuple)) else y
    y.square().mean().backward()
    return [y.detach(), x.grad, *(p.grad for p in model.parameters())]


@pytest.mark.slow
@pytest.mark.parametrize("build, shape", [
    (lambda: create_kan_conv("kagn", 2, 4, 6, 3, padding=1, groups=2), (2, 4, 12, 12)),
    (tiny_ukanet, (2, 1, 16, 16)),
], ids=["kanconv", "ukanet"])
def test_compiled_model_matches_eager(build, shape):
    """Inductor outputs and gradients equal eager ones (train mode)."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    model = build()
    x = torch.randn(shape)
    eager = _outputs_and_grads(model, model, x)
    compiled = _outputs_and_grads(model, torch.compile(model), x)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_trainer_compile_key_validates():
    assert from_dict(TrainerConfig, {"compile": True}, "trainer").compile is True
    assert TrainerConfig().compile is False
    with pytest.raises(ConfigError, match="compile"):
        from_dict(TrainerConfig, {"compile": "sometimes"}, "trainer")


def _one_step(tmp_path, model: nn.Module) -> Trainer:
    x = torch.randn(2, 1, 16, 16)
    y = torch.randint(0, 2, (2, 16, 16))
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    cfg = TrainerConfig(max_epochs=1, log_every=1, compile=True)
    trainer = Trainer(model, nn.CrossEntropyLoss(), loader, cfg, tmp_path)
    assert trainer.fit().step == 1
    return trainer


def test_trainer_compile_saves_plain_checkpoint(tmp_path, monkeypatch):
    """The compiled training forward is used; the checkpoint loads into a plain model.

    Dynamo's eager backend stands in for inductor to keep the test fast."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    trainer = _one_step(tmp_path, tiny_ukanet(depth=1))
    assert isinstance(trainer.train_forward, torch._dynamo.eval_frame.OptimizedModule)
    weights = ckpt.load_weights(tmp_path / "checkpoints" / "last" / ckpt.WEIGHTS)
    assert not any(key.startswith("_orig_mod.") for key in weights)
    plain = tiny_ukanet(depth=1)
    plain.load_state_dict(weights)
    for key, value in trainer.acc.unwrap_model(trainer.model).state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value, rtol=0, atol=0)


def test_trainer_compile_falls_back_to_eager(tmp_path, monkeypatch):
    """When compilation cannot run (here: a C++ compiler that does not exist), training goes
    on eagerly with a logged warning."""
    torch._dynamo.reset()
    monkeypatch.setattr(compiled, "_AVAILABLE", {})
    no_compiler = {"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}
    with inductor_config.patch(no_compiler):
        trainer = _one_step(tmp_path, tiny_ukanet(depth=1))
    torch._dynamo.reset()
    assert trainer.train_forward is trainer.model
    log = (tmp_path / "train.log").read_text()
    assert "torch.compile cannot run on cpu here" in log and "trainer.compile=true" in log
