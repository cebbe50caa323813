"""WideResNet-d-k for 32x32 inputs: pre-activation basic blocks, three stages of 16k/32k/64k
channels, (d - 4) / 6 blocks each. Two variants:

WideResNet (`wrn<d>_<k>`): Zagoruyko & Komodakis (BMVC 2016), as davda54/sam uses it: a 1x1
convolution where a block changes shape, optional dropout between a block's convolutions.
WRN-28-10 for 10 classes: 36,479,194 parameters.

SamWideResNet (`sam_wrn<d>_<k>`): the SAM authors' (google-research/sam sam_jax/models/
wide_resnet.py): identity shortcuts, average-pooled and zero-padded where the shape changes
(_output_add), the first block activating before it branches, no dropout, and the final dense
layer drawn from U(-1/sqrt(classes), 1/sqrt(classes)). WRN-28-10 for 10 classes: 36,220,634.

norm="none" replaces every BatchNorm by the identity (the paper's Hessian spectra, Section 4.2,
use a WideResNet without BatchNorm)."""

import math

import torch.nn as nn
import torch.nn.functional as F

from models.init import classify, init_weights

NORMS = ("batch", "none")


def _norm(kind, channels):
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.Identity()


def check_wide_resnet(depth, width, norm):
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
    if width < 1:
        raise ValueError(f"WideResNet width must be >= 1, got {width}")
    if norm not in NORMS:
        raise ValueError(f"WideResNet norm must be one of {', '.join(NORMS)}, got {norm!r}")


class PreActBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride, dropout, norm="batch"):
        super().__init__()
        self.bn1 = _norm(norm, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = _norm(norm, out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        # A 1x1 projection where the shape changes; it reads the pre-activated input, as in
        # the authors' code.
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + shortcut


class _WideResNet(nn.Module):
    """What both variants share: a 16-channel 3x3 stem, three stages of (depth - 4) / 6 blocks
    (16k/32k/64k channels, strides 1/2/2, the stride on each stage's first block), a final
    norm-ReLU, global pooling and a linear layer. block(in, out, stride, first) builds one block
    (first: the network's first block)."""

    def __init__(self, depth, width, num_classes, norm, block):
        super().__init__()
        check_wide_resnet(depth, width, norm)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        per_stage, channels = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
        self.blocks = nn.Sequential(*[
            block(channels[stage] if i == 0 else channels[stage + 1], channels[stage + 1], stride if i == 0 else 1,
                  stage == 0 and i == 0)
            for stage, stride in enumerate((1, 2, 2)) for i in range(per_stage)])
        self.bn = _norm(norm, channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        init_weights(self)

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return classify(self.fc, out)


class WideResNet(_WideResNet):
    def __init__(self, depth=28, width=10, num_classes=10, dropout=0.0, norm="batch"):
        super().__init__(depth, width, num_classes, norm, lambda i, o, s, first: PreActBlock(i, o, s, dropout, norm))


class SamBlock(nn.Module):
    """google-research/sam WideResnetBlock: BatchNorm-ReLU, conv, BatchNorm-ReLU, conv, plus the
    shortcut. The shortcut is the block's input, or, in the network's first block (which
    activates before it branches), the activated input; where the shape changes it is
    average-pooled by the stride and zero-padded with the new channels (_output_add)."""

    def __init__(self, in_channels, out_channels, stride, activate_before_residual, norm):
        super().__init__()
        self.activate_before_residual = activate_before_residual
        self.bn1 = _norm(norm, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = _norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.stride, self.extra_channels = stride, out_channels - in_channels

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = out if self.activate_before_residual else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        if self.extra_channels:
            if self.stride > 1:
                shortcut = F.avg_pool2d(shortcut, self.stride)
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        return out + shortcut


class SamWideResNet(_WideResNet):
    def __init__(self, depth=28, width=10, num_classes=10, norm="batch"):
        # init_weights: Kaiming-normal fan_out convolutions (utils.conv_kernel_init_fn), BatchNorm 1 and 0
        super().__init__(depth, width, num_classes, norm, lambda i, o, s, first: SamBlock(i, o, s, first, norm))
        # utils.dense_layer_init_fn: U(-1/sqrt(classes), 1/sqrt(classes)), "about 0.5% better on CIFAR-100"
        nn.init.uniform_(self.fc.weight, -1 / math.sqrt(num_classes), 1 / math.sqrt(num_classes))
