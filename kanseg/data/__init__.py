"""Data: dataset layouts, MONAI pipelines, loaders, synthetic BraTS, checks and conversion."""
from .check import CheckReport, Issue, check_dataset
from .config import AugmentConfig, DataConfig
from .convert import convert_to_nifti, convert_to_nnunet
from .datasets import build_datasets, build_loaders, make_dataset
from .layouts import (
    DataError,
    LabelSpec,
    input_channels,
    label_spec,
    load_cases,
    split_cases,
    test_cases,
)
from .transforms import LabelsToRegionsd, build_transforms, prediction_inverter

__all__ = [
    "AugmentConfig", "CheckReport", "DataConfig", "DataError", "Issue", "LabelSpec",
    "LabelsToRegionsd", "build_datasets", "build_loaders", "build_transforms", "check_dataset",
    "convert_to_nifti", "convert_to_nnunet", "input_channels", "label_spec", "load_cases",
    "make_dataset", "prediction_inverter", "split_cases", "test_cases",
]
