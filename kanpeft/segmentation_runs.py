"""kanseg runs adapted with a ``peft:`` section: attach a kanpeft method to the pretrained
network of ``trainer.init_from``, record the adapter and its base in the run folder, and merge
such a run into a plain one.

An adapted run folder holds, besides kanseg's usual files::

    peft.json      method, options, trainable / total parameters and the base: the weights
                   file that trainer.init_from resolved to and the fingerprint of its tensors
    adapter/       the adapter in kanpeft's format (adapter_config.json, its weights,
                   kanpeft_base.json), from the best checkpoint, written when training ends
    checkpoints/   full states of the adapted model (base + adapter): resume and infer use them
"""
from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from typing import Sequence

from torch import nn

from kanseg.config import Config, PeftConfig, load_config, save_config
from kanseg.engine import checkpoint as ckpt
from kanseg.files import atomic_write_text
from kanseg.models.io import InitReport
from kanseg.schema import ConfigError

from .methods.common import AdapterConfig, freeze_except
from .api import (base_fingerprint, kan_layer_names, load_adapter, merge, prepare, save_adapter,
                  trainable_report)

log = logging.getLogger("kanseg")

ADAPTER_DIR = "adapter"
RECORD = "peft.json"
MERGED = "merged"  # the checkpoint of a merged run


def _check_trainable(model: nn.Module, names: Sequence[str]) -> None:
    modules = dict(model.named_modules())
    unknown = [n for n in names if not n or n not in modules]
    if unknown:
        listing = ", ".join(n for n in modules if n and n.count(".") < 2)
        raise ConfigError(f"peft.trainable: the model has no module {unknown[0]!r}; modules that "
                          f"can train in full (with their sub-modules): {listing}")


def _check_targets(model: nn.Module, patterns: Sequence[str] | None) -> None:
    layers = kan_layer_names(model)
    for pattern in patterns or []:
        try:
            found = any(re.fullmatch(pattern, name) for name in layers)
        except re.error as err:
            raise ConfigError(f"peft.options.target_modules: {pattern!r} is not a regular "
                              f"expression ({err})") from None
        if not found:
            raise ConfigError(f"peft.options.target_modules: {pattern!r} matches no KAN layer; "
                              f"the KAN layers that can be targeted: "
                              f"{', '.join(layers) or 'none (the model has no KAN layer)'}")


def _callable_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """``names`` with every ModuleList / ModuleDict replaced by its children: peft's LoRA wraps
    a module that trains in full in a ``ModulesToSaveWrapper``, which cannot be indexed."""
    out: list[str] = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            out += _callable_modules(model, [f"{name}.{child}" for child, _ in
                                             module.named_children()])
        else:
            out.append(name)
    return out


def adapt(model: nn.Module, peft: PeftConfig) -> nn.Module:
    """``model`` frozen, with ``peft.method`` on its KAN layers and the ``peft.trainable``
    modules training in full (:func:`kanpeft.api.prepare`). A module or target pattern that
    the model does not have is a ConfigError listing those it has."""
    _check_trainable(model, peft.trainable)
    _check_targets(model, peft.options.get("target_modules"))
    trainable = _callable_modules(model, peft.trainable)
    try:
        return prepare(model, peft.method, **peft.options, trainable_modules=trainable)
    except ValueError as err:
        raise ConfigError(f"peft ({peft.method}): {err}") from None


def _check_reinitialised(model: nn.Module, report: InitReport, trainable: Sequence[str]) -> None:
    """Tensors that ``trainer.init_from`` did not load must train (a frozen random head is
    useless, and the adapter could not be merged onto the base)."""
    params = dict(model.named_parameters())
    names = [n.split(":")[0] for n in report.mismatched] + report.missing
    frozen = [n for n in names if n in params
              and not any(n.startswith(f"{t}.") for t in trainable)]
    if frozen:
        modules = sorted({n.rpartition(".")[0] for n in frozen})
        raise ConfigError(f"peft.trainable: trainer.init_from did not load {', '.join(frozen)} "
                          f"(re-initialised); add their modules ({', '.join(modules)}) to "
                          "peft.trainable so that they train")


def train_only(model: nn.Module, peft: PeftConfig) -> nn.Module:
    """Partial fine-tuning, no adapter (``peft.method: null``): freeze ``model`` except the
    ``peft.trainable`` modules (and its norms with ``peft.options.train_norm``)."""
    _check_trainable(model, peft.trainable)
    freeze_except(model, AdapterConfig(train_norm=bool(peft.options.get("train_norm")),
                                       trainable_modules=list(peft.trainable)))
    return model


def start_adapted(model: nn.Module, cfg: Config, run_dir: Path,
                  base: tuple[Path, InitReport] | None, main: bool = True) -> nn.Module:
    """Adapt ``model`` for training (:func:`adapt`; :func:`train_only` without a method) and
    log its trainable parameters. ``base`` (a fresh start: the weights file
    ``trainer.init_from`` loaded and its report) is checked and recorded in
    ``run_dir/peft.json`` by the ``main`` process; None when resuming."""
    if base is not None:
        _check_reinitialised(model, base[1], cfg.peft.trainable)
    if cfg.peft.method is None:
        prepared = train_only(model, cfg.peft)
    else:
        prepared = adapt(model, cfg.peft)
    report = trainable_report(prepared, depth=2, show=False)
    log.info("peft %s: %s of %s parameters train (%.2f%%)\n%s", cfg.peft.method or
             f"none (trains {', '.join(cfg.peft.trainable)})", f"{report.trainable:,}",
             f"{report.total:,}", 100 * report.ratio, report)
    if base is not None and main and cfg.peft.method is not None:
        record = {"method": cfg.peft.method, "options": cfg.peft.options,
                  "trainable": cfg.peft.trainable, "trainable_parameters": report.trainable,
                  "total_parameters": report.total,
                  "base": {"init_from": cfg.trainer.init_from,
                           "weights": str(Path(base[0]).resolve()),
                           "frozen_parameter_sha256": base_fingerprint(prepared)}}
        atomic_write_text(run_dir / RECORD, json.dumps(record, indent=2) + "\n")
    return prepared


def save_run_adapter(prepared: nn.Module, run_dir: Path) -> Path:
    """Write the adapter of the run's best checkpoint (else its last) to ``run_dir/adapter``
    in kanpeft's format (:func:`kanpeft.api.save_adapter`); ``prepared`` receives its weights."""
    prepared.load_state_dict(ckpt.load_weights(ckpt.resolve(run_dir, prefer="best")
                                               / ckpt.WEIGHTS))
    return save_adapter(prepared, Path(run_dir) / ADAPTER_DIR)


def _base_source(run_dir: Path, base: str | Path | None) -> Path:
    """``base``, else the weights file recorded in ``peft.json`` (its run folder when the file
    was pruned since; the adapter's fingerprint check catches other weights)."""
    if base is not None:
        return Path(base)
    path = run_dir / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pass the base run with --backbone")
    recorded = json.loads(path.read_text())["base"]
    weights = Path(recorded["weights"])
    return weights if weights.is_file() else Path(recorded["init_from"])


def _plain_config(cfg: Config, merged: nn.Module) -> Config:
    """``cfg`` without the peft section, with the merged degree (basis: extra degrees)."""
    plain = copy.deepcopy(cfg)
    plain.peft = PeftConfig()
    degrees = {merged.get_submodule(n).basis.degree for n in kan_layer_names(merged)}
    if len(degrees) > 1:
        raise ValueError(f"the merged KAN layers have degrees {sorted(degrees)}, which one "
                         f"{cfg.model.name} config cannot describe (extra degrees on some "
                         "layers only); predict with the adapted run itself")
    if degrees:
        plain.model.kwargs["degree"] = degrees.pop()
    fresh = plain.model.build()
    try:
        fresh.load_state_dict(merged.state_dict())
    except RuntimeError as err:
        raise ValueError(f"the merged weights do not fit a plain {cfg.model.name} of the run's "
                         f"config: {str(err).splitlines()[0]}") from None
    return plain


def merge_run(run_dir: str | Path, output: str | Path, base: str | Path | None = None,
              force: bool = False) -> Path:
    """Load the adapter of the adapted run ``run_dir`` onto its base, merge it and write a plain
    run folder to ``output``: ``config.yaml`` without the peft section and
    ``checkpoints/merged/model.safetensors``, which ``best`` and ``last`` point at.

    ``base`` (a run folder, checkpoint folder or weights file) replaces the base recorded in
    ``peft.json``; a base whose tensors are not those the adapter was trained on is refused
    unless ``force``."""
    from kanseg.training import initialise

    run_dir, output = Path(run_dir), Path(output)
    cfg = load_config(run_dir / "config.yaml")
    if cfg.peft.method is None:
        raise ValueError(f"{run_dir} is not an adapted run: its config.yaml has no peft.method")
    adapter = run_dir / ADAPTER_DIR
    if not adapter.is_dir():
        raise FileNotFoundError(f"{adapter} is missing: it is written when training ends (finish "
                                f"the run with kanseg train --run-dir {run_dir} --resume)")
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} is not empty; give a new folder for the merged run")
    model = cfg.model.build()
    weights, _ = initialise(model, _base_source(run_dir, base), cfg.trainer.init_strict)
    merged = merge(load_adapter(model, adapter, force=force))
    plain = _plain_config(cfg, merged)
    root = output / "checkpoints"
    tmp = ckpt.stage(root, MERGED)
    ckpt.save_weights(merged.state_dict(), tmp / ckpt.WEIGHTS)
    ckpt.write_meta(tmp, {"merged_from": str(run_dir.resolve()), "method": cfg.peft.method,
                          "base": str(weights)})
    ckpt.publish(tmp, MERGED)
    for alias in ("best", "last"):
        ckpt.link(root, alias, MERGED)
    save_config(plain, output / "config.yaml")
    return output
