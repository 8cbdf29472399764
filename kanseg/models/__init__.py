"""Networks built from the KAN layer core, and the model registry."""
from . import reskanet, u2kanet, ukanet, vgg  # noqa: F401  (registers models)
from .registry import count_parameters, create_model, get_model_spec, list_models, register_model
from .reskanet import ResKANet
from .u2kanet import U2KANet
from .ukanet import UKANet
from .vgg import VGG_TYPES, VGGKAN

__all__ = [
    "ResKANet", "U2KANet", "UKANet", "VGGKAN", "VGG_TYPES", "count_parameters", "create_model",
    "get_model_spec", "list_models", "register_model",
]
