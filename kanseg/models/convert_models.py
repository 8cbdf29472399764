"""torch-conv-kan networks -> ours, for :func:`~.convert.convert_torch_conv_kan`: DenseKANet and
TinyDenseKANet, ResKANet and MoEResKANet, KAGNRDNet, U2KANet and U2KANetSmall, the VGGs of
``models/vggkan.py`` built of KAGN or KALN convs, and the MatryoshkaHead of its heads.

Our network is built (``create_model``) from the options read off the reference instance;
then each of its layers is loaded strictly with the weights of the matching reference layer,
converted by ``convert_torch_conv_kan`` (so a layer whose shapes differ is an error, never a
partial load). Covered: networks of polynomial KAN convs (KAGN plain or bottleneck, KALN,
KACN, KAJN); ResKANets and MoEResKANets with any ``width_per_group``,
``replace_stride_with_dilation`` and hidden layer, the ``reskagnetbn_moe_*`` (batch-normed
MoE bottleneck KAGN convs between instance-normed KALN 1x1 convs) included; the MoE
DenseKANets (``densekagnet*moebn``, ``tiny_densekagnet_moebn``: dense layers' 3x3 convs
mixing their inner convs, our ``moe_*`` options) and the ``BottleNeckKAGN`` heads of the tiny
BN ones (our ``head_bottleneck``); ``u2kagnet_bn_small`` (a 1x1 first conv: our
``first_kernel_size``). Every MoE network of torch-conv-kan's ``models/`` converts (its
baselines aside: see :mod:`.convert`). KAGNRDNet's stem (a degree-3 bottleneck KAGN conv
without dropout whatever the body) converts to our RDNet's ``stem_options`` where it differs
from the body; its ``post_block_attention`` converts to our RDNet's option of that name (a
:class:`~kanseg.layers.attention.KANSelfAttention` after each stage, q/k/v our RDNet units;
``attention_inner_scale`` reproduces its inner widths).

VGGs go the way of their checkpoints (:mod:`.torch_conv_kan`): the constructor arguments are
read off the instance, :func:`~.torch_conv_kan.model_from_config` builds our VGG-KAN and
:func:`~.torch_conv_kan.convert_state_dict` maps the instance's state dict (strictly). Covered:
VGGKAGN, VGGKAGN_BN, MoEVGGKAGN, MoE_VGGKAGN_BN (every ``vgg_type``, ``sa`` types and
``last_attention`` included) and VGGKALN, with any head (Linear, VGG, Matryoshka, none, and
the KAN, HiddenKAN and KANtryoshka heads of GELU KAN layers: our ``head_activation``); not
VGGKAN (B-splines), FastVGGKAN, VGGKACN and WavVVGKAN, whose convs that mapping does not read.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from kanseg.layers import KANLinear

from . import convert as core
from .heads import MatryoshkaLinear
from .registry import create_model
from .reskanet import EXPANSION
from .torch_conv_kan import (conv_overrides, convert_state_dict, layer_state_to_ours,
                             model_from_config, reskanet_model, vgg_key_to_ours)
from .u2kanet import U2KANet
from .vgg import VGG_SA_TYPES, VGG_TYPES, VGGKAN, vgg_layout


def _unwrap(module: nn.Module) -> nn.Module:
    """The layer inside torch-conv-kan's ``L1`` wrapper (it only acts on gradients)."""
    return getattr(module, "module", module)


def _load(target: nn.Module, reference: nn.Module) -> None:
    """Load the weights of ``reference`` into ``target``, strictly: KAN layers through
    ``convert_torch_conv_kan``, plain torch modules as they are."""
    reference = _unwrap(reference)
    if not type(reference).__module__.startswith("torch."):
        reference = core.convert_torch_conv_kan(reference)
    try:
        target.load_state_dict(reference.state_dict())
    except RuntimeError as err:
        raise ValueError(
            f"{type(reference).__name__}: its weights do not fit the network built from the "
            "reference's options (a layer whose norm, degree or width differs from the "
            f"stem's?): {err}") from None


def _conv_options(conv: nn.Module) -> dict[str, Any]:
    """family, norm, affine, degree (and bottleneck_convs) of a torch-conv-kan polynomial KAN
    conv."""
    conv = _unwrap(conv)
    name = type(conv).__name__
    family = next((core.CONV_FAMILIES[c.__name__] for c in type(conv).__mro__
                   if c.__name__ in core.CONV_FAMILIES), None)
    if family is None:
        raise ValueError(f"{name}: networks convert when built from polynomial KAN convs "
                         f"({', '.join(sorted(core.CONV_FAMILIES))})")
    norm, affine = core.norm_option(conv.layer_norm[0], name)
    options = dict(family=family, norm=norm, affine=affine, degree=conv.degree,
                   bottleneck_convs=hasattr(conv, "inner_dim"))
    if family == "kajn":
        options.update(alpha=conv.a, beta=conv.b)
    return options


def _check_geometry(conv: nn.Module, where: str, **expected: Any) -> None:
    conv = _unwrap(conv)
    found = {key: getattr(conv, key) for key in expected}
    if found != expected:
        raise ValueError(f"{where}: only {expected} converts, got {found}")


def _out_channels(conv: nn.Module) -> int:
    """Output channels of a torch-conv-kan conv, plain, bottleneck or MoE."""
    conv = _unwrap(conv)
    return conv.outdim if hasattr(conv, "outdim") else conv.output_size


def _body_conv_options(conv: nn.Module, where: str) -> dict[str, Any]:
    """groups, dropout (and the reference's MoE options) of a body conv: a VGG conv after the
    first one, a dense layer's 3x3 conv."""
    conv = _unwrap(conv)
    mixture = getattr(conv, "experts", None)
    if mixture is None:
        return dict(groups=conv.groups, dropout=core.dropout_of(conv))
    if isinstance(mixture, nn.ModuleList):  # MoEKANConvBase: whole convs are the experts
        expert, mixture = mixture[0], conv
        options = dict(groups=expert.groups, dropout=core.dropout_of(expert))
    else:  # MoEBottleNeckKAGNConvND: a mixture of inner convs
        if mixture.pre_gate is not None:
            raise ValueError(f"{where}: MoE convs gated through a pregate layer do not convert")
        options = dict(groups=conv.groups, dropout=mixture.experts[0].p_dropout)
    return dict(options, num_experts=mixture.num_experts, k=mixture.k,
                noisy_gating=mixture.noisy_gating)


# ----------------------------------------------------------------------------- DenseKANet
def _dense_head(reference: nn.Module) -> tuple[dict[str, Any], nn.Module]:
    """(our head options: ``head_type``, ``num_classes``, ``head_bottleneck``; the reference's
    linear or KAN linear layer)."""
    classifier = reference.classifier
    if isinstance(classifier, nn.Linear):
        return dict(head_type="Linear", num_classes=classifier.out_features), classifier
    layers = [layer for layer in classifier.layers if not isinstance(layer, nn.Dropout)]
    kind = type(classifier).__name__
    if kind not in ("KAGN", "BottleNeckKAGN", "KALN", "KACN") or len(layers) != 1:
        raise ValueError(f"{type(reference).__name__}: head {kind} does not convert (a linear "
                         "layer or one KAGN / BottleNeckKAGN / KALN / KACN layer does)")
    options = dict(head_type="KAN", num_classes=classifier.layers_hidden[-1],
                   head_bottleneck=kind == "BottleNeckKAGN")
    return options, _unwrap(layers[0])


def convert_densekanet(reference: nn.Module) -> nn.Module:
    """torch-conv-kan's ``DenseKANet`` / ``TinyDenseKANet`` -> our :class:`DenseKANet`; MoE ones
    (3x3 convs ``MoEBottleNeckKAGNConv``: our ``moe_*`` options with ``moe_inner``) included,
    their summed auxiliary losses the loss the reference returns."""
    name = type(reference).__name__
    features = reference.features
    n_blocks = sum(key.startswith("denseblock") for key in features)
    ref_blocks = [features[f"denseblock{i + 1}"] for i in range(n_blocks)]
    first = ref_blocks[0]["denselayer1"]
    stem = _unwrap(features["conv0"])
    kernel = stem.kernel_size
    _check_geometry(stem, "DenseKANet stem", stride=2, padding=kernel // 2)
    if "pool0" in features:
        pool = features["pool0"]
        _check_geometry(pool, "DenseKANet max-pool", kernel_size=3, stride=2, padding=1)
    options = _conv_options(stem)
    head, ref_head = _dense_head(reference)
    conv2 = _unwrap(first.conv2)
    body = _body_conv_options(conv2, name)
    growth = _out_channels(conv2)
    ours = create_model(
        "densekanet", in_channels=stem.inputdim,
        block_config=tuple(len(block) for block in ref_blocks), growth_rate=growth,
        num_init_features=stem.outdim, bn_size=_unwrap(first.conv1).outdim // growth,
        stem_kernel_size=kernel, first_maxpool="pool0" in features,
        final_transition=f"transition{n_blocks}" in features, groups=body["groups"],
        dropout=body["dropout"],
        dropout_linear=reference.dropout_lin.p if reference.dropout_lin is not None else 0.0,
        memory_efficient=first.memory_efficient, **head, **options,
        **_moe_options(conv2 if hasattr(conv2, "w_gate") else None))
    _load(ours.stem, stem)
    for block, ref_block in zip(ours.blocks, ref_blocks):
        for layer, ref_layer in zip(block, ref_block.values()):
            _load(layer.conv1, ref_layer.conv1)
            _load(layer.conv2, ref_layer.conv2)
    for i, transition in enumerate(ours.transitions):
        ref_transition = features[f"transition{i + 1}"]
        _load(transition[0], ref_transition.norm)
        _load(transition[2], ref_transition.conv)
    _load(ours.classifier[1], ref_head)
    return ours


# ----------------------------------------------------------------------------- ResKANet
def _block_conv_options(conv: nn.Module) -> dict[str, Any]:
    """:func:`_conv_options` of a residual block's 3x3 conv, plain or a mixture: of whole
    convs (their first expert's) or of the inner convs of a bottleneck KAGN conv."""
    experts = getattr(conv, "experts", None)
    if isinstance(experts, nn.ModuleList):
        return _conv_options(experts[0])
    if experts is None:
        return _conv_options(conv)
    norm, affine = core.norm_option(conv.layer_norm[0], type(conv).__name__)
    return dict(family="kagn", norm=norm, affine=affine, degree=experts.experts[0].degree,
                bottleneck_convs=True)


def _moe_options(mixture: nn.Module | None) -> dict[str, Any]:
    """The ``moe_*`` options of a mixture of whole convs or of inner convs (none for a plain
    conv)."""
    if mixture is None:
        return {}
    inner = hasattr(mixture, "inner_dim")  # MoEBottleNeckKAGNConvND: mixes its inner conv
    gating = mixture.experts if inner else mixture
    return dict(moe_experts=gating.num_experts, moe_top_k=gating.k,
                moe_noisy_gating=gating.noisy_gating, **({"moe_inner": True} if inner else {}))


def _reskanet_geometry(reference: nn.Module, ref_stages: list, kind: str) -> dict[str, Any]:
    """Stem, max-pool, dilation and bottleneck-width options of a torch-conv-kan ResKANet."""
    name, stem = type(reference).__name__, _unwrap(reference.conv1)
    _check_geometry(stem, f"{name} stem", padding=stem.kernel_size // 2)
    if reference.maxpool is not None:
        _check_geometry(reference.maxpool, f"{name} max-pool", kernel_size=3, stride=2,
                        padding=1)
    options = dict(stem_width=stem.outdim, stem_kernel_size=stem.kernel_size,
                   stem_stride=stem.stride, first_maxpool=reference.maxpool is not None,
                   replace_stride_with_dilation=tuple(s[0].stride == 1 for s in ref_stages[1:]))
    if kind == "bottleneck":  # basic blocks ignore width_per_group
        options["width_per_group"] = reference.base_width
    return options


def convert_reskanet(reference: nn.Module) -> nn.Module:
    """torch-conv-kan's ``ResKANet`` and ``MoEResKANet`` -> our :class:`ResKANet` with
    ``style="torch_conv_kan"`` (:func:`~.torch_conv_kan.reskanet_model`: an MoEResKANet's
    summed auxiliary losses are its returned loss). Every stem size, stride and max-pool,
    ``width_per_group``, ``replace_stride_with_dilation``, MoEResKANet's hidden layer
    (ResKANet builds none) and its blocks of MoE bottleneck-KAGN convs (``reskagnetbn_moe_*``,
    whose stem, 1x1 convs and shortcuts differ in family or norm: ``stem_options`` and
    ``pointwise_options``)."""
    stem = _unwrap(reference.conv1)
    ref_stages = [reference.layer1, reference.layer2, reference.layer3, reference.layer4]
    ref_blocks = [block for stage in ref_stages for block in stage]
    kind = "bottleneck" if hasattr(ref_blocks[0], "conv3") else "basic"
    ref_convs = [[_unwrap(block.conv1), _unwrap(block.conv2)]
                 + ([_unwrap(block.conv3)] if kind == "bottleneck" else [])
                 for block in ref_blocks]
    spatial = ref_convs[0][int(kind == "bottleneck")]
    network = _block_conv_options(spatial)
    hidden = getattr(reference, "hidden_layer", None)
    roles = dict(stem_options=conv_overrides(network, _conv_options(stem)),
                 pointwise_options=conv_overrides(network, _conv_options(ref_convs[0][-1])),
                 hidden_dim=_out_channels(hidden) if hidden is not None else None)
    ours = reskanet_model(
        tuple(len(stage) for stage in ref_stages), kind,
        in_channels=stem.inputdim, num_classes=reference.fc.out_features,
        width=_out_channels(ref_convs[0][-1]) // EXPANSION[kind],
        dropout=core.dropout_of(stem), dropout_linear=reference.drop.p, groups=reference.groups,
        **_reskanet_geometry(reference, ref_stages, kind), **network,
        **{key: value for key, value in roles.items() if value is not None},
        **_moe_options(spatial if hasattr(spatial, "w_gate") else None))
    _load(ours.stem, stem)
    if hidden is not None:
        _load(ours.hidden, hidden)
    for block, ref_block, convs in zip((b for s in ours.stages for b in s), ref_blocks,
                                       ref_convs):
        for conv, ref_conv in zip(block.body, convs):
            _load(conv, ref_conv)
        if ref_block.downsample is not None:
            _load(block.shortcut, ref_block.downsample)
    _load(ours.head[1], reference.fc)
    return ours


# ----------------------------------------------------------------------------- RDNet
def _load_unit(unit: nn.Sequential, reference: nn.Module, where: str) -> None:
    """Our (KAN conv, channel LayerNorm, activation) unit <- a torch-conv-kan KAGN conv (plain,
    bottleneck or V2) normalised by timm's ``LayerNorm2d``."""
    reference = _unwrap(reference)
    norm = reference.layer_norm
    if isinstance(norm, nn.ModuleList):
        if len(norm) != 1:
            raise ValueError(f"{where}: grouped KAN convs do not convert")
        norm = norm[0]
    theirs = {k: v for k, v in reference.state_dict().items() if not k.startswith("layer_norm.")}
    if isinstance(reference.base_conv, nn.ModuleList):  # V1 layout: one module per group
        state = layer_state_to_ours(theirs, unit[0], 1)
    else:  # KAGNConvNDLayerV2: single convs, basis stacked degree-major
        state = {"base_weight": theirs["base_conv.weight"],
                 "basis_weight": theirs["poly_conv.weight"],
                 "basis.beta_weights": theirs["beta_weights"]}
    unit[0].load_state_dict(state)
    _load_channel_norm(unit[1], norm, where)


def _load_channel_norm(ours: nn.LayerNorm, reference: nn.Module, where: str) -> None:
    """Our channel LayerNorm <- timm's ``LayerNorm2d`` (same eps)."""
    if type(reference).__name__ != "LayerNorm2d" or reference.eps != ours.eps:
        raise ValueError(f"{where}: norm {reference} does not convert (timm LayerNorm2d, "
                         f"eps={ours.eps}, does)")
    ours.load_state_dict(reference.state_dict())


def _rdnet_parts(reference: nn.Module) -> tuple[list[nn.Sequential], list[nn.Module]]:
    """(dense stages, post-block attention layers) of a ``KAGNRDNet``: with
    ``post_block_attention`` its ``dense_stages`` alternate stage, attention."""
    children = list(reference.dense_stages)
    stages = [m for m in children if isinstance(m, nn.Sequential)]
    attentions = [m for m in children if not isinstance(m, nn.Sequential)]
    if attentions and children != [m for pair in zip(stages, attentions) for m in pair]:
        raise ValueError("KAGNRDNet: dense_stages must alternate stage and attention "
                         "(post_block_attention) or hold stages only")
    return stages, attentions


def _rdnet_attention_scale(attentions: list[nn.Module]) -> float:
    """An ``attention_inner_scale`` s with ``int(channels / s)`` = each attention's inner
    width (torch-conv-kan rounds ``channels / inner_projection_attention_scale`` down)."""
    widths = [(a.input_dim, a.inner_proj.out_channels) for a in attentions]
    low = max(c / (inner + 1) for c, inner in widths)
    high = min(c / inner for c, inner in widths)
    for scale in (high, (low + high) / 2):
        if scale > low and all(int(c / scale) == inner for c, inner in widths):
            return scale
    raise ValueError(f"KAGNRDNet: no inner_projection_attention_scale gives its attention "
                     f"layers' (channels, inner width) {widths}")


def _rdnet_attention_options(attentions: list[nn.Module]) -> dict[str, Any]:
    """``post_block_attention`` / ``attention_inner_scale`` of a ``KAGNRDNet`` (none without
    attention); q/k/v convs other than 3x3 'same' ungrouped ones are refused."""
    if not attentions:
        return {}
    for i, attention in enumerate(attentions):
        if attention.inner_proj is None or hasattr(attention, "rope_mixed"):
            raise ValueError(f"KAGNRDNet attention {i}: only attention with inner projections "
                             "and no RoPE converts (as post_block_attention builds it)")
        _check_geometry(attention.proj_q, f"KAGNRDNet attention {i}", kernel_size=3, stride=1,
                        padding=1, dilation=1, groups=1)
    return dict(post_block_attention=True,
                attention_inner_scale=_rdnet_attention_scale(attentions))


def _load_rdnet_attention(ours: nn.Module, reference: nn.Module, where: str) -> None:
    """Our post-block :class:`~kanseg.layers.attention.KANSelfAttention` <- the reference's."""
    for key in ("proj_q", "proj_k", "proj_v"):
        _load_unit(getattr(ours, key), getattr(reference, key), f"{where} {key}")
    _load(ours.inner_proj, reference.inner_proj)
    _load(ours.outer_proj, reference.outer_proj)
    _load_channel_norm(ours.norm_layer, reference.norm_layer, f"{where} output")
    ours.gamma.copy_(reference.gamma)


def _rdnet_options(reference: nn.Module) -> dict[str, Any]:
    """RDNet options read off a ``KAGNRDNet`` (stages, widths, body conv options, post-block
    attention)."""
    growth, blocks, downsample, ese = [], [], [], []
    stages, attentions = _rdnet_parts(reference)
    for i, stage in enumerate(stages):
        dense = stage[-1]
        growth.append(dense.dense_block0.growth_rate)
        blocks.append(len(dense))
        downsample.append(i > 0 and _unwrap(stage[0]).stride == 2)
        ese.append(len(dense.dense_block0.layers.layers) == 4)
    body = _unwrap(stages[0][-1].dense_block0.layers.layers[1])
    stem = _unwrap(reference.stem.stem[0])
    network, stem_conv = ({"bottleneck_convs": hasattr(conv, "inner_dim"), "degree": conv.degree,
                           "dropout": core.dropout_of(conv)} for conv in (body, stem))
    stem_options = conv_overrides(network, stem_conv)
    gamma = stages[0][-1].dense_block0.gamma
    return dict(num_init_features=stem.outdim, growth_rates=tuple(growth),
                num_blocks=tuple(blocks), downsample=tuple(downsample), ese=tuple(ese),
                patch_size=stem.kernel_size, ls_init_value=1.0 if gamma is not None else 0.0,
                in_channels=stem.inputdim, **network,
                **({"stem_options": stem_options} if stem_options else {}),
                **_rdnet_attention_options(attentions))


def _load_rdnet_blocks(dense: nn.Module, reference: nn.Module, stage: int) -> None:
    """Our dense block of stage ``stage`` <- the reference's ``DenseStage``."""
    for j, (block, ref_block) in enumerate(zip(dense, reference)):
        where = f"KAGNRDNet stage {stage} block {j}"
        ref_layers = ref_block.layers.layers
        for unit, ref_layer in zip(block.layers[:3], ref_layers[:3]):
            _load_unit(unit, ref_layer, where)
        if len(ref_layers) == 4:
            _load_unit(block.layers[3].fc, ref_layers[3].fc, where)
        if block.gamma is not None:
            block.gamma.copy_(ref_block.gamma)


def convert_rdnet(reference: nn.Module) -> nn.Module:
    """torch-conv-kan's ``KAGNRDNet`` -> our :class:`RDNet` (degree-major depthwise layout;
    ``post_block_attention`` included)."""
    head = reference.head
    num_classes = head.fc.out_features if isinstance(head.fc, nn.Linear) else 0
    ours = create_model("rdnet", num_classes=num_classes, dropout_linear=head.drop.p,
                        reference_depthwise=True, **_rdnet_options(reference))
    _load_unit(ours.stem, reference.stem.stem[0], "KAGNRDNet stem")
    ref_stages, attentions = _rdnet_parts(reference)
    for i, (stage, ref_stage) in enumerate(zip(ours.stages, ref_stages)):
        parts = list(stage)
        if i > 0:
            _load_unit(parts.pop(0), ref_stage[0], f"KAGNRDNet transition {i}")
        _load_rdnet_blocks(parts.pop(0), ref_stage[-1], i)
        if attentions:
            _load_rdnet_attention(parts.pop(0), attentions[i], f"KAGNRDNet attention {i}")
    _load(ours.norm, head.norm)
    if num_classes:
        _load(ours.classifier[1], head.fc)
    return ours


# ----------------------------------------------------------------------------- VGG
#: torch-conv-kan VGG classes whose convs the checkpoint mapping reads -> their family
_VGG_FAMILIES = {"VGGKAGN": "kagn", "VGGKAGN_BN": "kagn", "MoEVGGKAGN": "kagn",
                 "MoE_VGGKAGN_BN": "kagn", "VGGKALN": "kaln"}
#: our head type for the parametrised parts of torch-conv-kan's VGG heads
_VGG_HEADS = {("linear",): "Linear", ("linear",) * 3: "VGG", ("kan",): "KAN",
              ("kan", "linear"): "HiddenKAN", ("linear", "matryoshka"): "Matryoshka",
              ("kan", "matryoshka"): "KANtryoshka"}


def _vgg_attention_projection(attentions: list[nn.Module], where: str) -> int | None:
    """``sa_inner_projection`` of the self-attention layers (None: no inner projection)."""
    if not attentions or attentions[0].inner_proj is None:
        return None
    projection = attentions[0].input_dim // attentions[0].dims
    if any(a.inner_proj is None or a.input_dim // projection != a.dims for a in attentions):
        raise ValueError(f"{where}: its self-attention layers' inner widths do not follow "
                         "one sa_inner_projection")
    return projection


def _vgg_type(reference: nn.Module, width_scale: int, where: str) -> tuple[str, bool]:
    """(vgg_type, last_attention) whose layout is that of ``reference.features``."""
    tokens: list[int | str] = []
    for layer in reference.features:
        if isinstance(layer, nn.MaxPool2d):
            tokens.append("M")
        elif hasattr(layer, "proj_q"):  # torch-conv-kan's self-attention
            tokens.append("SA")
        else:
            tokens.append(_out_channels(layer) / width_scale)
    last_attention = tokens[-1] == "SA"
    for vgg_type in VGG_TYPES + VGG_SA_TYPES:
        layout = vgg_layout(vgg_type)
        expected: list[int | str] = []
        for i, item in enumerate(layout):
            if item == "SAM":
                expected += ["SA", "M"]
            else:
                expected.append("SA" if last_attention and i == len(layout) - 1 else item)
        if expected == tokens:
            return vgg_type, last_attention
    raise ValueError(f"{where}: its features {tokens} (widths / width_scale {width_scale}, "
                     f"'M' max-pool, 'SA' self-attention) are none of the VGG types "
                     f"{VGG_TYPES + VGG_SA_TYPES}")


def _vgg_head(classifier: nn.Module | None, where: str
              ) -> tuple[str | None, list[nn.Module], str | None]:
    """(our head type, the head's parametrised layers converted to ours, in order, the
    activation of its KAN layers: None without any)."""
    if classifier is None:
        return None, [], None
    kinds, parts, activation = [], [], None
    for child in (classifier if isinstance(classifier, nn.Sequential) else [classifier]):
        if hasattr(child, "layers_hidden"):  # a kans network: dropout, one KAN linear layer
            kinds.append("kan")
            layers = [m for m in core.convert_torch_conv_kan(child) if isinstance(m, KANLinear)]
            activation = core.activation_name(layers[0].layer.act, where)
            parts += layers
        elif isinstance(child, nn.Linear):
            kinds.append("linear")
            parts.append(child)
        elif type(child).__name__ == "MatryoshkaHead":
            kinds.append("matryoshka")
            parts.append(convert_matryoshka(child))
        elif any(True for _ in child.parameters()):
            kinds.append(type(child).__name__)
    head_type = _VGG_HEADS.get(tuple(kinds))
    if head_type is None:
        raise ValueError(f"{where}: a head of layers {kinds} does not convert (heads that do: "
                         f"{', '.join(_VGG_HEADS.values())}, none)")
    return head_type, parts, activation


def _head_modules(head: nn.Module | None, children: bool = False) -> list:
    """The modules of a head (``children``: its named children), none for no head."""
    if head is None:
        return []
    return list(head.named_children() if children else head.modules())


def _num_classes(head: nn.Module) -> int:
    """Classes of our converted last head layer (linear, KAN linear or Matryoshka)."""
    return head.out_features if hasattr(head, "out_features") else head.classifiers[0].out_features


def convert_vgg(reference: nn.Module) -> VGGKAN:
    """torch-conv-kan's VGGs (``models/vggkan.py``) -> our :class:`VGGKAN`: the constructor
    arguments read off the instance, the state dict mapped as their checkpoints are
    (:func:`~.torch_conv_kan.convert_state_dict`, strict); L1 wrappers are dropped (they only
    act on gradients). KAN head layers are converted as layers, their activation (GELU) our
    ``head_activation``. VGGs of other convs than KAGN and KALN are refused."""
    name = type(reference).__name__
    family = next((_VGG_FAMILIES[c.__name__] for c in type(reference).__mro__
                   if c.__name__ in _VGG_FAMILIES), None)
    if family is None:
        raise ValueError(f"{name}: no conversion; the torch-conv-kan VGGs that convert are "
                         f"{', '.join(sorted(_VGG_FAMILIES))} (KAGN and KALN convs)")
    convs = [layer for layer in reference.features
             if not isinstance(layer, nn.MaxPool2d) and not hasattr(layer, "proj_q")]
    first = _unwrap(convs[0])
    options = _conv_options(first)
    if options["family"] != family:
        raise ValueError(f"{name}: its first conv is {type(first).__name__}, not {family}")
    if options["norm"] == "batch" and not first.layer_norm[0].track_running_stats:
        raise ValueError(f"{name}: batch norm without running statistics does not convert")
    if first.outdim % 16:
        raise ValueError(f"{name}: its first conv has {first.outdim} channels, not a multiple "
                         "of 16 (every VGG type starts at width 16 * width_scale)")
    width_scale = first.outdim // 16
    vgg_type, last_attention = _vgg_type(reference, width_scale, name)
    head_type, head, head_activation = _vgg_head(reference.classifier, name)
    body = _body_conv_options(convs[1], name)
    moe = "num_experts" in body
    dropouts = [m.p for m in _head_modules(reference.classifier) if isinstance(m, nn.Dropout)]
    config = dict(
        input_channels=first.inputdim, num_classes=_num_classes(head[-1]) if head else 0,
        degree=first.degree, vgg_type=vgg_type, head_type=head_type,
        expected_feature_shape=tuple(reference.expected_feature_shape),
        width_scale=width_scale, affine=options["affine"], last_attention=last_attention,
        dropout_linear=dropouts[0] if dropouts else 0.0,
        sa_inner_projection=_vgg_attention_projection(
            [layer for layer in reference.features if hasattr(layer, "proj_q")], name),
        **body)
    ours = model_from_config(config, options["norm"] == "batch", options["bottleneck_convs"], moe,
                             family=family, head_activation=head_activation)
    state = {vgg_key_to_ours(key): value  # L1 wrappers dropped
             for key, value in reference.state_dict().items() if not key.startswith("classifier.")}
    ours_head = [key for key, m in _head_modules(ours.classifier, children=True)
                 if any(True for _ in m.parameters())]
    if len(ours_head) != len(head):
        raise ValueError(f"{name}: head {head_type} has {len(head)} weighted layers, ours "
                         f"{len(ours_head)}")
    for key, part in zip(ours_head, head):
        state.update({f"classifier.{key}.{k}": v for k, v in part.state_dict().items()})
    try:
        ours.load_state_dict(convert_state_dict(state, ours))
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    return ours


# ----------------------------------------------------------------------------- U2KANet
def _rsu_convs(block: nn.Module) -> list[nn.Module]:
    """An RSU block's KAN convs in forward order: torch-conv-kan's ``ResidualUNetBase(F)`` or
    our :class:`~.blocks.RSUBlock` (whose bottom conv is the reference's last encoder conv)."""
    if hasattr(block, "input_conv"):
        return [block.input_conv, *block.encoder_list, *block.decoder_list]
    return [block.conv_in, *block.encoder, block.bottom, *block.decoder]


def _u2_dim_reduction(reference: nn.Module, first: nn.Module) -> float:
    """A ``dim_reduction`` giving the widest bottleneck conv its inner width (torch-conv-kan
    builds them all with one, but a 1x1 ``first`` conv, which squeezes by 4 here and there; a
    conv it does not fit fails to load)."""
    widest = max((m for m in reference.modules()
                  if hasattr(m, "inner_dim") and not (m is first and m.kernel_size == 1)),
                 key=lambda m: max(m.inputdim, m.outdim) // m.groups)
    return max(widest.inputdim, widest.outdim) // widest.groups / (widest.inner_dim + 0.5)


def convert_u2kanet(reference: nn.Module, variant: str) -> U2KANet:
    """torch-conv-kan's ``U2KANet`` (``variant="full"``) / ``U2KANetSmall`` (``"small"``) -> our
    :class:`~.u2kanet.U2KANet` of that variant, ``width_scale`` its ``width_factor / 4``, with
    ``align_corners=True`` (its RSU blocks upsample so) and ``deep_supervision=True`` (in
    training it returns the fused and the six side logits; in eval mode ours returns the fused
    logits, its first output). Polynomial KAN convs only (not its B-spline, FastKAN or plain
    ``u2net`` ones); ``u2kagnet_bn_small``'s 1x1 first conv is our ``first_kernel_size=1``."""
    name = type(reference).__name__
    first, body = _unwrap(reference.stage1.input_conv), _unwrap(reference.stage2.input_conv)
    try:
        options = _conv_options(body)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    if body.groups > 1 and first.inputdim % body.groups == 0:
        raise ValueError(f"{name}: groups={body.groups} divides its {first.inputdim} input "
                         "channels, so ours would group the first conv, which it leaves "
                         "ungrouped")
    if options["bottleneck_convs"]:
        options["dim_reduction"] = _u2_dim_reduction(reference, first)
    ours = create_model(
        "u2kanet" if variant == "full" else "u2kanet_small", spatial_dims=2,
        in_channels=first.inputdim, out_channels=reference.outconv.out_channels,
        width_scale=first.outdim / 64, groups=body.groups, dropout=core.dropout_of(body),
        first_kernel_size=first.kernel_size, align_corners=True, deep_supervision=True,
        **options)
    ref_stages = [getattr(reference, f"stage{i}") for i in range(1, 7)]
    ref_stages += [getattr(reference, f"stage{i}d") for i in range(1, 6)]
    for block, ref_block in zip([*ours.encoder, *ours.decoder], ref_stages):
        for conv, ref_conv in zip(_rsu_convs(block), _rsu_convs(ref_block)):
            _load(conv, ref_conv)
    for i, side in enumerate(ours.sides):
        _load(side, getattr(reference, f"side{i + 1}"))
    _load(ours.fuse, reference.outconv)
    return ours


# ----------------------------------------------------------------------------- heads
def convert_matryoshka(reference: nn.Module) -> MatryoshkaLinear:
    """torch-conv-kan's ``MatryoshkaHead`` -> :class:`MatryoshkaLinear`."""
    first = reference.nesting_classifier_0
    ours = MatryoshkaLinear(reference.nesting_list, reference.num_classes,
                            efficient=reference.efficient, bias=first.bias is not None)
    for i, layer in enumerate(ours.classifiers):
        _load(layer, getattr(reference, f"nesting_classifier_{i}"))
    return ours


#: torch-conv-kan class -> converter (entries of ``convert._CONVERTERS``)
NETWORK_CONVERTERS = {"DenseKANet": convert_densekanet, "TinyDenseKANet": convert_densekanet,
                      "ResKANet": convert_reskanet, "MoEResKANet": convert_reskanet,
                      "KAGNRDNet": convert_rdnet,
                      "VGG": convert_vgg, "MatryoshkaHead": convert_matryoshka,
                      "U2KANet": lambda m: convert_u2kanet(m, "full"),
                      "U2KANetSmall": lambda m: convert_u2kanet(m, "small")}

__all__ = ["NETWORK_CONVERTERS", "convert_densekanet", "convert_matryoshka", "convert_rdnet",
           "convert_reskanet", "convert_u2kanet", "convert_vgg"]
