"""Segmentation training from a :class:`kanseg.config.Config` (what ``kanseg train`` runs)."""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from safetensors import SafetensorError
from torch import nn

from kanseg.config import Config, check_model, save_config
from kanseg.data import build_loaders, input_channels, label_spec
from kanseg.data.check import check_dataset
from kanseg.data.layouts import DataError
from kanseg.engine.checkpoint import WEIGHTS, load_weights, resolve
from kanseg.engine.losses import build_loss
from kanseg.engine.rundir import RunDirError, claim_run_dir
from kanseg.engine.trainer import Trainer, TrainState, process_state, seed_everything, setup_logging
from kanseg.engine.validation import SegmentationValidator
from kanseg.models.io import InitReport, load_matching
from kanseg.schema import ConfigError

log = logging.getLogger("kanseg")


def default_run_dir(config_path: str | Path, root: str | Path = "runs") -> Path:
    """``runs/<config name>-<UTC timestamp>``."""
    return Path(root) / f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def check_data(cfg: Config) -> None:
    """Run the data checks; raise :class:`DataError` listing every error, log the warnings."""
    report = check_dataset(cfg.data, progress=_is_main())
    for warning in report.warnings:
        log.warning("data: %s", warning)
    if report.errors:
        listing = "\n  ".join(str(e) for e in report.errors)
        raise DataError(f"the dataset at {cfg.data.root!r} has {len(report.errors)} error(s); "
                        f"fix them (see `kanseg data check`) before training:\n  {listing}")


def resolve_channels(cfg: Config) -> None:
    """Fill ``model.in_channels`` / ``out_channels`` from the data, or check they agree."""
    spec = label_spec(cfg.data)
    wanted = {"in_channels": input_channels(cfg.data), "out_channels": spec.out_channels,
              "spatial_dims": cfg.data.spatial_dims}
    for key, value in wanted.items():
        given = cfg.model.kwargs.setdefault(key, value)
        if given != value:
            raise ConfigError(f"model.{key} is {given} but the data gives {value} "
                              f"({spec.mode}: {', '.join(spec.names)})" if key == "out_channels"
                              else f"model.{key} is {given} but the data gives {value}")


def train(cfg: Config, run_dir: str | Path, resume: str | Path | None = None,
          check: bool = True, overwrite: bool = False) -> TrainState:
    """Claim ``run_dir`` (see :func:`claim_run_dir`) and train into it."""
    with contextlib.ExitStack() as stack:
        error = None
        if _is_main():  # the main process holds the lock; every process learns a refusal
            try:
                stack.enter_context(claim_run_dir(run_dir, resume is not None, overwrite))
            except RunDirError as err:
                error = str(err)
        if process_state().num_processes > 1:
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error])[0]
        if error:
            raise RunDirError(error)
        return _train(cfg, Path(run_dir), resume, check)


def _train(cfg: Config, run_dir: Path, resume: str | Path | None, check: bool) -> TrainState:
    """Check the data, build loaders/model/loss/validator and train into ``run_dir``; with a
    ``peft`` section, adapt the network loaded from ``trainer.init_from`` (kanpeft)."""
    if (cfg.peft.method or cfg.peft.trainable) and not cfg.trainer.init_from:
        what = (f"peft.method={cfg.peft.method}" if cfg.peft.method
                else f"peft.trainable={cfg.peft.trainable}")
        raise ConfigError(f"{what} adapts a pretrained network: give it with --init-from RUN "
                          "(trainer.init_from)")
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, main=_is_main())
    if check:
        check_data(cfg)
    resolve_channels(cfg)
    check_model(cfg.model)
    if _is_main():
        save_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    spec = label_spec(cfg.data)
    train_loader, val_loader = build_loaders(cfg.data)
    model = cfg.model.build()
    loss = build_loss(cfg.loss, overlapping_labels=spec.mode == "regions")
    names = spec.names if spec.activation == "sigmoid" else spec.names[1:]
    inf = cfg.inference
    validator = SegmentationValidator(val_loader, names, spec.activation, cfg.roi_size,
                                      inf.sw_batch_size, inf.overlap, inf.mode, inf.threshold)
    base = None  # (weights file, what was loaded) of a fresh start from trainer.init_from
    if cfg.trainer.init_from and resume is None:
        base = initialise(model, cfg.trainer.init_from, cfg.trainer.init_strict)
    if cfg.peft.method or cfg.peft.trainable:  # base is None when resuming
        from kanpeft.segmentation_runs import save_run_adapter, start_adapted

        model = start_adapted(model, cfg, run_dir, base, _is_main())
    n_params = sum(p.numel() for p in model.parameters())
    log.info("run folder %s: %s (%.2f M parameters), %d train / %d val cases", run_dir,
             cfg.model.name, n_params / 1e6, len(train_loader.dataset), len(val_loader.dataset))
    trainer = Trainer(model, loss, train_loader, cfg.trainer, run_dir, validate=validator)
    state = trainer.fit(resume=resume)
    if cfg.peft.method and _is_main():
        save_run_adapter(model, run_dir)
    return state


def initialise(model: nn.Module, source: str | Path,
               strict: bool = False) -> tuple[Path, InitReport]:
    """Load the matching tensors of ``source`` (a run folder: its best checkpoint, else its last;
    a checkpoint folder; or a safetensors file) into ``model`` and log what was not loaded.
    Returns the weights file and the report."""
    path = Path(source).expanduser()
    try:
        weights = path if path.is_file() else resolve(path, prefer="best") / WEIGHTS
        state = load_weights(weights)
    except (OSError, SafetensorError) as err:
        raise ConfigError(f"trainer.init_from: cannot read weights from {source}: {err}") from None
    try:
        report = load_matching(model, state, strict)
    except ValueError as err:
        raise ConfigError(f"trainer.init_from ({weights}): {err}") from None
    log.info("initialised from %s: %s", weights, report.summary())
    return weights, report


def _is_main() -> bool:
    return process_state().is_main_process
