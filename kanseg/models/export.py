"""Export networks to TorchScript (``torch.jit.trace``) and ONNX, and check the exported file
against eager PyTorch on an example input."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kanseg.files import atomic_write

FORMATS = ("onnx", "torchscript")


def _eager(model: nn.Module, example: Tensor) -> Tensor:
    with torch.no_grad():
        return model(example)


def export_torchscript(model: nn.Module, example: Tensor, path: str | os.PathLike) -> Path:
    """Trace ``model`` (eval mode) on ``example`` and save the TorchScript module."""
    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape branches: fixed size
        traced = torch.jit.trace(model, example, check_trace=False)
    path = Path(path)
    atomic_write(path, lambda tmp: torch.jit.save(traced, tmp))
    return path


def export_onnx(model: nn.Module, example: Tensor, path: str | os.PathLike, opset: int = 18,
                dynamic_batch: bool = True, dynamo: bool = False) -> Path:
    """Export ``model`` (eval mode) to ONNX with input ``input`` and output ``logits``.

    ``dynamic_batch`` makes the batch axis symbolic; spatial sizes stay those of ``example``
    (run sliding windows of that size). ``dynamo=True`` uses the ``torch.export``-based
    exporter (slower to export); the default is the TorchScript-based one.
    """
    model = model.eval()
    path = Path(path)
    if dynamo:
        options: dict[str, Any] = {"dynamo": True, "dynamic_shapes": (
            ({0: torch.export.Dim("batch")},) if dynamic_batch else None)}
    else:
        options = {"dynamo": False, "dynamic_axes": (
            {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None)}

    def write(tmp: str) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(model, (example,), tmp, input_names=["input"],
                              output_names=["logits"], opset_version=opset, **options)

    atomic_write(path, write)
    return path


def run_onnx(path: str | os.PathLike, example: Tensor) -> tuple[np.ndarray, str]:
    """Run an ONNX file on ``example``: ``(output, engine)``, with onnxruntime when installed,
    else onnx's reference evaluator (slow, for small inputs)."""
    import onnx

    onnx.checker.check_model(str(path))
    feed = {"input": example.detach().cpu().numpy()}
    try:
        import onnxruntime
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(str(path)).run(None, feed)[0], "onnx.reference"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0], "onnxruntime"


def max_abs_error(fmt: str, path: str | os.PathLike, model: nn.Module,
                  example: Tensor) -> dict[str, Any]:
    """Max abs difference between the exported file and eager ``model`` on ``example``."""
    expected = _eager(model.eval(), example)
    if fmt == "torchscript":
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            got, engine = loaded(example).numpy(), "torch.jit"
    elif fmt == "onnx":
        got, engine = run_onnx(path, example)
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return {"engine": engine,
            "max_abs_error": float(np.abs(got - expected.numpy()).max())}


def export_model(model: nn.Module, example: Tensor, path: str | os.PathLike,
                 fmt: str = "onnx", dynamo: bool = False) -> Path:
    """Export ``model`` to ``fmt`` ("onnx" or "torchscript") at ``path``."""
    if fmt == "onnx":
        return export_onnx(model, example, path, dynamo=dynamo)
    if fmt == "torchscript":
        return export_torchscript(model, example, path)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


__all__ = ["FORMATS", "export_model", "export_onnx", "export_torchscript", "max_abs_error",
           "run_onnx"]
