"""Models by name: build_model("sam_wrn28_10"), build_model("resnet18", num_classes=100).

    wrn<d>_<k>       WideResNet-d-k of Zagoruyko & Komodakis (1x1 shortcut convolutions), as
                     davda54/sam uses it; options dropout, norm
    sam_wrn<d>_<k>   the SAM authors' WideResNet (google-research/sam: zero-padded identity
                     shortcuts, uniform final layer); option norm
    resnet18         the CIFAR ResNet-18 (He et al. 2016)
    resnet32         He et al.'s CIFAR ResNet-32 (16/32/64 channels, 0.46M parameters)
    resnet32_jiang   the ResNet-32 of Jiang et al.'s released code (64 -> 128/256/512 channels),
                     the one behind the label-noise numbers of the SAM paper's Table 4
"""

import re

from models.resnet import JiangResNet32, ResNet18, ResNet32
from models.wide_resnet import SamWideResNet, WideResNet, check_wide_resnet

_WRN = re.compile(r"(sam_)?wrn([1-9][0-9]*)_([1-9][0-9]*)")  # one spelling per model: ASCII digits, no leading 0
_FIXED = {"resnet18": ResNet18, "resnet32": ResNet32, "resnet32_jiang": JiangResNet32}
_NAMED = ("sam_wrn28_10", "wrn28_10", "wrn16_8", *_FIXED)
_OPTIONS = {WideResNet: ("dropout", "norm"), SamWideResNet: ("norm",), ResNet18: (), ResNet32: (), JiangResNet32: ()}


def available_models():
    return list(_NAMED) + ["wrn<depth>_<width> and sam_wrn<depth>_<width> (depth = 6n+4)"]


def model_spec(name, **options):
    """Check a model name and its options without building it: -> (class, kwargs)."""
    match = _WRN.fullmatch(name)
    if name in _FIXED:
        cls, kwargs = _FIXED[name], {}
    elif match:
        cls = SamWideResNet if match[1] else WideResNet
        depth, width = int(match[2]), int(match[3])
        check_wide_resnet(depth, width, options.get("norm", "batch"))  # the constructor's own check, before building
        kwargs = dict(depth=depth, width=width)
    else:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(available_models())}")
    unknown = set(options) - set(_OPTIONS[cls])
    if unknown:
        allowed = f"only the options {', '.join(_OPTIONS[cls])}" if _OPTIONS[cls] else "no options"
        raise ValueError(f"{name} takes {allowed}; got {', '.join(sorted(unknown))}")
    return cls, {**kwargs, **options}


def build_model(name, num_classes=10, **options):
    """`options` go to the model (dropout and norm for WideResNets)."""
    cls, kwargs = model_spec(name, **options)
    return cls(num_classes=num_classes, **kwargs)
