"""Every class of torch-conv-kan's ``kan_convs/``, ``kans/`` and ``models/`` either converts
(``convert_torch_conv_kan`` has a converter for a class in its MRO) or is a documented exception
(the module docstring of :mod:`kanseg.models.convert`). A new reference class without a
decision fails here."""
from __future__ import annotations

import inspect

import pytest

from kanseg.models import convert
from conftest import TCK, import_reference, import_reference_models

KABN = "torch-conv-kan's Bernstein basis is all ones; ours is the Bernstein basis it intends"
BASELINE = "an MNIST / CIFAR baseline classifier (models/baselines): no network here has its layout"
PART = "a part of {}: converts with it, not alone"

#: reference class -> why it does not convert (mirrors the docstring of kanseg.models.convert)
EXCEPTIONS: dict[str, str] = {
    **dict.fromkeys(["KABNConvNDLayer", "KABNConv1DLayer", "KABNConv2DLayer", "KABNConv3DLayer",
                     "BernsteinKANLayer", "KABN"], KABN),
    **dict.fromkeys([prefix + kind for prefix in ("Simple", "EightSimple")
                     for kind in ("Conv", "ConvKAN", "FastConvKAN", "ConvKALN", "ConvKACN",
                                  "ConvKAGN", "MoEConvKAGNBN", "ConvWavKAN")], BASELINE),
    "RadialBasisFunction": PART.format("the FastKAN convs"),
    "SplineLinear": PART.format("FastKANLayer"),
    **dict.fromkeys(["WaveletConvND", "WaveletConvNDFast", "WaveletConvNDFastPlusOne"],
                    PART.format("the WavKAN convs")),
    **dict.fromkeys(["KAGNExpert", "KAGNMoE"], PART.format("MoEBottleNeckKAGNConvND")),
    "SparseDispatcher": PART.format("the MoE convs"),
    **dict.fromkeys(["_DenseLayer", "_DenseBlock", "_KANDenseBlock", "_KALNDenseBlock",
                     "_KAGNDenseBlock", "_KACNDenseBlock", "_FastKANDenseBlock",
                     "_BottleNeckKAGNDenseBlock", "_MoEBottleNeckKAGNDenseBlock", "_Transition"],
                    PART.format("DenseKANet")),
    **dict.fromkeys(["BasicBlockTemplate", "KANBasicBlock", "FastKANBasicBlock",
                     "KALNBasicBlock", "KAGNBasicBlock", "BottleneckKAGNBasicBlock",
                     "KACNBasicBlock", "MoEKALNBasicBlock", "MoEBottleneckKAGNBasicBlock",
                     "BottleneckTemplate", "KANBottleneck", "FastKANBottleneck", "KALNBottleneck",
                     "KAGNBottleneck", "BottleneckKAGNBottleneck", "MoEKALNBottleneck",
                     "KACNBottleneck"], PART.format("ResKANet and UKANet")),
    **dict.fromkeys(["RDNetClassifierHead", "PatchifyStem", "Block", "EffectiveSEModule",
                     "BlockESE", "DenseBlock", "DenseStage"], PART.format("KAGNRDNet")),
    **dict.fromkeys(["ResidualUNetBase", "ResidualUNetBaseF"], PART.format("U2KANet")),
}


def _module_names(package: str) -> list[str]:
    """Dotted names (relative to ``package``) of the reference's modules under ``package``."""
    root = TCK / package
    return [".".join(path.relative_to(root).with_suffix("").parts)
            for path in sorted(root.rglob("*.py")) if path.name != "__init__.py"]


@pytest.fixture(scope="module")
def reference_classes() -> dict[str, type]:
    """Every class defined in the reference's ``kan_convs/``, ``kans/`` and ``models/`` (its
    ``baselines/`` included), by name."""
    import_reference("kan_convs")  # skips the test without the reference checkout
    modules = import_reference(*(f"{package}.{name}" for package in ("kan_convs", "kans")
                                 for name in _module_names(package)))
    modules += import_reference_models(*_module_names("models"))
    classes = [obj for module in modules for obj in vars(module).values()
               if inspect.isclass(obj) and obj.__module__ == module.__name__]
    names = [cls.__name__ for cls in classes]
    assert len(set(names)) == len(names), "two reference classes share a name"
    return dict(zip(names, classes))


def _converts(cls: type) -> bool:
    return any(c.__name__ in convert._CONVERTERS for c in cls.__mro__)


def test_every_reference_class_converts_or_is_a_documented_exception(reference_classes):
    undecided = sorted(name for name, cls in reference_classes.items()
                       if not _converts(cls) and name not in EXCEPTIONS)
    assert not undecided, f"neither converted nor a documented exception: {undecided}"
    converted = sorted(name for name in EXCEPTIONS
                       if name in reference_classes and _converts(reference_classes[name]))
    assert not converted, f"documented exceptions that convert now: {converted}"
    unknown = sorted(set(EXCEPTIONS) - set(reference_classes))
    assert not unknown, f"exceptions that are no reference class: {unknown}"


REFUSED_CASES = {  # class -> constructor arguments
    "KABNConv2DLayer": (2, 2, 3), "BernsteinKANLayer": (4, 2, 2), "KABN": ([4, 2],),
}


@pytest.mark.parametrize("name", sorted(REFUSED_CASES))
def test_exceptions_are_refused_with_their_documented_reason(reference_classes, name):
    module = reference_classes[name](*REFUSED_CASES[name])
    with pytest.raises(ValueError, match=rf"^{name}: no conversion: \w"):
        convert.convert_torch_conv_kan(module)
    assert name in convert.__doc__ and name in EXCEPTIONS
