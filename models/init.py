"""What the models share: the classifier head, and weight initialisation as in the reference implementations
(Zagoruyko & Komodakis' WRN code, torchvision's ResNet): Kaiming-normal convolutions
(fan_out, ReLU gain), BatchNorm weight 1 and bias 0, linear bias 0 (linear weight keeps
PyTorch's default uniform init)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


def init_weights(model):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def classify(fc, features):
    """Global average pooling, then the linear classifier."""
    return fc(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))
