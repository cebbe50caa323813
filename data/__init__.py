"""CIFAR-10/100 loading, the paper's augmentations and the two training loaders."""

from data.cifar import DataError, default_data_dir, load_cifar
from data.loaders import build_loaders

__all__ = ["DataError", "build_loaders", "default_data_dir", "load_cifar"]
