"""The fixed data that sharpness is measured on: a seeded choice of unaugmented training images of a
run (its subset, validation split and noisy labels), normalised as in training."""

import numpy as np
import torch

from data.augment import Normaliser, channel_stats
from data.splits import make_splits


def training_batches(data, config, count, size, seed=0, device="cpu", channels_last=False):
    """`count` batches of `size` training images and the labels the run trained on (for a
    bootstrapped run, the noisy labels it started from), the same for every call with `seed`."""
    splits = make_splits(data, config.get("subset", 0), config.get("val_split", 0.0), config.get("label_noise", 0.0),
                         config.get("seed", 0), config.get("label_noise_rule", "uniform"))
    have = len(splits.train_labels) // size
    if count > have:  # fewer would be measured than asked and recorded
        raise ValueError(f"the run's {len(splits.train_labels)} training images hold {have} batch{'es' if have != 1 else ''}"
                         f" of {size}, not {count}; lower --batches or --batch-size")
    total = count * size
    chosen = np.sort(np.random.default_rng(seed).permutation(len(splits.train_labels))[:total])
    normalise = Normaliser(*channel_stats(splits.train_images), device, channels_last=channels_last)
    x = normalise(torch.from_numpy(splits.train_images[chosen]).to(device))
    labels = torch.from_numpy(splits.train_labels[chosen]).to(device)
    return [(x[i:i + size], labels[i:i + size]) for i in range(0, total, size)]
