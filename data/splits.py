"""The paper's data extras: a held-out validation split (how rho was tuned), symmetric
label noise (Table 4), and a first-N subset for smoke tests.

Label noise, two rules:
  uniform: each training label is redrawn, with probability p, uniformly over all K classes, so
           it may land on its own class and the expected share of wrong labels is p (K - 1) / K
           (72% at p = 0.8 on CIFAR-10). This is the rule of Zhang et al. 2017 that Jiang et al.'s
           MentorNet (2018) and "Beyond Synthetic Noise" (2019) use for CIFAR, and so the rule of
           the SAM paper's Table 4, which follows Jiang et al. 2019.
  other:   exactly round(p N) labels move to a uniformly chosen *other* class: p wrong exactly.
"""

from dataclasses import dataclass

import numpy as np

NOISE_RULES = ("uniform", "other")


@dataclass
class Splits:
    train_images: np.ndarray
    train_labels: np.ndarray
    eval_sets: dict  # name -> (images, labels): "test", and "val" when held out
    num_classes: int


def sizes(images, subset, val_split, batch_size, label_noise):
    """(training images, validation images) that `subset` and `val_split` leave of `images` training
    images; ValueError naming the fix when either is empty or smaller than one `batch_size` (None: any
    size), or when --subset or --label-noise would do nothing (all images; no label changed)."""
    if subset >= images:
        raise ValueError(f"--subset {subset} is {'all' if subset == images else 'more than'} the {images} training "
                         f"images; use fewer, or leave it out for all")
    images = subset or images
    keep = images - round(val_split * images)
    if val_split and (keep == images or keep == 0):
        raise ValueError(f"--val-split {val_split} of {images} training images leaves "
                         f"{'no validation' if keep else 'no training'} image; use a fraction that holds out "
                         f"at least one image and keeps at least one")
    if batch_size is not None and keep < batch_size:
        raise ValueError(f"batch size {batch_size} is larger than the {keep} training images; lower --batch-size "
                         f"{'or raise --subset' if subset else 'or --val-split' if val_split else ''}".rstrip())
    if label_noise and round(label_noise * keep) == 0:
        raise ValueError(f"--label-noise {label_noise} of {keep} training images changes no label; use more than "
                         f"{0.5 / keep:.2g}, or 0 for clean labels")
    return keep, images - keep


def make_splits(data, subset=0, val_split=0.0, label_noise=0.0, seed=0, noise_rule="uniform"):
    """subset: first N training and first N test images (0 = all). val_split: the fraction of
    training images held out: the last ones, as the official code holds out train[45000:] (the
    same images for every run, whatever its seed). label_noise: p of the remaining training
    labels' rule `noise_rule` (above), drawn with `seed`; validation and test labels stay clean."""
    train_x, train_y = data.train_images, data.train_labels
    test_x, test_y = data.test_images, data.test_labels
    keep, held = sizes(len(train_y), subset, val_split, None, label_noise)
    if subset:
        train_x, train_y, test_x, test_y = train_x[:subset], train_y[:subset], test_x[:subset], test_y[:subset]
    eval_sets = {"test": (test_x, test_y)}
    if held:
        eval_sets["val"] = (train_x[keep:], train_y[keep:])
        train_x, train_y = train_x[:keep], train_y[:keep]
    if label_noise:
        clean, train_y = train_y, noisy_labels(train_y, label_noise, data.num_classes, seed, noise_rule)
        if (train_y == clean).all():  # the uniform rule may redraw a few labels onto themselves
            raise ValueError(f"--label-noise {label_noise} ({noise_rule}) changes no label of these {len(clean)} "
                             f"training images with seed {seed}; raise it, or use 0 for clean labels")
    return Splits(train_x, train_y, eval_sets, data.num_classes)


def noisy_labels(labels, fraction, num_classes, seed, rule="uniform"):
    """Symmetric label noise by `rule` (see above)."""
    if rule not in NOISE_RULES:
        raise ValueError(f"unknown label-noise rule {rule!r}; choose one of {', '.join(NOISE_RULES)}")
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    if rule == "uniform":
        redraw = rng.random(len(labels)) < fraction
        noisy[redraw] = rng.integers(0, num_classes, int(redraw.sum()))
        return noisy
    flip = rng.permutation(len(labels))[:round(fraction * len(labels))]
    noisy[flip] = (labels[flip] + rng.integers(1, num_classes, len(flip))) % num_classes
    return noisy
