"""Import and export torch-conv-kan VGG-KAGN checkpoints (``config.json`` + ``model.safetensors``;
import also its VGGKALN and MoE VGG ones), and import its ResKANet / MoEResKANet state dicts.

torch-conv-kan keeps one module per group (``base_conv.{g}``, ``layer_norm.{g}``,
``inner_proj.{g}``, ``out_proj.{g}``) and stacks the Gram basis degree-major inside a group
(expanded channel ``d * in_g + c``); our layers keep one tensor per weight, channel-major
(``c * n_basis + d``). This module maps between the two, strictly: a missing, unknown or
wrongly shaped key is an error listing the offenders, never a partial load.
"""
from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kanseg.layers import KANBottleneckConv, KANConv
from kanseg.layers.moe import MoEKANConv

from kanseg.files import atomic_write

from .io import load_state
from .registry import create_model
from .reskanet import EXPANSION, ResKANet, reskanet_name
from .vgg import VGG_SA_TYPES, VGG_TYPES, VGGKAN

#: config keys of torch-conv-kan's VGGKAGN / VGGKAGN_BN constructors
_CONFIG_KEYS = {"input_channels", "num_classes", "groups", "degree", "dropout", "l1_decay",
                "dropout_linear", "vgg_type", "head_type", "expected_feature_shape",
                "width_scale", "affine", "last_attention", "sa_inner_projection",
                "num_experts", "noisy_gating", "k"}  # the last three: MoE VGGs
_NORM_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class CheckpointError(ValueError):
    """A torch-conv-kan checkpoint that does not match the model it describes."""


# ----------------------------------------------------------------------------- layout maps
def degree_major_to_channel_major(w: Tensor, n_basis: int) -> Tensor:
    """(out, n_basis * in, *k), index ``d * in + c`` -> (out, in * n_basis, *k), ``c * n + d``."""
    out, expanded, *k = w.shape
    return w.reshape(out, n_basis, expanded // n_basis, *k).transpose(1, 2).reshape(w.shape)


def channel_major_to_degree_major(w: Tensor, n_basis: int) -> Tensor:
    """Inverse of :func:`degree_major_to_channel_major`."""
    out, expanded, *k = w.shape
    return w.reshape(out, expanded // n_basis, n_basis, *k).transpose(1, 2).reshape(w.shape)


def norm_state_to_ours(theirs: dict[str, Tensor], groups: int) -> dict[str, Tensor]:
    """Our ``norm.*`` tensors from torch-conv-kan's per-group ``layer_norm.{g}.*`` (channels
    concatenated over groups; ``num_batches_tracked`` is shared)."""
    ours = {}
    for name in _NORM_KEYS:
        parts = [theirs[f"layer_norm.{g}.{name}"] for g in range(groups)
                 if f"layer_norm.{g}.{name}" in theirs]
        if parts:
            ours[f"norm.{name}"] = parts[0] if name == "num_batches_tracked" else torch.cat(parts)
    return ours


def layer_state_to_ours(theirs: dict[str, Tensor], layer: nn.Module, groups: int) -> dict[str, Tensor]:
    """One layer's tensors (their names, prefix removed) -> our state-dict names: KAGN (plain or
    bottleneck), and the other ``base_conv`` + degree-major ``poly_weights`` families (KALN,
    KAJN), which have no ``beta_weights``. MoE layers: :func:`.convert_moe.moe_state_to_ours`."""
    if _is_moe(layer):
        from .convert_moe import moe_state_to_ours  # noqa: PLC0415 - it builds on this module
        return moe_state_to_ours(theirs, layer, groups)
    core = layer.core if isinstance(layer, KANBottleneckConv) else layer
    prefix = "core." if core is not layer else ""
    n_basis = core.basis.n_basis
    poly = theirs["poly_weights"]
    ours = {
        "base_weight": torch.cat([theirs[f"base_conv.{g}.weight"] for g in range(groups)]),
        f"{prefix}basis_weight": torch.cat(
            [degree_major_to_channel_major(poly[g], n_basis) for g in range(groups)]),
    }
    if "beta_weights" in theirs:
        ours[f"{prefix}basis.beta_weights"] = theirs["beta_weights"]
    if prefix:
        for proj in ("inner_proj", "out_proj"):
            ours[f"{proj}.weight"] = torch.cat(
                [theirs[f"{proj}.{g}.weight"] for g in range(groups)])
    ours.update(norm_state_to_ours(theirs, groups))
    return ours


def layer_to_theirs(ours: dict[str, Tensor], layer: nn.Module, groups: int) -> dict[str, Tensor]:
    """Inverse of :func:`layer_state_to_ours`."""
    if _is_moe(layer):
        from .convert_moe import moe_state_to_theirs  # noqa: PLC0415 - it builds on this module
        return moe_state_to_theirs(ours, layer, groups)
    core = layer.core if isinstance(layer, KANBottleneckConv) else layer
    prefix = "core." if core is not layer else ""
    n_basis = core.basis.n_basis
    theirs: dict[str, Tensor] = {}
    for g, w in enumerate(ours["base_weight"].chunk(groups)):
        theirs[f"base_conv.{g}.weight"] = w
    theirs["poly_weights"] = torch.stack(
        [channel_major_to_degree_major(w, n_basis)
         for w in ours[f"{prefix}basis_weight"].chunk(groups)])
    if f"{prefix}basis.beta_weights" in ours:  # KAGN; KALN / KAJN have none
        theirs["beta_weights"] = ours[f"{prefix}basis.beta_weights"]
    if prefix:
        for proj in ("inner_proj", "out_proj"):
            for g, w in enumerate(ours[f"{proj}.weight"].chunk(groups)):
                theirs[f"{proj}.{g}.weight"] = w
    theirs.update(norm_state_to_theirs(ours, groups))
    return theirs


def norm_state_to_theirs(ours: dict[str, Tensor], groups: int) -> dict[str, Tensor]:
    """Inverse of :func:`norm_state_to_ours`."""
    theirs = {}
    for name in _NORM_KEYS:
        if f"norm.{name}" in ours:
            value = ours[f"norm.{name}"]
            for g in range(groups):
                theirs[f"layer_norm.{g}.{name}"] = (
                    value if name == "num_batches_tracked" else value.chunk(groups)[g])
    return theirs


def _is_moe(layer: nn.Module) -> bool:
    """A mixture of experts, or a bottleneck conv whose inner conv is one."""
    return isinstance(layer, MoEKANConv) or isinstance(getattr(layer, "core", None), MoEKANConv)


def _kan_layers(model: nn.Module,
               under: str | tuple[str, ...] = "features.") -> dict[str, nn.Module]:
    """The KAN convs of ``model`` whose names start with ``under`` by state-dict prefix
    (``features.<i>``, or ``features.<i>.proj_q`` inside a self-attention layer), not those
    inside another."""
    layers: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if (isinstance(m, (KANConv, KANBottleneckConv, MoEKANConv))
                and name.startswith(under) and _owner(name + ".", layers) is None):
            layers[name] = m
    return layers


def _owner(key: str, layers: dict) -> str | None:
    """The name in ``layers`` that the state-dict ``key`` lies under (None: none)."""
    parts = key.split(".")
    return next((p for p in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
                 if p in layers), None)


def convert_state_dict(state_dict: dict[str, Tensor], model: nn.Module,
                       under: str | tuple[str, ...] = "features.") -> dict[str, Tensor]:
    """torch-conv-kan state dict (VGG, or with our layer names) -> ``model``'s state dict; the
    KAN convs under ``under`` are mapped layer by layer. Strict: raises
    :class:`CheckpointError` listing missing, unexpected and mis-shaped keys."""
    layers = _kan_layers(model, under)
    by_layer: dict[str, dict[str, Tensor]] = {name: {} for name in layers}
    other: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        layer = _owner(key, by_layer)
        if layer is not None:
            by_layer[layer][key[len(layer) + 1:]] = value
        else:
            other[key] = value
    target = model.state_dict()
    missing: list[str] = []
    unexpected: list[str] = []
    shapes: list[str] = []
    converted: dict[str, Tensor] = {}
    for name, module in layers.items():
        theirs = by_layer[name]
        expected = set(layer_to_theirs(module.state_dict(), module, module.groups))
        missing += [f"{name}.{k}" for k in sorted(expected - set(theirs))]
        unexpected += [f"{name}.{k}" for k in sorted(set(theirs) - expected)]
        if not expected <= set(theirs):
            continue
        try:
            mapped = layer_state_to_ours(theirs, module, module.groups)
        except (RuntimeError, IndexError) as err:  # a tensor that cannot be regrouped
            shapes.append(f"{name}: {err}")
            continue
        converted.update({f"{name}.{k}": v for k, v in mapped.items()})
    in_layers = {k for k in target if _owner(k, layers) is not None}
    missing += sorted(set(target) - in_layers - set(other))
    unexpected += sorted(set(other) - set(target))
    converted.update({k: v for k, v in other.items() if k in target})
    shapes += [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
               for k, v in converted.items() if v.shape != target[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            "torch-conv-kan checkpoint does not match the model built from its config:"
            + (f"\n  missing keys: {missing}" if missing else "")
            + (f"\n  unexpected keys: {unexpected}" if unexpected else "")
            + (f"\n  shape mismatches: {shapes}" if shapes else "")
        )
    return converted


# ----------------------------------------------------------------------------- config
def model_from_config(config: dict[str, Any], batch_norm: bool, bottleneck: bool,
                      moe: bool = False, family: str = "kagn",
                      head_activation: str | None = None) -> VGGKAN:
    """Our :class:`VGGKAN` for a torch-conv-kan ``config.json`` (VGGKAGN or VGGKAGN_BN; with
    ``moe``, MoEVGGKAGN or MoE_VGGKAGN_BN, whose bottleneck convs mix only their inner conv;
    ``family="kaln"``: VGGKALN, whose layers the same mapping reads); ``head_activation``: that
    of its KAN head layers (None: no KAN head)."""
    unknown = sorted(set(config) - _CONFIG_KEYS)
    if unknown:
        raise CheckpointError(
            f"config.json has keys {unknown} that a torch-conv-kan VGG-KAGN config does not; "
            f"expected a subset of {sorted(_CONFIG_KEYS)}"
        )
    vgg_type = config.get("vgg_type", "VGG11")
    if vgg_type not in VGG_TYPES + VGG_SA_TYPES:
        raise CheckpointError(f"config.json: vgg_type must be one of "
                              f"{VGG_TYPES + VGG_SA_TYPES}, got {vgg_type!r}")
    return create_model(
        "vgg_kan",
        in_channels=config["input_channels"],
        num_classes=config["num_classes"],
        family=family,
        vgg_type=vgg_type,
        head_type=config.get("head_type", "Linear"),
        expected_feature_shape=tuple(config.get("expected_feature_shape", (7, 7))),
        width_scale=config.get("width_scale", 1),
        norm="batch" if batch_norm else "instance",
        affine=config.get("affine", False),
        bottleneck_convs=bottleneck,
        dim_reduction=8.0,
        groups=config.get("groups", 1),
        dropout=config.get("dropout", 0.0),
        dropout_linear=config.get("dropout_linear", 0.25),
        degree=config.get("degree", 3),
        last_attention=bool(config.get("last_attention", False)),
        sa_inner_projection=config.get("sa_inner_projection"),
        **(dict(moe_experts=config.get("num_experts", 8), moe_top_k=config.get("k", 2),
                moe_noisy_gating=config.get("noisy_gating", True), moe_inner=bottleneck)
           if moe else {}),
        **({"head_activation": head_activation} if head_activation is not None else {}),
    )


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        loaded = load_state(path)
        if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
            raise CheckpointError(f"{path}: expected a state dict (name -> tensor)")
        return loaded
    raise CheckpointError(f"{path}: expected a .safetensors, .pt or .pth state-dict file")


def _resolve(path_or_repo_id: str | os.PathLike) -> tuple[dict[str, Any] | None, Path]:
    """(config or None, weights file) for a folder, a state-dict file, or a hub repo id."""
    path = Path(path_or_repo_id)
    if path.is_file():
        config_file = path.parent / "config.json"
        return (json.loads(config_file.read_text()) if config_file.is_file() else None), path
    if not path.is_dir():
        if path.is_absolute() or str(path_or_repo_id).count("/") != 1:
            raise FileNotFoundError(f"{path_or_repo_id}: no such checkpoint folder or file")
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(path_or_repo_id),
                                          allow_patterns=["config.json", "*.safetensors"]))
        except Exception as err:  # offline, unknown repo, gated repo...
            raise CheckpointError(
                f"{path_or_repo_id!r} is not a local folder or file, and downloading it from "
                f"the HuggingFace hub failed: {type(err).__name__}: {err}") from None
    weights = path / "model.safetensors"
    config_file = path / "config.json"
    for needed in (weights, config_file):
        if not needed.is_file():
            raise FileNotFoundError(f"{path}: missing {needed.name} (torch-conv-kan checkpoint "
                                    f"folders hold config.json and model.safetensors)")
    return json.loads(config_file.read_text()), weights


def load_torch_conv_kan(path_or_repo_id: str | os.PathLike,
                        config: dict[str, Any] | None = None) -> VGGKAN | ResKANet:
    """Build our VGG-KAN or ResKANet from a torch-conv-kan checkpoint and load its weights.

    ``path_or_repo_id``: a folder with ``config.json`` + ``model.safetensors``, a bare state-dict
    file (``.safetensors``, or ``.pt``/``.pth`` loaded with ``weights_only=True``; its config is
    the ``config.json`` beside it or ``config``), or a HuggingFace hub repo id such as
    ``brivangl/vgg_kagn11_v2``. The layout is read off the keys: ``layer1.*`` keys make a
    ResKANet / MoEResKANet (:func:`reskanet_from_state_dict`), anything else a VGG
    (:func:`vgg_from_state_dict`: VGGKAGN, VGGKAGN_BN, MoEVGGKAGN, MoE_VGGKAGN_BN and VGGKALN,
    ``sa`` types, ``last_attention``, L1 wrappers and Linear / VGG / Matryoshka heads
    included). Returns the model in eval mode.
    """
    found_config, weights = _resolve(path_or_repo_id)
    config = config if config is not None else found_config
    if config is None:
        raise CheckpointError(f"{weights}: no config.json beside it; pass config=... "
                              f"(torch-conv-kan constructor keyword arguments)")
    state_dict = _read_state_dict(weights)
    is_reskanet = any(k.startswith("layer1.") for k in state_dict)
    from_state_dict = reskanet_from_state_dict if is_reskanet else vgg_from_state_dict
    try:
        return from_state_dict(state_dict, config).eval()
    except CheckpointError as err:
        raise CheckpointError(f"{weights}: {err}") from None


#: torch-conv-kan VGG heads of KAN layers (``mlp_kagn`` / ``mlp_kaln``): checkpoints of these do
#: not map (``convert_torch_conv_kan`` converts such VGG instances, ``head_activation="gelu"``)
_KAN_HEADS = ("KAN", "HiddenKAN", "KANtryoshka")


def vgg_key_to_ours(key: str) -> str:
    """A torch-conv-kan VGG state-dict key -> ours: L1 wrappers (``features.<i>.module.``,
    ``l1_decay > 0``) dropped, MatryoshkaHead's ``nesting_classifier_<i>`` ->
    ``classifiers.<i>``."""
    key = re.sub(r"^(features\.\d+)\.module\.", r"\1.", key)
    return re.sub(r"^(classifier\.\d+)\.nesting_classifier_(\d+)\.", r"\1.classifiers.\2.", key)


def _vgg_key_to_theirs(key: str) -> str:
    """Our VGG head key -> torch-conv-kan's (MatryoshkaHead's layer names)."""
    return re.sub(r"^(classifier\.\d+)\.classifiers\.(\d+)\.", r"\1.nesting_classifier_\2.", key)


def vgg_from_state_dict(state_dict: dict[str, Tensor], config: dict[str, Any]) -> VGGKAN:
    """Our VGG-KAN for a torch-conv-kan VGG ``config`` (VGGKAGN, VGGKAGN_BN, MoEVGGKAGN,
    MoE_VGGKAGN_BN, VGGKALN) with the weights of its ``state_dict`` (strict:
    :class:`CheckpointError` lists what does not match; keys as :func:`vgg_key_to_ours`).
    BatchNorm is inferred from ``running_mean`` keys, bottleneck layers from
    ``inner_proj``/``out_proj`` keys, mixtures of experts (its MoE VGGs) from ``w_gate`` keys,
    KALN convs (VGGKALN) from the absence of ``beta_weights``. KAN heads are refused."""
    if config.get("head_type", "Linear") in _KAN_HEADS:
        raise CheckpointError(f"config.json: head_type={config['head_type']!r} does not load: "
                              "the checkpoint mapping does not read KAN head layers (heads that "
                              "load: Linear, VGG, Matryoshka, none; convert_torch_conv_kan "
                              "converts a VGG instance with any head)")
    state = {vgg_key_to_ours(k): v for k, v in state_dict.items()}
    batch_norm = any(k.endswith("running_mean") for k in state)
    bottleneck = any(".out_proj." in k for k in state)  # attention has inner_proj too
    moe = any(k.endswith(".w_gate") for k in state)
    family = "kagn" if any(k.endswith("beta_weights") for k in state) else "kaln"
    model = model_from_config(config, batch_norm, bottleneck, moe, family=family)
    model.load_state_dict(convert_state_dict(state, model), strict=True)
    return model


# ----------------------------------------------------------------------------- ResKANet
#: keyword arguments of torch-conv-kan's ResKANet / MoEResKANet that a ResKANet config may give
_RESKANET_KEYS = {"input_channels", "num_classes", "layers", "groups", "width_per_group",
                  "width_scale", "degree", "affine", "dropout", "dropout_linear", "l1_decay",
                  "use_first_maxpool", "fcnv_kernel_size", "fcnv_stride", "fcnv_padding",
                  "hidden_layer_dim", "replace_stride_with_dilation", "num_experts",
                  "noisy_gating", "k"}
#: MoEResKANet's loss averages its 4 stages' summed MoE losses (coefficient 1e-2 each)
MOE_RESKANET_LOSS_COEF = 1e-2 / 4
_RESKANET_CONV = re.compile(r"layer([1-4])\.(\d+)\.(conv[1-3]|downsample)\.(?:module\.)?(.*)")


def _reskanet_key(key: str) -> str:
    """A torch-conv-kan ResKANet state-dict key -> ours (``style="torch_conv_kan"``); L1
    wrappers (``.module.``) are dropped."""
    match = _RESKANET_CONV.fullmatch(key)
    if match:
        stage, block, conv, rest = match.groups()
        where = "shortcut" if conv == "downsample" else f"body.{int(conv[-1]) - 1}"
        return f"stages.{int(stage) - 1}.{block}.{where}.{rest}"
    key = re.sub(r"^hidden_layer\.(?:module\.)?", "hidden.", key)
    return re.sub(r"^fc\.", "head.1.", re.sub(r"^conv1\.(?:module\.)?", "stem.", key))


def conv_overrides(network: dict[str, Any], conv: dict[str, Any]) -> dict[str, Any] | None:
    """The options of ``conv`` that differ from the ``network``'s (None: none), for
    ResKANet's ``stem_options`` / ``pointwise_options``."""
    return {k: v for k, v in conv.items() if network.get(k) != v} or None


def reskanet_model(layers: tuple[int, ...], block: str, **options: Any) -> ResKANet:
    """Our ResKANet with ``style="torch_conv_kan"``, under the registered name of its layout
    (``moe_reskanet*`` with ``moe_experts``, whose loss coefficient defaults to
    :data:`MOE_RESKANET_LOSS_COEF`, so that the summed auxiliary losses are MoEResKANet's)."""
    moe = bool(options.get("moe_experts"))
    name = reskanet_name(layers, block, moe)
    if moe:
        options.setdefault("moe_loss_coef", MOE_RESKANET_LOSS_COEF)
    return create_model(name, layers=layers, block=block, style="torch_conv_kan", **options)


def _state_conv_options(state: dict[str, Tensor], prefix: str) -> dict[str, Any]:
    """family, degree, norm, affine and bottleneck_convs of the KAGN / KALN conv (plain,
    bottleneck, or a mixture of either) whose keys start with ``prefix``."""
    if prefix + "experts.0.base_conv.0.weight" in state:  # MoE of whole convs
        prefix += "experts.0."
    base, poly = state.get(prefix + "base_conv.0.weight"), state.get(prefix + "poly_weights")
    beta = state.get(prefix + "beta_weights", state.get(prefix + "experts.experts.0.beta_weights"))
    if base is None or (poly is None and beta is None):
        raise CheckpointError(f"not a ResKANet of KAGN or KALN convs (no {prefix}base_conv.0 or "
                              f"{prefix}poly_weights)")
    return dict(family="kaln" if beta is None else "kagn",
                degree=poly.shape[2] // base.shape[1] - 1 if beta is None else len(beta) - 1,
                norm="batch" if prefix + "layer_norm.0.running_mean" in state else "instance",
                affine=prefix + "layer_norm.0.weight" in state,
                bottleneck_convs=prefix + "inner_proj.0.weight" in state)


def _reskanet_config_options(config: dict[str, Any]) -> dict[str, Any]:
    """Our options from what a ResKANet ``config`` gives and its state dict does not record
    (:class:`CheckpointError` for unknown or missing keys)."""
    unknown = sorted(set(config) - _RESKANET_KEYS)
    if unknown:
        raise CheckpointError(f"config has keys {unknown} that torch-conv-kan's ResKANet does "
                              f"not take; expected a subset of {sorted(_RESKANET_KEYS)}")
    missing = [key for key in ("fcnv_stride", "use_first_maxpool") if key not in config]
    if missing:
        raise CheckpointError(f"config must give {missing}: a ResKANet state dict does not "
                              "record its stem stride and max-pool")
    dilation = config.get("replace_stride_with_dilation") or (False, False, False)
    return dict(stem_stride=config["fcnv_stride"], first_maxpool=config["use_first_maxpool"],
                replace_stride_with_dilation=tuple(bool(f) for f in dilation),
                dropout=config.get("dropout", 0.0),
                dropout_linear=config.get("dropout_linear", 0.0))


def _reskanet_hidden_dim(state: dict[str, Tensor], config: dict[str, Any]) -> int | None:
    """The hidden layer's width, off the keys (MoEResKANet builds one for
    ``hidden_layer_dim``; ResKANet ignores that key)."""
    weight = state.get("hidden.base_conv.0.weight")
    hidden = None if weight is None else weight.shape[0]
    given = config.get("hidden_layer_dim")
    if given is not None and hidden is not None and given != hidden:
        raise CheckpointError(f"config gives hidden_layer_dim={given}, the state dict's hidden "
                              f"layer has {hidden} channels")
    return hidden


def _width_per_group(state: dict[str, Tensor], width: int, groups: int) -> int:
    """torch-conv-kan's ``width_per_group`` of a bottleneck ResKANet whose first stage has
    ``width`` planes: the smallest giving its blocks' inner width."""
    inner = state["stages.0.0.body.0.base_conv.0.weight"].shape[0] // groups
    width_per_group = -(-64 * inner // width)
    if int(width * width_per_group / 64) != inner:
        raise CheckpointError(f"no width_per_group gives inner width {inner * groups} to "
                              f"{width} planes and {groups} groups")
    return width_per_group


def reskanet_from_state_dict(state_dict: dict[str, Tensor], config: dict[str, Any]) -> ResKANet:
    """Our ResKANet for a state dict of torch-conv-kan's ``ResKANet`` / ``MoEResKANet`` of KAGN
    (plain or bottleneck) or KALN convs, mixtures of them (``reskagnetbn_moe_*`` included) and a
    hidden layer, with its weights (strict: :class:`CheckpointError`). Layout, families,
    degrees, norms, widths, ``width_per_group``, groups, experts and the hidden layer are read
    off the keys and shapes; ``config`` (their constructor's keyword arguments) gives what these
    do not record: ``fcnv_stride`` and ``use_first_maxpool`` (required), ``k`` and
    ``noisy_gating`` (MoE; default 2 and true), ``replace_stride_with_dilation``, ``dropout``
    and ``dropout_linear``."""
    options = _reskanet_config_options(config)
    state = {_reskanet_key(k): v for k, v in state_dict.items()}
    if "head.1.weight" not in state:
        raise CheckpointError("not a ResKANet (no fc.weight)")
    stem = _state_conv_options(state, "stem.")
    base = state["stem.base_conv.0.weight"]
    kernel = base.shape[-1]
    if config.get("fcnv_padding", kernel // 2) != kernel // 2:
        raise CheckpointError(f"only 'same' stem padding {kernel // 2} loads, got "
                              f"fcnv_padding={config['fcnv_padding']}")
    kind = "bottleneck" if any(k.startswith("stages.0.0.body.2.") for k in state) else "basic"
    grouped = f"stages.0.0.body.{int(kind == 'bottleneck')}."  # the block's 3x3 conv
    last = f"stages.0.0.body.{2 if kind == 'bottleneck' else 1}."
    group_key = re.compile(re.escape(grouped) + r"(?:experts\.0\.)?base_conv\.\d+\.weight")
    network = _state_conv_options(state, grouped)
    width = state[last + "base_conv.0.weight"].shape[0] // EXPANSION[kind]
    options.update(
        in_channels=base.shape[1], num_classes=state["head.1.weight"].shape[0], width=width,
        stem_width=base.shape[0], stem_kernel_size=kernel,
        groups=sum(bool(group_key.fullmatch(k)) for k in state),
        stem_options=conv_overrides(network, stem),
        pointwise_options=conv_overrides(network, _state_conv_options(state, last)),
        hidden_dim=_reskanet_hidden_dim(state, config), **network)
    if kind == "bottleneck":
        options["width_per_group"] = _width_per_group(state, width, options["groups"])
    gate = state.get(grouped + "w_gate")
    if gate is not None:
        options.update(moe_experts=gate.shape[1], moe_top_k=config.get("k", 2),
                       moe_noisy_gating=config.get("noisy_gating", True),
                       moe_inner=grouped + "experts.w_gate" in state or None)
    layers = tuple(len({k.split(".")[2] for k in state if k.startswith(f"stages.{i}.")})
                   for i in range(4))
    model = reskanet_model(layers, kind, **{k: v for k, v in options.items() if v is not None})
    model.load_state_dict(convert_state_dict(state, model, under=("stem", "stages.", "hidden")))
    return model


def to_torch_conv_kan_config(model: VGGKAN) -> dict[str, Any]:
    """The torch-conv-kan ``config.json`` describing ``model`` (built by ``create_model``)."""
    config = getattr(model, "model_config", None)
    if not isinstance(model, VGGKAN) or config is None or config.get("name") != "vgg_kan":
        raise ValueError("save_torch_conv_kan needs a VGG-KAN built by "
                         "create_model('vgg_kan', ...) or load_torch_conv_kan")
    full = {**_defaults(VGGKAN), "degree": 3, **config}
    extra = sorted(set(full) - _OUR_KEYS)
    if extra:
        raise ValueError(f"options {extra} have no torch-conv-kan equivalent")
    if full["family"] != "kagn" or full["norm"] not in ("batch", "instance"):
        raise ValueError("torch-conv-kan VGGs are kagn with batch or instance norm, got "
                         f"family={full['family']!r}, norm={full['norm']!r}")
    if full["bottleneck_convs"] and full["dim_reduction"] != 8:
        raise ValueError(f"torch-conv-kan bottleneck VGGs use dim_reduction=8, "
                         f"got {full['dim_reduction']!r}")
    if full["head_type"] in _KAN_HEADS:
        raise ValueError(f"head_type={full['head_type']!r} does not save: the checkpoint "
                         "mapping does not write KAN head layers")
    return {
        "input_channels": full["in_channels"], "num_classes": full["num_classes"],
        "groups": full["groups"], "degree": full["degree"], "dropout": full["dropout"],
        "l1_decay": 0, "dropout_linear": full["dropout_linear"], "vgg_type": full["vgg_type"],
        "head_type": full["head_type"],
        "expected_feature_shape": list(full["expected_feature_shape"]),
        "width_scale": full["width_scale"], "affine": full["affine"],
        "last_attention": full["last_attention"],
        "sa_inner_projection": full["sa_inner_projection"],
    }


_OUR_KEYS = {"name", "in_channels", "num_classes", "family", "vgg_type", "head_type",
             "expected_feature_shape", "width_scale", "norm", "affine",
             "bottleneck_convs", "dim_reduction", "groups", "dropout", "dropout_linear", "degree",
             "last_attention", "sa_inner_projection", "head_activation"}


def _defaults(cls: type) -> dict[str, Any]:
    params = inspect.signature(cls).parameters.values()
    return {p.name: p.default for p in params if p.default is not p.empty}


def save_torch_conv_kan(model: VGGKAN, folder: str | os.PathLike) -> Path:
    """Write ``model`` as a torch-conv-kan checkpoint folder (``config.json`` +
    ``model.safetensors`` in their key layout), loadable by their ``from_pretrained`` and by
    :func:`load_torch_conv_kan`. Files are written atomically."""
    config = to_torch_conv_kan_config(model)
    state = model.state_dict()
    theirs: dict[str, Tensor] = {}
    consumed: set[str] = set()
    for name, module in _kan_layers(model).items():
        local = {k: state[f"{name}.{k}"] for k in module.state_dict()}
        consumed |= {f"{name}.{k}" for k in local}
        mapped = layer_to_theirs(local, module, module.groups)
        theirs.update({f"{name}.{k}": v.detach().clone() for k, v in mapped.items()})
    theirs.update({_vgg_key_to_theirs(k): v.detach().clone() for k, v in state.items()
                   if k not in consumed})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "model.safetensors",
                  lambda tmp: save_file(theirs, tmp, metadata={"format": "pt"}))
    atomic_write(folder / "config.json",
                  lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True)))
    return folder


__all__ = [
    "CheckpointError", "channel_major_to_degree_major", "convert_state_dict",
    "degree_major_to_channel_major", "load_torch_conv_kan", "model_from_config",
    "MOE_RESKANET_LOSS_COEF", "reskanet_from_state_dict", "reskanet_model", "save_torch_conv_kan",
    "to_torch_conv_kan_config", "vgg_from_state_dict", "vgg_key_to_ours",
]
