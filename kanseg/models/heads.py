"""Classification heads shared by the backbones (VGG-KAN, ResKANet, DenseKANet, RDNet).

torch-conv-kan's head types, on flattened pooled features:

- ``"Linear"``: dropout, linear;
- ``"VGG"``: linear 1024, ReLU, dropout, linear 1024, ReLU, dropout, linear;
- ``"KAN"``: dropout, one KAN linear layer of the network's family;
- ``"HiddenKAN"``: dropout, KAN linear to 512, dropout, linear;
- ``"Matryoshka"``: linear 1024, ReLU, dropout, :class:`MatryoshkaLinear` over the nested
  prefixes 64, 128, ..., 1024;
- ``"KANtryoshka"``: dropout, KAN linear to 512, dropout, :class:`MatryoshkaLinear` over
  32, 64, ..., 512;
- ``None``: no head.

Matryoshka heads return a tuple of logits, one per nested prefix (smallest first). The KAN
linear layers take the network's family options, and ``head_activation`` as their activation
(torch-conv-kan's VGGs: ``"gelu"``).
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kanseg.layers import ACTIVATIONS, KANLinear, OptionError
from kanseg.layers.moe import MOE_OPTIONS

from .registry import family_option_names

HEAD_TYPES = ("Linear", "VGG", "KAN", "HiddenKAN", "Matryoshka", "KANtryoshka", None)


class MatryoshkaLinear(nn.Module):
    """Matryoshka linear layer (Matryoshka Representation Learning): ``nesting`` prefix sizes,
    one logit tensor per prefix ``x[..., :n]``.

    ``efficient=True`` shares one weight ``(num_classes, nesting[-1])`` and its bias: prefix
    ``n`` uses the first ``n`` weight columns. Otherwise each prefix has its own linear layer.
    """

    def __init__(self, nesting: Sequence[int], num_classes: int, efficient: bool = True,
                 bias: bool = True):
        super().__init__()
        nesting = [int(n) for n in nesting]
        if not nesting or nesting[0] < 1 or any(b <= a for a, b in zip(nesting, nesting[1:])):
            raise ValueError(f"nesting must be increasing positive sizes, got {nesting!r}")
        self.nesting = nesting
        self.efficient = efficient
        sizes = nesting[-1:] if efficient else nesting
        self.classifiers = nn.ModuleList(nn.Linear(n, num_classes, bias=bias) for n in sizes)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.shape[-1] < self.nesting[-1]:
            raise ValueError(f"MatryoshkaLinear expected at least {self.nesting[-1]} features, "
                             f"got input of shape {tuple(x.shape)}")
        if self.efficient:
            layer = self.classifiers[0]
            return tuple(F.linear(x[..., :n], layer.weight[:, :n], layer.bias)
                         for n in self.nesting)
        return tuple(layer(x[..., :n]) for layer, n in zip(self.classifiers, self.nesting))


class HeadMixin:
    """``get_classifier`` / ``reset_classifier`` (timm's head API) for a network whose head,
    the attribute named by ``head_attribute``, is built by :func:`create_head` from
    ``self.head_options`` (every argument but ``num_classes``; set by :meth:`build_head`)."""

    head_attribute: ClassVar[str] = "classifier"
    head_options: dict[str, Any]

    def build_head(self, num_classes: int, head_type: str | None, in_features: int,
                   dropout_linear: float, family: str, **family_options: Any) -> None:
        """Record ``head_options`` (:func:`create_head`'s arguments but ``num_classes``) and
        build the head for ``num_classes``. Heads are no mixtures of experts: the network's
        ``moe_*`` options are left out."""
        self.head_options = dict(head_type=head_type, in_features=in_features,
                                 dropout_linear=dropout_linear, family=family,
                                 **{k: v for k, v in family_options.items()
                                    if k not in MOE_OPTIONS})
        self.reset_classifier(num_classes)

    def get_classifier(self) -> nn.Module:
        """The head (``nn.Identity`` when there is none)."""
        head = getattr(self, self.head_attribute)
        return head if head is not None else nn.Identity()

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a new, freshly initialised one for ``num_classes`` (0: none)."""
        setattr(self, self.head_attribute, create_head(num_classes=num_classes,
                                                       **self.head_options))


def _kan_activation_options(family: str, activation: str | None) -> dict[str, str]:
    """KAN linear options putting ``activation`` where torch-conv-kan's ``kans`` layers apply
    their one activation: the base branch, the output and, for a family whose basis applies one
    (Gram's ``basis_activation``), the basis. None: none (the family's defaults)."""
    if activation is None:
        return {}
    if activation not in ACTIVATIONS:
        raise OptionError("head_activation", f"head_activation must be one of "
                          f"{sorted(ACTIVATIONS)} or None, got {activation!r}")
    options = {"base_activation": activation, "activation": activation}
    if "basis_activation" in family_option_names(family):
        options["basis_activation"] = activation
    return options


def create_head(head_type: str | None, in_features: int, num_classes: int,
                dropout_linear: float = 0.0, family: str = "kagn",
                head_activation: str | None = None, **family_options: Any) -> nn.Module | None:
    """The head ``head_type`` (see the module docstring) from ``in_features`` to
    ``num_classes``, with dropout ``dropout_linear``; ``family`` and ``family_options`` build
    the KAN linear layers, with ``head_activation`` (if not None) as their base, output and
    basis activation (:func:`_kan_activation_options`; torch-conv-kan's VGGs build their KAN
    heads with ``"gelu"``). None when ``head_type`` is None or ``num_classes`` is 0."""
    if head_type not in HEAD_TYPES:
        raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {head_type!r}")
    if head_type is None or num_classes == 0:
        return None

    drop = dropout_linear
    kan_options = {**family_options, **_kan_activation_options(family, head_activation)}

    def kan(out_features: int) -> KANLinear:
        return KANLinear(family, in_features, out_features, **kan_options)

    if head_type == "Linear":
        return nn.Sequential(nn.Dropout(drop), nn.Linear(in_features, num_classes))
    if head_type == "KAN":
        return nn.Sequential(nn.Dropout(drop), kan(num_classes))
    if head_type == "HiddenKAN":
        return nn.Sequential(nn.Dropout(drop), kan(512), nn.Dropout(drop),
                             nn.Linear(512, num_classes))
    if head_type == "KANtryoshka":
        return nn.Sequential(nn.Dropout(drop), kan(512), nn.Dropout(drop),
                             MatryoshkaLinear([2**n for n in range(5, 10)], num_classes))
    hidden = [nn.Linear(in_features, 1024), nn.ReLU(True), nn.Dropout(drop)]
    if head_type == "Matryoshka":
        return nn.Sequential(*hidden,
                             MatryoshkaLinear([2**n for n in range(6, 11)], num_classes))
    return nn.Sequential(*hidden, nn.Linear(1024, 1024), nn.ReLU(True), nn.Dropout(drop),
                         nn.Linear(1024, num_classes))


__all__ = ["HEAD_TYPES", "HeadMixin", "MatryoshkaLinear", "create_head"]
