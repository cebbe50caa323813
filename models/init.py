"""What the models share: the classifier head, and weight initialisation as in the reference implementations
(Zagoruyko & Komodakis' WRN code, torchvision's ResNet): Kaiming-normal convolutions
(fan_out, ReLU gain), BatchNorm weight 1 and bias 0, linear bias 0 (linear weight keeps
PyTorch's default uniform init)."""

import torch.nn as nn


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
    """Global average pooling, then the linear classifier. A mean over the spatial dimensions rather
    than adaptive_avg_pool2d: the same numbers, and under vmap (the m-sharpness groups) on channels_last
    activations adaptive_avg_pool2d falls back to a slow per-group loop (no batching rule for as_strided_)."""
    return fc(features.mean((2, 3)))
