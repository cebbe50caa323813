"""The paper's data extras: a held-out validation split (how rho was tuned), symmetric
label noise (Table 4), and a first-N subset for smoke tests."""

from dataclasses import dataclass

import numpy as np

VAL_SPLIT_SEED = 0  # the same validation images for every run, whatever its seed


@dataclass
class Splits:
    train_images: np.ndarray
    train_labels: np.ndarray
    eval_sets: dict  # name -> (images, labels): "test", and "val" when held out
    num_classes: int


def make_splits(data, subset=0, val_split=0.0, label_noise=0.0, seed=0):
    """subset: first N training and first N test images (0 = all). val_split: the fraction of
    training images held out, chosen with a fixed seed. label_noise: the fraction of the
    remaining training labels replaced by a different class, chosen with `seed`."""
    train_x, train_y = data.train_images, data.train_labels
    test_x, test_y = data.test_images, data.test_labels
    if subset:
        train_x, train_y, test_x, test_y = train_x[:subset], train_y[:subset], test_x[:subset], test_y[:subset]
    eval_sets = {"test": (test_x, test_y)}
    if val_split:
        order = np.random.default_rng(VAL_SPLIT_SEED).permutation(len(train_y))
        held = order[:round(val_split * len(train_y))]
        keep = np.sort(order[len(held):])
        eval_sets["val"] = (train_x[np.sort(held)], train_y[np.sort(held)])
        train_x, train_y = train_x[keep], train_y[keep]
    if label_noise:
        train_y = noisy_labels(train_y, label_noise, data.num_classes, seed)
    return Splits(train_x, train_y, eval_sets, data.num_classes)


def noisy_labels(labels, fraction, num_classes, seed):
    """Symmetric noise: exactly round(fraction * N) labels move to a uniformly chosen other class."""
    rng = np.random.default_rng(seed)
    flip = rng.permutation(len(labels))[:round(fraction * len(labels))]
    noisy = labels.copy()
    noisy[flip] = (labels[flip] + rng.integers(1, num_classes, len(flip))) % num_classes
    return noisy
