"""The paper's augmentations (Foret et al., Table 1) as batched tensor ops, plus the
torchvision per-image pipeline used by the DataLoader path.

basic:       4-pixel padding (reflect by default, as the official implementation), random
             32x32 crop, random horizontal flip, per-channel normalisation.
cutout:      basic + a 16x16 window zeroed, centred uniformly in the image and clipped at the
             borders (DeVries & Taylor 2017), after normalisation, so the window holds the mean
             colour. Placement "batch" (official augmentation.py cutout): one window for the
             whole batch; "image": one per image, as DeVries & Taylor's code.
autoaugment: AutoAugment, then basic (official order: AutoAugment before flip and crop).
             Policy "official": the SAM code's CIFAR policy (data/autoaugment.py); "torchvision":
             torchvision's CIFAR10 policy, after crop and flip, in DataLoader workers.
autoaugment_cutout: both, as the paper's appendix combines them.

mixup (a separate setting, Zhang et al. 2017, as the official augmentation.py mixup): one weight
lambda ~ Beta(alpha, alpha) per batch, taken as max(lambda, 1 - lambda); each image is mixed with
the one at the mirrored position of the batch, and the labels become the same mix of one-hots.
"""

import numpy as np
import torch
from torchvision.transforms import v2

from data.autoaugment import OfficialAutoAugment

AUGMENTATIONS = ("none", "basic", "cutout", "autoaugment", "autoaugment_cutout")
PADDING_MODES = ("reflect", "constant", "edge", "symmetric")
AUTOAUGMENT_POLICIES = ("official", "torchvision")
CUTOUT_PLACEMENTS = ("batch", "image")
PAD, CROP, CUTOUT = 4, 32, 16


def pad_images(images, padding_mode="reflect"):
    """Pad a uint8 N x C x H x W array once, so crops are a gather."""
    return np.pad(images, ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD)), mode=padding_mode)


def pad_batch(images, padding_mode="reflect"):
    """pad_images for a batch already on the device (after AutoAugment): one gather."""
    if padding_mode == "constant":
        return torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD))
    rows, cols = (torch.from_numpy(np.pad(np.arange(n), PAD, mode=padding_mode)).to(images.device)
                  for n in images.shape[2:])
    return images[:, :, rows[:, None], cols[None, :]]


def random_crop_flip(padded, generator, part=slice(None), total=None):
    """Per-image random CROP x CROP crop of padded images and a horizontal flip with
    probability 1/2, in one gather. padded: B x C x (CROP + 2 PAD)^2, any dtype.
    The draws are made for `total` images (default B), of which `part` are these: a process
    holding one slice of a global batch draws what a single process would for that slice."""
    b, c, h, w = padded.shape
    device = padded.device
    total = total or b
    top = torch.randint(0, h - CROP + 1, (total,), generator=generator, device=device)[part]
    left = torch.randint(0, w - CROP + 1, (total,), generator=generator, device=device)[part]
    flip = (torch.rand(total, generator=generator, device=device) < 0.5)[part]
    span = torch.arange(CROP, device=device)
    rows = top[:, None] + span
    cols = left[:, None] + span
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip is reversed column order
    return padded[torch.arange(b, device=device)[:, None, None, None],
                  torch.arange(c, device=device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def cutout(images, generator, size=CUTOUT, part=slice(None), total=None, placement="image"):
    """Zero a size x size window (centre uniform over the image, clipped): one per image, or one
    for the whole batch. Draws for `total` images of which `part` are these, as random_crop_flip."""
    b, _, h, w = images.shape
    device = images.device
    total = total or b
    draws = total if placement == "image" else 1
    cy = torch.randint(0, h, (draws, 1), generator=generator, device=device)
    cx = torch.randint(0, w, (draws, 1), generator=generator, device=device)
    cy, cx = (cy[part], cx[part]) if placement == "image" else (cy.expand(b, 1), cx.expand(b, 1))
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


class Normaliser:
    """uint8 batch on the device -> normalised float batch, cutout (when asked) after normalisation:
    the last step of both training loaders, and of every evaluation and measurement."""

    def __init__(self, mean, std, device, dtype=torch.float32, cutout=False, *, channels_last, placement="batch"):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.dtype, self.cutout, self.channels_last, self.placement = dtype, cutout, channels_last, placement

    def __call__(self, images, generator=None, part=slice(None), total=None):
        """generator: the cutout draws (unused without cutout); part/total: as random_crop_flip."""
        x = (images.to(torch.float32) / 255.0 - self.mean) / self.std
        if self.cutout:
            x = cutout(x, generator, part=part, total=total, placement=self.placement)
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def per_image_transform(augment, padding_mode="reflect", policy="official"):
    """torchvision pipeline on uint8 C x H x W tensors for the DataLoader path (cutout and
    normalisation happen on the batch afterwards, exactly as on the GPU path)."""
    if augment == "none":
        return v2.Identity()
    crop_flip = [v2.RandomCrop(CROP, padding=PAD, padding_mode=padding_mode), v2.RandomHorizontalFlip()]
    if not augment.startswith("autoaugment"):
        return v2.Compose(crop_flip)
    if policy == "official":  # augmentation.py / dataset_source.py: AutoAugment, then flip, then pad and crop
        return v2.Compose([OfficialAutoAugment(), *crop_flip[::-1]])
    return v2.Compose([*crop_flip, v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)])


def mixup(images, labels, num_classes, lam):
    """Mix a normalised batch with itself reversed: lam * x + (1 - lam) * x[::-1], and the labels'
    one-hots likewise (soft labels, which cross-entropy takes as probabilities)."""
    one_hot = torch.nn.functional.one_hot(labels, num_classes).to(images.dtype)
    return lam * images + (1 - lam) * images.flip(0), lam * one_hot + (1 - lam) * one_hot.flip(0)


def mixup_weight(alpha, seed):
    """lambda ~ Beta(alpha, alpha), taken as max(lambda, 1 - lambda), from a seed (host side, no sync)."""
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return max(lam, 1 - lam)
