"""The paper's augmentations (Foret et al., Table 1) as batched tensor ops, plus the
torchvision per-image pipeline used by the DataLoader path.

basic:       4-pixel padding (reflect by default, as the official implementation), random
             32x32 crop, random horizontal flip, per-channel normalisation.
cutout:      basic + one 16x16 window zeroed per image, centred uniformly in the image and
             clipped at the borders (DeVries & Taylor 2017); applied after normalisation as
             in their code, so the window holds the mean colour.
autoaugment: basic + torchvision's AutoAugment, CIFAR-10 policy (DataLoader path only).
"""

import numpy as np
import torch
from torchvision.transforms import v2

AUGMENTATIONS = ("none", "basic", "cutout", "autoaugment")
PADDING_MODES = ("reflect", "constant", "edge", "symmetric")
PAD, CROP, CUTOUT = 4, 32, 16


def pad_images(images, padding_mode="reflect"):
    """Pad a uint8 N x C x H x W array once, so crops are a gather."""
    return np.pad(images, ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD)), mode=padding_mode)


def random_crop_flip(padded, generator):
    """Per-image random CROP x CROP crop of padded images and a horizontal flip with
    probability 1/2, in one gather. padded: B x C x (CROP + 2 PAD)^2, any dtype."""
    b, c, h, w = padded.shape
    device = padded.device
    top = torch.randint(0, h - CROP + 1, (b,), generator=generator, device=device)
    left = torch.randint(0, w - CROP + 1, (b,), generator=generator, device=device)
    flip = torch.rand(b, generator=generator, device=device) < 0.5
    span = torch.arange(CROP, device=device)
    rows = top[:, None] + span
    cols = left[:, None] + span
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip is reversed column order
    return padded[torch.arange(b, device=device)[:, None, None, None],
                  torch.arange(c, device=device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def cutout(images, generator, size=CUTOUT):
    """Zero one size x size window per image (centre uniform over the image, clipped)."""
    b, _, h, w = images.shape
    device = images.device
    cy = torch.randint(0, h, (b, 1), generator=generator, device=device)
    cx = torch.randint(0, w, (b, 1), generator=generator, device=device)
    ys, xs = torch.arange(h, device=device), torch.arange(w, device=device)
    in_y = (ys >= cy - size // 2) & (ys < cy + size - size // 2)
    in_x = (xs >= cx - size // 2) & (xs < cx + size - size // 2)
    return images.masked_fill((in_y[:, :, None] & in_x[:, None, :])[:, None], 0.0)


def channel_stats(images):
    """Exact per-channel mean and std (0-1 scale) of a uint8 N x C x H x W array, from
    each channel's value histogram (no float copy of the data set)."""
    values = np.arange(256, dtype=np.float64)
    mean, std = [], []
    for ch in range(images.shape[1]):
        p = np.bincount(images[:, ch].ravel(), minlength=256) / images[:, ch].size
        m = (p * values).sum()
        mean.append(m)
        std.append(np.sqrt((p * (values - m) ** 2).sum()))
    return np.array(mean) / 255.0, np.array(std) / 255.0


def to_model_input(images, mean, std, dtype, cutout_generator=None, channels_last=True):
    """uint8 batch on the device -> normalised float batch (cutout after normalisation)."""
    x = (images.to(torch.float32) / 255.0 - mean) / std
    if cutout_generator is not None:
        x = cutout(x, cutout_generator)
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def per_image_transform(augment, padding_mode="reflect"):
    """torchvision pipeline on uint8 C x H x W tensors for the DataLoader path (cutout and
    normalisation happen on the batch afterwards, exactly as on the GPU path)."""
    steps = [v2.RandomCrop(CROP, padding=PAD, padding_mode=padding_mode), v2.RandomHorizontalFlip()]
    if augment == "autoaugment":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
    return v2.Compose(steps)
