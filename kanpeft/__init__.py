"""kanpeft: parameter-efficient fine-tuning of pretrained KAN backbones."""
__version__ = "0.1.0"
