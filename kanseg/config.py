"""The typed schema of kanseg YAML configs: ``data``, ``model``, ``trainer``, ``loss``,
``inference``, ``peft``; loading with ``--set a.b=v`` overrides, and saving the resolved config.

``model`` is ``{name: <registered model>, <constructor kwargs>...}``; its kwargs are checked by
building the model, so an unknown or bad option is reported as ``model.<key>``.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml

from .data.config import DataConfig
from .files import atomic_write_text
from .engine.config import LossConfig, TrainerConfig
from .schema import ConfigError, from_dict, to_dict

SECTIONS = ("data", "model", "trainer", "loss", "inference", "peft")


@dataclass
class ModelConfig:
    """A registered model name and the keyword arguments of ``create_model``."""

    name: str = "ukanet"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self):
        """Instantiate the model (``kanseg.models.create_model(name, **kwargs)``)."""
        from .models import create_model

        return create_model(self.name, **self.kwargs)


@dataclass
class InferenceConfig:
    """Sliding-window inference: ROI (null -> data.patch_size), blending, TTA, outputs;
    ``channels_last: true`` stores the network's weights channels-last, as
    ``trainer.channels_last`` does in training (faster 3D convolutions on CPU)."""

    roi_size: Optional[list[int]] = None
    overlap: float = 0.5
    mode: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = 2
    tta_flips: bool = False
    save_probabilities: bool = False
    threshold: float = 0.5
    device: str = "auto"
    channels_last: bool = False
    # label maps: "auto" -> <id>.png (H x W) for PNG/JPEG/TIFF/BMP inputs, <id>.nii.gz
    # otherwise, plus <id>.seg.dcm (DICOM-SEG) for DICOM series inputs
    output_format: Literal["auto", "nifti", "png", "dicom-seg"] = "auto"

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {self.sw_batch_size}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")


@dataclass
class PeftConfig:
    """Parameter-efficient adaptation (kanpeft) of the network that ``trainer.init_from`` loads.

    ``method``: null (no adapter: every parameter trains, or with ``trainable`` only those
    modules, e.g. ``[up, decoder, heads]`` for decoder-only fine-tuning), ``basis``, ``scales``
    or ``lora``.
    ``options``: the method's options (``target_modules``: regexes of the KAN layers to adapt,
    null = all; ``train_norm``; ``r`` / ``alpha`` of lora; ``degrees`` / ``extra_degrees`` of
    basis; ``base`` / ``basis`` / ``degree`` / ``shift`` of scales). ``trainable``: modules that
    train in full, e.g. ``[heads, decoder]``.
    """

    method: Optional[str] = None
    options: dict[str, Any] = field(default_factory=dict)
    trainable: list[str] = field(default_factory=list)


@dataclass
class Config:
    """A whole kanseg config."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)

    @property
    def roi_size(self) -> list[int]:
        """Sliding-window ROI: ``inference.roi_size`` or else ``data.patch_size``."""
        return list(self.inference.roi_size or self.data.patch_size)


def config_from_dict(raw: Any, validate_model: bool = True) -> Config:
    """Validate a plain mapping into a :class:`Config` (ConfigError naming the key path)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping with sections {', '.join(SECTIONS)}, "
                          f"got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}'; allowed top-level sections: "
                          f"{', '.join(SECTIONS)}")
    cfg = Config(
        data=from_dict(DataConfig, raw.get("data"), "data"),
        model=_model_section(raw.get("model")),
        trainer=from_dict(TrainerConfig, raw.get("trainer"), "trainer"),
        loss=from_dict(LossConfig, raw.get("loss"), "loss"),
        inference=from_dict(InferenceConfig, raw.get("inference"), "inference"),
        peft=from_dict(PeftConfig, raw.get("peft"), "peft"),
    )
    check_peft_config(cfg.peft)
    _check_consistency(cfg)
    if validate_model:
        check_model(cfg.model)
    return cfg


def _model_section(raw: Any) -> ModelConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"model: expected a mapping {{name: ..., <options>}}, got {raw!r}")
    kwargs = dict(raw)
    name = kwargs.pop("name", "ukanet")
    if not isinstance(name, str):
        raise ConfigError(f"model.name: expected str, got {name!r}")
    return ModelConfig(name, kwargs)


def _check_consistency(cfg: Config) -> None:
    dims = cfg.data.spatial_dims
    model_dims = cfg.model.kwargs.get("spatial_dims")
    if model_dims is not None and model_dims != dims:
        raise ConfigError(f"model.spatial_dims ({model_dims}) must equal data.spatial_dims ({dims})")
    roi = cfg.inference.roi_size
    if roi is not None and (len(roi) != dims or min(roi) < 1):
        raise ConfigError(f"inference.roi_size: expected {dims} positive sizes or null, got {roi}")
    from .engine.losses import resolve_activation

    if cfg.data.resolved_label_mode is None:  # nnunet: dataset.json decides, checked at train
        return
    try:
        resolve_activation(cfg.loss, cfg.data.resolved_label_mode == "regions")
    except ValueError as err:
        raise ConfigError(f"loss: {err}") from None


def check_peft_config(peft: PeftConfig) -> None:
    """Check ``peft.method`` and ``peft.options`` without a model (errors name ``peft.<key>``),
    with kanpeft's method configs."""
    if peft.method is None:
        unknown = sorted(set(peft.options) - {"train_norm"})
        if unknown:
            raise ConfigError(f"peft.options.{unknown[0]}: without peft.method only train_norm "
                              "applies (the peft.trainable modules train in full)")
        if peft.options.get("train_norm") and not peft.trainable:
            raise ConfigError("peft.options.train_norm: trains the norms of an adapted network; "
                              "give a method in peft.method or modules that train in full in "
                              "peft.trainable")
        return
    from kanpeft.api import method_config

    if "trainable_modules" in peft.options:
        raise ConfigError("peft.options.trainable_modules: list the modules that train in full "
                          "in peft.trainable")
    try:
        method_config(peft.method, peft.options)
    except ConfigError as err:
        raise ConfigError(str(err).replace(f"{peft.method} options", "peft.options")) from None
    except ValueError as err:  # an unknown method
        raise ConfigError(f"peft.method: {err}") from None


def check_model(model: ModelConfig) -> None:
    """Put deprecated option names of ``model.kwargs`` under their new names (in place, so a
    saved config uses them), then build the model once (on the meta device: no memory, no init
    cost); report a bad name or option as ``model.<key>`` (the key the registry's
    :class:`OptionError` carries)."""
    import torch

    from kanseg.layers.errors import OptionError, UnknownOptionError
    from kanseg.models.registry import renamed_model_options

    try:
        model.kwargs = renamed_model_options(model.name, model.kwargs, stacklevel=2)
        with torch.device("meta"):
            model.build()
    except UnknownOptionError as err:
        raise ConfigError(f"unknown key 'model.{err.key}': {err}") from None
    except OptionError as err:
        raise ConfigError(f"model.{err.key}: {err}") from None
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"model ({model.name}): {err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=v"`` -> (``["a", "b"]``, YAML-parsed ``v``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
        raise ConfigError(f"--set expects key.path=value (e.g. trainer.max_epochs=2), got {text!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse value {value!r} as YAML: {err}") from None
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Set each ``a.b=v`` in the nested mapping ``raw`` (in place, returned)."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: '{'.'.join(path[:i + 1])}' is "
                                  f"{child!r}, not a section")
            node = child
        node[path[-1]] = value
    return raw


def _drop_foreign_model_options(raw: dict, file_model: dict, overrides: Sequence[str]) -> None:
    """When ``--set model.name=X`` switches the network (e.g. to a MONAI baseline), drop the
    file's model options that X does not take, with a warning naming them. Options given
    with ``--set`` are kept (and checked as usual)."""
    from .models import accepted_arguments, list_models

    model = raw.get("model")
    name = model.get("name") if isinstance(model, dict) else None
    if name == file_model.get("name", "ukanet") or name not in list_models():
        return
    explicit = {path[1] for path, _ in map(parse_override, overrides)
                if len(path) == 2 and path[0] == "model"}
    accepted = accepted_arguments(name, model)
    dropped = sorted(k for k in file_model
                     if k != "name" and k not in explicit and k not in accepted)
    for key in dropped:
        del model[key]
    if dropped:
        warnings.warn(f"model.name={name}: dropped the config's model options that {name} does "
                      f"not take: {', '.join(dropped)}", stacklevel=3)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path, overrides: Sequence[str] = (),
                validate_model: bool = True) -> Config:
    """Read, override and validate a YAML config; errors name the file and the key path."""
    raw = read_yaml(path)
    file_model = dict(raw.get("model") or {}) if isinstance(raw.get("model"), dict) else {}
    raw = apply_overrides(raw, overrides)
    _drop_foreign_model_options(raw, file_model, overrides)
    try:
        return config_from_dict(raw, validate_model)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def config_to_dict(cfg: Config) -> dict:
    """Plain mapping of ``cfg`` in the YAML shape (model kwargs flattened next to name)."""
    out = {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    out["model"] = {"name": cfg.model.name, **to_dict(cfg.model.kwargs)}
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
