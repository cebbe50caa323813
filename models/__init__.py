"""Models by name: build_model("wrn28_10"), build_model("resnet18", num_classes=100)."""

import re

from models.resnet import ResNet18
from models.wide_resnet import WideResNet

_WRN = re.compile(r"wrn(\d+)_(\d+)")
_NAMED = ("wrn28_10", "wrn16_8", "resnet18")


def available_models():
    return list(_NAMED) + ["wrn<depth>_<width> (depth = 6n+4)"]


def model_spec(name, **options):
    """Check a model name and its options without building it: -> (class, kwargs)."""
    if name == "resnet18":
        if options:
            raise ValueError(f"resnet18 takes no options, got {sorted(options)}")
        return ResNet18, {}
    match = _WRN.fullmatch(name)
    if match:
        unknown = set(options) - {"dropout"}
        if unknown:
            raise ValueError(f"{name} takes only the option 'dropout', got {sorted(unknown)}")
        depth, width = int(match[1]), int(match[2])
        if depth < 10 or (depth - 4) % 6 or width < 1:
            raise ValueError(f"{name}: WideResNet depth must be 6n+4 (10, 16, 22, 28, ...) and width >= 1")
        return WideResNet, dict(depth=depth, width=width, **options)
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(available_models())}")


def build_model(name, num_classes=10, **options):
    """`options` go to the model: `dropout` for WideResNets; ResNet-18 takes none."""
    cls, kwargs = model_spec(name, **options)
    return cls(num_classes=num_classes, **kwargs)
