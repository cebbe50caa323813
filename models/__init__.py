"""Models by name: build_model("wrn28_10"), build_model("resnet18", num_classes=100)."""

import re

from models.resnet import ResNet18
from models.wide_resnet import WideResNet

_WRN = re.compile(r"wrn(\d+)_(\d+)")
_NAMED = ("wrn28_10", "wrn16_8", "resnet18")


def available_models():
    return list(_NAMED) + ["wrn<depth>_<width> (depth = 6n+4)"]


def build_model(name, num_classes=10, **options):
    """`options` go to the model: `dropout` for WideResNets; ResNet-18 takes none."""
    if name == "resnet18":
        if options:
            raise ValueError(f"resnet18 takes no options, got {sorted(options)}")
        return ResNet18(num_classes)
    match = _WRN.fullmatch(name)
    if match:
        unknown = set(options) - {"dropout"}
        if unknown:
            raise ValueError(f"{name} takes only the option 'dropout', got {sorted(unknown)}")
        return WideResNet(int(match[1]), int(match[2]), num_classes, **options)
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(available_models())}")
