"""Networks built from the KAN layer core, and the model registry."""
from . import baselines, densekanet, rdnet, reskanet, tck_ukanet, u2kanet, ukanet, vgg  # noqa: F401  (registers models)
from .convert import convert_torch_conv_kan
from .io import load_model, save_model
from .registry import (
    accepted_arguments, count_parameters, create_model, get_model_spec, list_models, register_model, resolved_config,
)
from .torch_conv_kan import load_torch_conv_kan, save_torch_conv_kan
from .densekanet import DenseKANet
from .rdnet import RDNet
from .reskanet import ResKANet
from .u2kanet import U2KANet
from .ukanet import UKANet
from .vgg import VGG_TYPES, VGGKAN

__all__ = [
    "convert_torch_conv_kan",
    "DenseKANet", "RDNet", "ResKANet", "U2KANet", "UKANet", "VGGKAN", "VGG_TYPES", "accepted_arguments", "count_parameters", "create_model",
    "get_model_spec", "list_models", "load_model", "load_torch_conv_kan", "register_model",
    "resolved_config", "save_model", "save_torch_conv_kan",
]
