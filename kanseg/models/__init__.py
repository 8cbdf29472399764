"""Networks built from the KAN layer core, and the model registry."""
from . import u2kanet, ukanet  # noqa: F401  (registers models)
from .registry import count_parameters, create_model, get_model_spec, list_models, register_model
from .u2kanet import U2KANet
from .ukanet import UKANet

__all__ = [
    "U2KANet", "UKANet", "count_parameters", "create_model", "get_model_spec", "list_models",
    "register_model",
]
