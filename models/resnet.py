"""CIFAR ResNets. ResNet-18 (He et al., CVPR 2016) in its CIFAR form: 3x3 stride-1 stem without
max-pool, four stages of 64/128/256/512 channels with two post-activation basic blocks each,
11,173,962 parameters for 10 classes. ResNet-32 (He et al.'s own CIFAR network) and the wider
ResNet-32 of Jiang et al. 2019, for the paper's label-noise experiment (Table 4)."""

from functools import partial

import torch.nn as nn
import torch.nn.functional as F

from models.init import classify, init_weights


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the shortcut, then ReLU. Where the shape changes the shortcut is a
    strided 1x1 convolution with BatchNorm, or, with zero_pad, He et al.'s parameter-free option A."""

    def __init__(self, in_channels, out_channels, stride, zero_pad=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _ZeroPadShortcut(stride, out_channels - in_channels) if zero_pad else nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _CifarResNet(nn.Module):
    """A 3x3 conv-BN-ReLU stem at the first stage's width, then `per_stage` blocks per
    (width, stride) stage (the stride on each stage's first block), global pooling, a linear layer."""

    def __init__(self, block, stages, per_stage, num_classes):
        super().__init__()
        channels = stages[0][0]
        self.conv1 = nn.Conv2d(3, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        layers = []
        for width, stride in stages:
            for i in range(per_stage):
                layers.append(block(channels, width, stride if i == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x):
        out = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return classify(self.fc, out)


class ResNet18(_CifarResNet):
    def __init__(self, num_classes=10):
        super().__init__(BasicBlock, ((64, 1), (128, 2), (256, 2), (512, 2)), 2, num_classes)


class _ZeroPadShortcut(nn.Module):
    """Option A (He et al. 2016): subsample by the stride and zero-pad the new channels."""

    def __init__(self, stride, extra_channels):
        super().__init__()
        self.stride, self.extra = stride, extra_channels

    def forward(self, x):
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        return F.pad(shortcut, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2)) if self.extra else shortcut


class ResNet32(_CifarResNet):
    """ResNet-32 for CIFAR (He et al., CVPR 2016, Section 4.2): a 3x3 stem of 16 channels, three
    stages of 5 blocks with 16/32/64 channels, option-A shortcuts. 464,154 parameters for 10 classes."""

    def __init__(self, num_classes=10):
        super().__init__(partial(BasicBlock, zero_pad=True), ((16, 1), (32, 2), (64, 2)), 5, num_classes)


class _JiangBlock(nn.Module):
    """A block of the ResNet in Jiang et al.'s released code (google-research mentormix
    resnet_model.py _residual): pre-activation with leaky ReLU (slope 0.1), and where the width
    changes an average-pooled, zero-padded shortcut (half the new channels on each side). The
    network's first block applies ReLU and then BatchNorm before it branches, as that code does."""

    def __init__(self, in_channels, out_channels, stride, activate_before_residual):
        super().__init__()
        self.activate_before_residual = activate_before_residual
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-3)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=1e-3)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.stride, self.extra = stride, out_channels - in_channels

    def forward(self, x):
        if self.activate_before_residual:
            x = self.bn1(F.leaky_relu(x, 0.1))
            shortcut = out = x
        else:
            shortcut, out = x, F.leaky_relu(self.bn1(x), 0.1)
        out = self.conv2(F.leaky_relu(self.bn2(self.conv1(out)), 0.1))
        if self.extra:
            if self.stride > 1:
                shortcut = F.avg_pool2d(shortcut, self.stride)
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.extra // 2, self.extra // 2))
        return out + shortcut


class JiangResNet32(nn.Module):
    """The "ResNet-32" of Jiang et al.'s released code (mentormix cifar_train_mentormix.py:
    resnet_model with 5 residual units a stage, filters 64 -> 128/256/512, no bottleneck): a
    ResNet-32 four to eight times as wide as He et al.'s. 29,442,378 parameters for 10 classes. It
    is what the label-noise numbers of Jiang et al. and of the SAM paper's Table 4 imply: He et
    al.'s ResNet-32 reaches about 93% on clean CIFAR-10, below the 95%+ reported there at 20%
    noise."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        layers, channels = [], 64
        for stage, (width, stride) in enumerate(((128, 1), (256, 2), (512, 2))):
            for i in range(5):
                layers.append(_JiangBlock(channels, width, stride if i == 0 else 1,
                                          activate_before_residual=stage == 0 and i == 0))
                channels = width
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512, eps=1e-3)
        self.fc = nn.Linear(512, num_classes)
        init_weights(self)  # Kaiming-normal fan_out convolutions, as resnet_model.py _conv

    def forward(self, x):
        out = F.leaky_relu(self.bn(self.blocks(self.conv1(x))), 0.1)
        return classify(self.fc, out)
