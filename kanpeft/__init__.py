"""kanpeft: parameter-efficient fine-tuning of pretrained KAN backbones.

>>> prepared = kanpeft.prepare(model, "scales", trainable_modules=["classifier"])
>>> kanpeft.trainable_report(prepared)
>>> merged = kanpeft.merge(prepared)
"""
from .api import (TrainableReport, adapter_method, load_adapter, merge, method_config, prepare,
                  save_adapter, trainable_report)
from .methods import METHODS

__version__ = "0.1.0"
__all__ = ["METHODS", "TrainableReport", "adapter_method", "load_adapter", "merge",
           "method_config", "prepare", "save_adapter", "trainable_report"]
