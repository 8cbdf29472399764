"""The Accelerate training loop shared by kanseg and kanpeft.

One script runs on CPU, one GPU, several GPUs or several nodes (``accelerate launch`` /
``torchrun``). The loop is generic: a model, a loss, a train loader, a :class:`TrainerConfig`
and an optional validation callback returning a metrics dict (the monitored metric among them).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, broadcast, set_seed
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from kanseg.files import atomic_write_text
from kanseg.layers.auxiliary import collect_auxiliary_losses
from kanseg.layers.compiled import compile_available
from kanseg.layers.moe import MoEKANConv
from kanseg.models.memory_format import to_channels_last
from kanseg.plots import plot_curves

from . import checkpoint as ckpt
from .config import TrainerConfig
from .optimizers import Lion
from .sampling import make_resumable
from .schedules import build_scheduler

log = logging.getLogger("kanseg")

Validator = Callable[[nn.Module, Accelerator], dict[str, float]]
BatchSplitter = Callable[[Any], tuple[Any, Any]]


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclasses.dataclass
class TrainState:
    """Counters saved with every checkpoint (the data position included)."""

    epoch: int = 0            # completed epochs
    batch: int = 0            # micro-batches of the current epoch already consumed
    step: int = 0             # optimiser steps taken
    skipped: int = 0          # non-finite steps skipped in total
    nan_streak: int = 0
    metric: float | None = None   # last value of the monitored metric
    best: float | None = None
    best_epoch: int | None = None
    elapsed_s: float = 0.0
    # running totals of the current epoch (all processes), so that an epoch resumed from a
    # mid-epoch checkpoint reports its means over all of its batches
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    epoch_patches: int = 0
    epoch_wait_s: float = 0.0
    epoch_train_s: float = 0.0
    # auxiliary loss terms (penalties, load balancing) summed per kind, counted with the loss
    epoch_aux_sums: dict[str, float] = dataclasses.field(default_factory=dict)

    def next_epoch(self) -> None:
        """Count the finished epoch and clear its running totals."""
        self.epoch += 1
        self.batch = self.epoch_loss_count = self.epoch_patches = 0
        self.epoch_loss_sum = self.epoch_wait_s = self.epoch_train_s = 0.0
        self.epoch_aux_sums = {}


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python/numpy/torch; with ``deterministic`` also force deterministic kernels."""
    set_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def default_split(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` from a ``{"image", "label"}`` dict or an ``(x, y)`` pair."""
    x, y = (batch["image"], batch["label"]) if isinstance(batch, Mapping) else batch[:2]
    plain = lambda t: t.as_tensor() if hasattr(t, "as_tensor") else t  # noqa: E731 (MetaTensor)
    return plain(x), plain(y)


def process_state() -> PartialState:
    """Accelerate's process state; without CUDA, processes started by ``torchrun`` /
    ``accelerate launch`` join a CPU (gloo) process group."""
    return PartialState(cpu=not torch.cuda.is_available())


def leaves_parameters_unused(model: nn.Module) -> bool:
    """Whether a training step may leave trainable parameters of ``model`` without a gradient:
    a sparse mixture of experts runs only the experts its gate selects (and without noisy
    gating never uses its noise weights)."""
    return any(isinstance(m, MoEKANConv) for m in model.modules())


def make_accelerator(cfg: TrainerConfig, run_dir: Path,
                     find_unused_parameters: bool = False) -> Accelerator:
    """Accelerator for ``cfg``: precision (fp16 falls back to fp32 without CUDA), grad
    accumulation, TensorBoard (and wandb) trackers writing under ``run_dir``.
    ``find_unused_parameters``: multi-process (DDP) training accepts steps that leave some
    parameters without a gradient (:func:`leaves_parameters_unused`), at the cost of a graph
    traversal per step."""
    precision = cfg.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        log.warning("trainer.mixed_precision=fp16 needs a CUDA GPU; training in float32")
        precision = "no"
    trackers: list[str] = ["tensorboard"]
    if cfg.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("trainer.wandb=true needs wandb: pip install 'kanseg[wandb]'") from None
        trackers.append("wandb")
    process_state()
    handlers = ([DistributedDataParallelKwargs(find_unused_parameters=True)]
                if find_unused_parameters else [])
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum,
                       log_with=trackers, project_dir=str(run_dir), rng_types=[],
                       step_scheduler_with_optimizer=False, kwargs_handlers=handlers)


def build_optimizer(params: Sequence[nn.Parameter], cfg: TrainerConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "lion":
        return Lion(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def compile_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile(model)``, or ``model`` itself (with the probe's warning) where
    compilation cannot run on ``device`` (no C++ compiler, no Triton...)."""
    if not compile_available(device, "trainer.compile=true: training"):
        return model
    return torch.compile(model)


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def setup_logging(run_dir: Path, main: bool) -> None:
    """Log ``kanseg`` messages to the console (above progress bars) and ``run_dir/train.log``."""
    log.setLevel(logging.INFO if main else logging.WARNING)
    for handler in list(log.handlers):
        if getattr(handler, "_kanseg", False):
            log.removeHandler(handler)
            handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [_TqdmHandler()]
    if main:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._kanseg = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.propagate = False


class Trainer:
    """Train ``model`` with ``loss_fn`` on ``train_loader``; see :meth:`fit`."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor],
                 train_loader: DataLoader, cfg: TrainerConfig, run_dir: str | Path,
                 validate: Validator | None = None, split_batch: BatchSplitter = default_split,
                 accelerator: Accelerator | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.acc = accelerator or make_accelerator(cfg, self.run_dir,
                                                   leaves_parameters_unused(model))
        setup_logging(self.run_dir, self.acc.is_main_process)
        self.validate, self.split_batch = validate, split_batch
        self.loss_fn = loss_fn.to(self.acc.device) if isinstance(loss_fn, nn.Module) else loss_fn
        loader, _ = make_resumable(train_loader, cfg.seed)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        if cfg.channels_last:
            to_channels_last(model)
        optimizer = build_optimizer(self.params, cfg)
        self.model, self.optimizer, self.loader = self.acc.prepare(model, optimizer, loader)
        self.train_forward = (compile_model(self.model, self.acc.device) if cfg.compile
                              else self.model)
        self.steps_per_epoch = math.ceil(len(self.loader) / cfg.grad_accum)
        warmup = (cfg.warmup_steps if cfg.warmup_steps is not None
                  else round(cfg.warmup_epochs * self.steps_per_epoch))
        self._t0 = time.monotonic()  # reset by fit(), minus the time of a resumed run
        self._spent = 0.0  # share of max_minutes spent, measured once per optimizer step
        self.scheduler = build_scheduler(
            self.optimizer.optimizer, self.steps_per_epoch * cfg.max_epochs, warmup,
            cfg.schedule, cfg.min_lr_ratio,
            time_progress=(lambda: self._spent) if cfg.schedule_horizon == "budget" else None)
        self.ema = (AveragedModel(self.acc.unwrap_model(self.model),
                                  multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
                    if cfg.ema else None)
        self.state = TrainState()
        self._aux_sums: dict[str, torch.Tensor] = {}  # this process's, in the current epoch
        self.rows: list[dict[str, Any]] = []
        self.ckpt_root = self.run_dir / "checkpoints"

    # ------------------------------------------------------------------ public
    def fit(self, resume: str | Path | None = None) -> TrainState:
        """Train until ``max_epochs`` or ``max_minutes``; resume exactly from a checkpoint."""
        if resume is not None:
            self._load(resume)
            if self.acc.is_main_process:  # metrics.csv as of the checkpoint
                self._write_metrics()
        self.acc.init_trackers("tb")
        self._t0 = time.monotonic() - self.state.elapsed_s
        try:
            while self.state.epoch < self.cfg.max_epochs:
                finished = self._train_epoch()
                if finished:
                    self.state.next_epoch()
                last = self.state.epoch >= self.cfg.max_epochs or not finished
                metrics = self._maybe_validate(force=last)
                self._end_epoch(metrics, partial=not finished)
                if not finished:
                    log.info("time budget of %.1f min reached", self.cfg.max_minutes)
                    break
        finally:
            self.acc.end_training()
        return self.state

    @property
    def eval_model(self) -> nn.Module:
        """The weights to evaluate and export: the EMA copy when EMA is on."""
        return self.ema.module if self.ema is not None else self.acc.unwrap_model(self.model)

    # ------------------------------------------------------------------ training
    def _train_epoch(self) -> bool:
        """Run (the rest of) the current epoch; False when the time budget ran out."""
        st, acc, cfg = self.state, self.acc, self.cfg
        loader = acc.skip_first_batches(self.loader, st.batch) if st.batch else self.loader
        loader.set_epoch(st.epoch)  # Accelerate loaders pass their epoch on to our sampler
        self.model.train()
        bar = tqdm(total=len(self.loader), initial=st.batch, disable=not acc.is_main_process,
                   desc=f"epoch {st.epoch + 1}/{cfg.max_epochs}", unit="batch", leave=False,
                   dynamic_ncols=True)
        main = acc.is_main_process  # resumed totals are global: restored on one process
        loss_sum = torch.tensor(st.epoch_loss_sum if main else 0.0, device=acc.device)
        count = st.epoch_loss_count if main else 0
        self._aux_sums = {kind: torch.tensor(value if main else 0.0, device=acc.device)
                          for kind, value in st.epoch_aux_sums.items()}
        patches, wait, t_prev = st.epoch_patches, st.epoch_wait_s, time.perf_counter()
        t_start = t_prev - st.epoch_train_s
        for batch in loader:
            t_batch = time.perf_counter()
            wait += t_batch - t_prev
            inputs, targets = self.split_batch(batch)
            with acc.accumulate(self.model):
                with acc.autocast():
                    loss = self.loss_fn(self.train_forward(inputs), targets)
                    aux = collect_auxiliary_losses(self.model, by_kind=True)
                    if aux:
                        loss = loss + sum(aux.values())
                acc.backward(loss)
                st.batch += 1
                if torch.isfinite(loss.detach()):
                    loss_sum += loss.detach().float()
                    count += 1
                    for kind, term in aux.items():
                        self._aux_sums[kind] = self._aux_sums.get(kind, 0.0) + term.detach().float()
                patches += len(inputs) * acc.num_processes
                stepped = self._optimizer_step() if acc.sync_gradients else False
            t_prev = time.perf_counter()
            bar.update(1)
            if stepped and st.step % cfg.log_every == 0:
                rate = patches / max(t_prev - t_start, 1e-9)
                mean = (loss_sum / max(count, 1)).item()
                bar.set_postfix(loss=f"{mean:.4f}", patches_s=f"{rate:.2f}", eta=self._eta(bar))
                acc.log({"train/loss": mean, "train/lr": self.scheduler.get_last_lr()[0],
                         "train/patches_per_s": rate}, step=st.step)
            if stepped and cfg.ckpt_every_steps and st.step % cfg.ckpt_every_steps == 0:
                self._record_totals(loss_sum, count, patches, wait, t_start)
                self._save(f"step-{st.step:08d}")
            if stepped and self._out_of_time():
                bar.close()
                self._epoch_stats = self._reduce_stats(loss_sum, count, patches, wait, t_start)
                return False
        bar.close()
        self._epoch_stats = self._reduce_stats(loss_sum, count, patches, wait, t_start)
        return True

    def _optimizer_step(self) -> bool:
        """Clip, step (unless a gradient is non-finite), schedule and update the EMA."""
        st, cfg = self.state, self.cfg
        norm = self.acc.clip_grad_norm_(self.params, cfg.grad_clip or math.inf)
        finite = norm is not None and bool(torch.isfinite(norm))
        if self.acc.scaler is not None:  # fp16: the grad scaler skips overflowing steps itself
            self.optimizer.step()
            stepped = finite and not self.optimizer.step_was_skipped
        else:
            stepped = finite
            if stepped:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not stepped:
            st.skipped += 1
            st.nan_streak += 1
            log.warning("non-finite loss/gradient at step %d: step skipped (%d in a row)",
                        st.step + 1, st.nan_streak)
            if st.nan_streak >= cfg.nan_max_consecutive:
                raise TrainingDiverged(
                    f"training diverged: {st.nan_streak} consecutive steps had a non-finite loss "
                    f"or gradient (trainer.nan_max_consecutive={cfg.nan_max_consecutive}) at "
                    f"epoch {st.epoch + 1}, step {st.step}. Lower trainer.lr, set "
                    "trainer.grad_clip, or use bf16 instead of fp16; resume from "
                    f"{self.ckpt_root / 'last'} if it exists.")
            return False
        st.nan_streak = 0
        st.step += 1
        if cfg.max_minutes is not None:
            self._spent = self._budget_spent()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.acc.unwrap_model(self.model))
        return True

    def _budget_spent(self) -> float:
        """Share of ``max_minutes`` spent, as the main process measures it (shared by all)."""
        spent = torch.tensor([(time.monotonic() - self._t0) / (60 * self.cfg.max_minutes)],
                             device=self.acc.device)
        if self.acc.num_processes > 1:
            spent = broadcast(spent)
        return float(spent.item())

    def _out_of_time(self) -> bool:
        """Whether ``max_minutes`` was spent at the last optimizer step."""
        return self._spent > 1.0

    def _eta(self, bar: tqdm) -> str:
        """Estimated time to the end of training (epochs x batches at the current rate)."""
        rate = bar.format_dict.get("rate") or 0
        left = (bar.total - bar.n) + bar.total * (self.cfg.max_epochs - self.state.epoch - 1)
        return tqdm.format_interval(left / rate) if rate else "?"

    def _record_totals(self, loss_sum: torch.Tensor, count: int, patches: int, wait: float,
                       t_start: float) -> None:
        """Store the epoch's running totals (loss summed over all processes) in the state."""
        st = self.state
        totals = self.acc.reduce(torch.stack([loss_sum, torch.tensor(float(count),
                                                                     device=self.acc.device)]))
        st.epoch_loss_sum, st.epoch_loss_count = totals[0].item(), int(totals[1].item())
        st.epoch_patches, st.epoch_wait_s = patches, wait
        st.epoch_aux_sums = {kind: self.acc.reduce(total).item()
                             for kind, total in sorted(self._aux_sums.items())}
        st.epoch_train_s = time.perf_counter() - t_start

    def _reduce_stats(self, loss_sum: torch.Tensor, count: int, patches: int, wait: float,
                      t_start: float) -> dict[str, float]:
        """The epoch's mean loss, patches/s and data-wait fraction (recorded in the state)."""
        self._record_totals(loss_sum, count, patches, wait, t_start)
        st = self.state
        elapsed = max(st.epoch_train_s, 1e-9)
        count = max(st.epoch_loss_count, 1)
        stats = {"train_loss": st.epoch_loss_sum / count,
                 "patches_per_s": st.epoch_patches / elapsed,
                 "data_wait_frac": st.epoch_wait_s / elapsed}
        aux = {f"aux_{kind}": total / count for kind, total in st.epoch_aux_sums.items()}
        if aux:  # train_loss includes them; aux_loss is their sum
            stats.update(aux_loss=sum(aux.values()), **aux)
        return stats

    # ------------------------------------------------------------------ epoch end
    def _maybe_validate(self, force: bool) -> dict[str, float]:
        if self.validate is None or not (force or self.state.epoch % self.cfg.val_every == 0):
            return {}
        model = self.eval_model
        model.eval()
        with torch.no_grad():
            metrics = self.validate(model, self.acc)
        self.model.train()
        if self.cfg.monitor not in metrics:
            raise ValueError(f"trainer.monitor '{self.cfg.monitor}' is not among the validation "
                           f"metrics {sorted(metrics)}")
        return metrics

    def _end_epoch(self, metrics: dict[str, float], partial: bool) -> None:
        st = self.state
        st.elapsed_s = time.monotonic() - self._t0
        improved = False
        if metrics:
            st.metric = value = float(metrics[self.cfg.monitor])
            better = (value > st.best if self.cfg.monitor_mode == "max" else value < st.best) \
                if st.best is not None else math.isfinite(value)
            if better:
                st.best, st.best_epoch, improved = value, st.epoch, True
        row = {"epoch": st.epoch, "step": st.step, "lr": self.scheduler.get_last_lr()[0],
               **self._epoch_stats, "skipped_steps": st.skipped, "time_s": round(st.elapsed_s, 2),
               **{f"val_{k}": v for k, v in metrics.items()}}
        self.rows.append(row)
        self.acc.log({f"epoch/{k}": v for k, v in row.items() if k != "epoch"}, step=st.step)
        val = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        aux = f" (aux {row['aux_loss']:.4g})" if "aux_loss" in row else ""
        log.info("epoch %d%s step %d: loss %.4f%s, %.2f patches/s, data wait %.0f%%%s%s",
                 st.epoch + partial, " (partial)" if partial else "", st.step, row["train_loss"], aux,
                 row["patches_per_s"], 100 * row["data_wait_frac"], f"; {val}" if val else "",
                 " (best)" if improved else "")
        name = f"step-{st.step:08d}" if partial else f"epoch-{st.epoch:04d}"
        self._save(name, best=improved)
        if self.acc.is_main_process:
            self._write_metrics()

    # ------------------------------------------------------------------ persistence
    def _save(self, name: str, best: bool = False) -> None:
        """Write a full checkpoint atomically, point ``last`` (and ``best``) at it, prune."""
        acc, st = self.acc, self.state
        st.elapsed_s = time.monotonic() - self._t0
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.stage(self.ckpt_root, name)
        acc.wait_for_everyone()
        tmp = self.ckpt_root / f".tmp-{name}"
        ckpt.save_state(ckpt.rng_state(), tmp / f"rng-{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._write_checkpoint(tmp, name, best)
        acc.wait_for_everyone()

    def _write_checkpoint(self, tmp: Path, name: str, best: bool) -> None:
        st = self.state
        try:
            ckpt.save_weights(self.eval_model.state_dict(), tmp / ckpt.WEIGHTS)
            state: dict[str, Any] = {
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "trainer": dataclasses.asdict(st), "num_processes": self.acc.num_processes,
                "rows": self.rows}
            if self.acc.scaler is not None:
                state["scaler"] = self.acc.scaler.state_dict()
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
                ckpt.save_weights(self.acc.unwrap_model(self.model).state_dict(),
                                  tmp / ckpt.TRAIN_WEIGHTS)
            ckpt.save_state(state, tmp / ckpt.STATE)
            ckpt.write_meta(tmp, {"epoch": st.epoch, "step": st.step, "metric": st.metric,
                                  "monitor": self.cfg.monitor, "best": st.best,
                                  "batch_in_epoch": st.batch})
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, OSError):  # name the checkpoint and what was kept
                last = self.ckpt_root / "last"
                kept = f"; {last} -> {os.readlink(last)} is kept" if last.is_symlink() else ""
                raise OSError(err.errno, f"cannot write checkpoint {self.ckpt_root / name} "
                                         f"({err.strerror}); its partial files were "
                                         f"removed{kept}") from err
            raise
        ckpt.publish(tmp, name)
        ckpt.link(self.ckpt_root, "last", name)
        if best:
            ckpt.link(self.ckpt_root, "best", name)
        ckpt.prune(self.ckpt_root, self.cfg.keep_last)

    def _load(self, path: str | Path) -> None:
        folder = ckpt.resolve(path)
        if not (folder / ckpt.STATE).is_file():
            raise FileNotFoundError(f"{folder} holds weights only, not a resumable training state")
        state = ckpt.load_state(folder / ckpt.STATE)
        weights = folder / (ckpt.TRAIN_WEIGHTS if "ema" in state else ckpt.WEIGHTS)
        self.acc.unwrap_model(self.model).load_state_dict(ckpt.load_weights(weights))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.acc.scaler is not None and "scaler" in state:
            self.acc.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.state = TrainState(**state["trainer"])
        self.rows = state.get("rows") or [r for r in self._read_metrics()  # older checkpoints
                                          if int(r["epoch"]) <= self.state.epoch]
        rng = folder / f"rng-{self.acc.process_index}.pt"
        if state.get("num_processes") != self.acc.num_processes or not rng.is_file():
            log.warning("resuming with %d processes from a %s-process checkpoint: the data "
                        "order is kept, random states are re-seeded", self.acc.num_processes,
                        state.get("num_processes"))
            seed_everything(self.cfg.seed + self.state.step, self.cfg.deterministic)
        else:
            ckpt.set_rng_state(ckpt.load_state(rng))
        log.info("resumed from %s (epoch %d, step %d)", folder, self.state.epoch, self.state.step)

    def _read_metrics(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.csv"
        if not path.is_file():
            return []
        with open(path, newline="") as fh:
            return [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(fh)]

    def _write_metrics(self) -> None:
        """``metrics.csv`` (one row per epoch) and the learning curves, written atomically."""
        keys: list[str] = []
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.run_dir / "metrics.csv", buf.getvalue())
        plot_curves(self.rows, self.run_dir)


def _number(text: str) -> Any:
    if text == "":
        return None
    try:
        return float(text) if any(c in text for c in ".eEn") else int(text)
    except ValueError:
        return text
