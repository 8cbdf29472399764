"""The network a fine-tuning trains, built on a pretrained backbone:

- classification: the backbone with a new head, through its head API
  (``get_classifier`` / ``reset_classifier``, as VGG-KAN and ResKANet give);
- segmentation on a classification backbone: smp's ``Unet`` whose encoder is kanseg's
  :class:`~kanseg.models.smp.KANEncoder` around the backbone (its head dropped);
- segmentation with a segmentation network (UKANet, U2KANet...): the same network rebuilt for
  the task's classes, initialised from every matching tensor (the output layers start anew).

Each builder also returns the names of the new modules (they always train).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from kanseg.models import create_model, resolved_config
from kanseg.models.io import load_matching
from kanseg.schema import ConfigError


def model_config(model: nn.Module) -> dict:
    """``{"name", **arguments}`` of a model built by ``create_model`` (defaults filled in)."""
    if not getattr(model, "model_config", None):
        raise ValueError(f"the backbone ({type(model).__name__}) was not built by kanseg's "
                         "create_model, so it cannot be rebuilt for a new task")
    return resolved_config(model)


def new_classifier(model: nn.Module, num_classes: int) -> list[str]:
    """Give ``model`` a freshly initialised head with ``num_classes`` outputs (recorded in its
    ``model_config``); returns ``[head name]``."""
    if not callable(getattr(model, "reset_classifier", None)):
        raise ValueError(f"the backbone ({type(model).__name__}) has no classification head "
                         "(get_classifier / reset_classifier): use a VGG-KAN or ResKANet "
                         "backbone, or task: segmentation for a segmentation network")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    model.reset_classifier(num_classes)
    head = model.get_classifier()
    names = [name for name, module in model.named_modules() if module is head]
    if not names:
        raise ValueError(f"the backbone ({type(model).__name__}) built no head (its head_type "
                         "is None?): it cannot be fine-tuned as a classifier")
    if getattr(model, "model_config", None):  # what a saved model folder is rebuilt from
        model.model_config["num_classes"] = num_classes
    return names


def new_output(model: nn.Module, num_classes: int) -> tuple[nn.Module, list[str]]:
    """A segmentation network rebuilt with ``out_channels=num_classes`` and loaded with every
    tensor of ``model`` whose name and shape match; returns it and the modules left new."""
    config = model_config(model)
    if "out_channels" not in config:
        raise ValueError(f"the backbone ({config['name']}) is neither a classifier with a head "
                         "API nor a segmentation network with out_channels")
    name = config.pop("name")
    rebuilt = create_model(name, **{**config, "out_channels": num_classes})
    old = model.state_dict()
    new = [k for k, v in rebuilt.state_dict().items() if k not in old or old[k].shape != v.shape]
    load_matching(rebuilt, old)
    return rebuilt, sorted({key.rpartition(".")[0] for key in new})


def feature_unet(backbone: nn.Module, num_classes: int, decoder_channels: Sequence[int],
                 patch_size: Sequence[int]) -> tuple[nn.Module, list[str]]:
    """smp's 2D ``Unet`` with ``len(decoder_channels)`` levels on ``backbone``'s feature maps
    (``KANEncoder`` prepends the input when the first map is already downsampled, as in
    ResKANet); returns it and ``["decoder", "segmentation_head"]``."""
    import segmentation_models_pytorch as smp

    from kanseg.models.smp import register_smp_encoder

    depth = len(decoder_channels)
    if not 1 <= depth <= 5:
        raise ConfigError(f"segmentation.decoder_channels: 1 to 5 widths (one per U-Net level), "
                          f"got {list(decoder_channels)}")
    if len(patch_size) != 2 or any(s % 2**depth for s in patch_size):
        raise ConfigError(f"segmentation.data.patch_size: a {depth}-level U-Net on a 2D backbone "
                          f"needs 2 sizes divisible by {2**depth}, got {list(patch_size)}")
    config = model_config(backbone)
    name = config.pop("name")
    config.pop("num_classes", None)
    encoder = f"kanpeft-{name}"
    register_smp_encoder(encoder, name, **config)  # config holds in_channels: built once
    unet = smp.Unet(encoder, encoder_weights=None, encoder_depth=depth,
                    decoder_channels=list(decoder_channels), in_channels=config["in_channels"],
                    classes=num_classes)
    backbone.reset_classifier(0)
    unet.encoder.backbone = backbone  # the pretrained twin of the encoder smp built
    return unet, ["decoder", "segmentation_head"]


def segmentation_model(backbone: nn.Module, num_classes: int, decoder_channels: Sequence[int],
                       patch_size: Sequence[int]) -> tuple[nn.Module, list[str]]:
    """A U-Net on a classification backbone, or the segmentation network itself re-headed."""
    if hasattr(backbone, "forward_features") and callable(getattr(backbone, "reset_classifier",
                                                                   None)):
        return feature_unet(backbone, num_classes, decoder_channels, patch_size)
    return new_output(backbone, num_classes)


def with_new_output(backbone: nn.Module, num_classes: int) -> tuple[nn.Module, list[str]]:
    """The backbone with a new ``num_classes`` output: a new head for a classifier, new output
    layers for a segmentation network (``kanpeft methods`` counts parameters on it)."""
    if callable(getattr(backbone, "reset_classifier", None)):
        return backbone, new_classifier(backbone, num_classes)
    return new_output(backbone, num_classes)
