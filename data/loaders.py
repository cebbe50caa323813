"""Two training loaders with one interface: iterate for (images, labels) batches on the
device, `len()` batches per epoch, `set_epoch(e, start)` before each epoch (start: the first batch
to yield, for a run resumed mid-epoch). Each epoch's order depends only on (seed, epoch) and each
batch's augmentation only on (seed, epoch, batch), so a run resumed anywhere, even mid-epoch,
sees the same batches. Under
torchrun, process r of N takes the r-th consecutive slice of every global batch, and each
image's augmentation depends on its place in the global batch, not on r: N processes see
exactly the batches one process sees, split into N groups (so --m-sharpness B/N on one process
trains what N processes train).

DeviceLoader: the whole uint8 set lives on the training device; crops, flips and cutout
are batched tensor ops (a CPU pipeline on a few cores cannot feed a fast GPU run).
WorkerLoader: torchvision transforms in DataLoader workers (AutoAugment, or as a fallback).
"""

import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.augment import AUGMENTATIONS, Normaliser, channel_stats, mixup, mixup_weight, pad_batch, pad_images, \
    per_image_transform, random_crop_flip
from data.autoaugment import autoaugment
from data.splits import make_splits, sizes
from engine.stopping import ignore_stop_signals

LOADERS = ("auto", "device", "workers")


def derived_seed(*key):
    """An independent 64-bit seed for each integer key (seed, epoch, ...)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0])


def seeded_generator(device, *key):
    return torch.Generator(device=device).manual_seed(derived_seed(*key))


def batch_generators(loader):
    """(i, generator) for each batch i from loader.start: the generator reseeded from (seed, epoch, i),
    so batch i draws the same augmentation whichever batch the iteration started at."""
    generator = torch.Generator(device=loader.device)
    for i in range(loader.start, len(loader)):
        yield i, generator.manual_seed(derived_seed(loader.seed, loader.epoch, i, 1))


def _mixed(loader, i, images, labels):
    """Mixup of batch i when the loader has it (a weight per global batch, from (seed, epoch, i))."""
    if not loader.mixup:
        return images, labels
    alpha, num_classes = loader.mixup
    return mixup(images, labels, num_classes, mixup_weight(alpha, derived_seed(loader.seed, loader.epoch, i, 2)))


class DeviceLoader:
    def __init__(self, images, labels, *, batch_size, device, normaliser, augment="none", train=False,
                 seed=0, padding_mode="reflect", rank=0, world_size=1, mixup=None):
        self.crop = train and augment != "none"
        self.autoaugment = train and augment.startswith("autoaugment")  # the official policy, on the device
        self.padding_mode = padding_mode
        pad_once = self.crop and not self.autoaugment  # AutoAugment acts on the unpadded image, then we pad
        self.images = torch.from_numpy(pad_images(images, padding_mode) if pad_once else images).to(device)
        self.labels = torch.from_numpy(labels).to(device)
        self.batch_size, self.local_batch = batch_size, batch_size // world_size
        self.device, self.normaliser, self.train = torch.device(device), normaliser, train
        self.seed, self.rank, self.epoch, self.start, self.mixup = seed, rank, 0, 0, mixup  # mixup: (alpha, classes)

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def __iter__(self):
        if not self.train:
            for start in range(0, len(self.labels), self.batch_size):
                yield self.normaliser(self.images[start:start + self.batch_size], None), \
                    self.labels[start:start + self.batch_size]
            return
        # The same order and the same augmentation draws on every rank; each takes its slice.
        order = torch.randperm(len(self.labels), generator=seeded_generator(self.device, self.seed, self.epoch),
                               device=self.device)
        part = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        for i, generator in batch_generators(self):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size][part]
            images = self.images[idx]
            if self.autoaugment:
                images = pad_batch(autoaugment(images, generator, part, self.batch_size), self.padding_mode)
            if self.crop:
                images = random_crop_flip(images, generator, part, self.batch_size)
            yield _mixed(self, i, self.normaliser(images, generator, part, self.batch_size), self.labels[idx])


class _TransformedImages(Dataset):
    """Per-image transforms whose randomness depends on (seed, epoch, image), not on the worker."""

    def __init__(self, images, labels, transform, seed):
        self.images, self.labels, self.transform, self.seed, self.epoch = images, labels, transform, seed, 0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global generator
            torch.manual_seed(derived_seed(self.seed, self.epoch, i))
            return self.transform(torch.from_numpy(self.images[i])), int(self.labels[i])


class _GlobalBatchSlices(Sampler):
    """Rank r's indices: the r-th slice of every global batch of a (seed, epoch) permutation."""

    def __init__(self, n, batch_size, seed, rank, world_size):
        self.n, self.batch_size, self.seed, self.rank, self.epoch, self.start = n, batch_size, seed, rank, 0, 0
        self.local = batch_size // world_size

    def __len__(self):
        return (self.n // self.batch_size - self.start) * self.local

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(derived_seed(self.seed, self.epoch)))
        for batch in range(self.start, self.n // self.batch_size):
            first = batch * self.batch_size + self.rank * self.local
            yield from order[first:first + self.local].tolist()


class WorkerLoader:
    def __init__(self, images, labels, *, batch_size, device, normaliser, augment, seed, padding_mode, rank,
                 world_size, workers, policy, mixup):  # no defaults: build_loaders passes every one
        self.dataset = _TransformedImages(images, labels, per_image_transform(augment, padding_mode, policy), seed)
        self.sampler = _GlobalBatchSlices(len(labels), batch_size, seed, rank, world_size)
        self.device = torch.device(device)
        # Workers start afresh each epoch (persistent_workers=False), so they see the new epoch.
        self.loader = DataLoader(self.dataset, batch_size=batch_size // world_size, sampler=self.sampler,
                                 num_workers=workers, pin_memory=self.device.type == "cuda", drop_last=True,
                                 persistent_workers=False, worker_init_fn=ignore_stop_signals)
        self.normaliser, self.seed, self.epoch, self.start, self.mixup = normaliser, seed, 0, 0, mixup
        self.batch_size, self.part = batch_size, slice(rank * (batch_size // world_size),
                                                        (rank + 1) * (batch_size // world_size))

    def set_epoch(self, epoch, start=0):
        self.epoch = self.dataset.epoch = self.sampler.epoch = epoch
        self.start = self.sampler.start = start

    def __len__(self):
        return len(self.dataset) // self.batch_size

    def __iter__(self):
        for (i, generator), (images, labels) in zip(batch_generators(self), self.loader):  # cutout per global batch
            images = images.to(self.device, non_blocking=True)
            yield _mixed(self, i, self.normaliser(images, generator, self.part, self.batch_size),
                         labels.to(self.device, non_blocking=True))


def build_loaders(data, *, augment, batch_size, device, seed=0, loader="auto", workers=4,
                  padding_mode="reflect", dtype=torch.float32, val_split=0.0, label_noise=0.0, subset=0,
                  eval_batch_size=None, rank=0, world_size=1, channels_last=True, autoaugment_policy="official",
                  cutout_placement="batch", noise_rule="uniform", mixup_alpha=0.0, relabel=None):
    """Returns (train_loader, {"test": loader, "val": loader?}). `batch_size` is the global
    batch; each of `world_size` replicas gets batch_size / world_size of it. relabel: a function
    (uint8 images, labels, mean, std) -> labels that replaces the training labels (bootstrapping)."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    torchvision_aa = augment.startswith("autoaugment") and autoaugment_policy == "torchvision"
    if loader == "device" and torchvision_aa:
        raise ValueError("torchvision's AutoAugment runs in DataLoader workers; use --loader workers (or auto)")
    sizes(len(data.train_labels), subset, val_split, batch_size, label_noise)
    splits = make_splits(data, subset, val_split, label_noise, seed, noise_rule)
    mean, std = channel_stats(splits.train_images)
    if relabel is not None:
        splits.train_labels = np.asarray(relabel(splits.train_images, splits.train_labels, mean, std), dtype=np.int64)
    common = dict(device=device, seed=seed, padding_mode=padding_mode, rank=rank, world_size=world_size,
                  mixup=(mixup_alpha, data.num_classes) if mixup_alpha else None)
    train_norm = Normaliser(mean, std, device, dtype, augment.endswith("cutout"), channels_last=channels_last,
                            placement=cutout_placement)
    if loader == "workers" or torchvision_aa:
        train = WorkerLoader(splits.train_images, splits.train_labels, batch_size=batch_size, augment=augment,
                             normaliser=train_norm, workers=workers, policy=autoaugment_policy, **common)
    else:
        train = DeviceLoader(splits.train_images, splits.train_labels, batch_size=batch_size, augment=augment,
                             normaliser=train_norm, train=True, **common)
    eval_norm = Normaliser(mean, std, device, dtype, channels_last=channels_last)
    evals = {name: DeviceLoader(x, y, batch_size=eval_batch_size or batch_size, device=device,
                                normaliser=eval_norm)
             for name, (x, y) in splits.eval_sets.items()}
    return train, evals
