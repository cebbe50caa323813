"""Two training loaders with one interface: iterate for (images, labels) batches on the
device, `len()` batches per epoch, `set_epoch(e)` before each epoch. Each epoch's order and
augmentation depend only on (seed, epoch), so a resumed run sees the same batches.

DeviceLoader: the whole uint8 set lives on the training device; crops, flips and cutout
are batched tensor ops (a CPU pipeline on a few cores cannot feed a fast GPU run).
WorkerLoader: torchvision transforms in DataLoader workers (AutoAugment, or as a fallback).
"""

import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from data.augment import AUGMENTATIONS, channel_stats, pad_images, per_image_transform, random_crop_flip, \
    to_model_input
from data.splits import make_splits

LOADERS = ("auto", "device", "workers")


def derived_seed(*key):
    """An independent 64-bit seed for each integer key (seed, epoch, ...)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0])


def seeded_generator(device, *key):
    return torch.Generator(device=device).manual_seed(derived_seed(*key))


class _Normaliser:
    """The last, shared step of both loaders: uint8 batch -> normalised (cutout) float batch."""

    def __init__(self, mean, std, device, dtype, cutout, channels_last):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.dtype, self.cutout, self.channels_last = dtype, cutout, channels_last

    def __call__(self, images, generator):
        return to_model_input(images, self.mean, self.std, self.dtype,
                              generator if self.cutout else None, self.channels_last)


class DeviceLoader:
    def __init__(self, images, labels, *, batch_size, device, normaliser, augment="none", train=False,
                 seed=0, padding_mode="reflect", rank=0, world_size=1):
        self.crop = train and augment in ("basic", "cutout")
        self.images = torch.from_numpy(pad_images(images, padding_mode) if self.crop else images).to(device)
        self.labels = torch.from_numpy(labels).to(device)
        self.batch_size, self.local_batch = batch_size, batch_size // world_size
        self.device, self.normaliser, self.train = torch.device(device), normaliser, train
        self.seed, self.rank, self.epoch = seed, rank, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def __iter__(self):
        n, generator = len(self.labels), None
        if self.train:  # same order on every rank, own augmentation stream per rank
            order = torch.randperm(n, generator=seeded_generator(self.device, self.seed, self.epoch),
                                   device=self.device)
            generator = seeded_generator(self.device, self.seed, self.epoch, self.rank + 1)
        else:
            order = torch.arange(n, device=self.device)
        for i in range(len(self)):
            start = i * self.batch_size + (self.rank * self.local_batch if self.train else 0)
            idx = order[start:start + (self.local_batch if self.train else self.batch_size)]
            images = self.images[idx]
            if self.crop:
                images = random_crop_flip(images, generator)
            yield self.normaliser(images, generator), self.labels[idx]


class _TransformedImages(Dataset):
    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(torch.from_numpy(self.images[i])), int(self.labels[i])


class WorkerLoader:
    def __init__(self, images, labels, *, batch_size, device, normaliser, augment="basic", seed=0,
                 padding_mode="reflect", rank=0, world_size=1, workers=4):
        dataset = _TransformedImages(images, labels, per_image_transform(augment, padding_mode))
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.generator = torch.Generator()  # seeds the workers' transforms
        self.device = torch.device(device)
        self.loader = DataLoader(dataset, batch_size=batch_size // world_size, sampler=self.sampler,
                                 num_workers=workers, pin_memory=self.device.type == "cuda", drop_last=True,
                                 persistent_workers=False, generator=self.generator)
        self.normaliser, self.seed, self.rank, self.epoch = normaliser, seed, rank, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(derived_seed(self.seed, epoch, 0, self.rank))  # workers' transforms

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        generator = seeded_generator(self.device, self.seed, self.epoch, self.rank + 1)
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            yield self.normaliser(images, generator), labels.to(self.device, non_blocking=True)


def build_loaders(data, *, augment, batch_size, device, seed=0, loader="auto", workers=4,
                  padding_mode="reflect", dtype=torch.float32, val_split=0.0, label_noise=0.0, subset=0,
                  eval_batch_size=None, rank=0, world_size=1, channels_last=True):
    """Returns (train_loader, {"test": loader, "val": loader?}). `batch_size` is the global
    batch; each of `world_size` replicas gets batch_size / world_size of it."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    if loader == "device" and augment == "autoaugment":
        raise ValueError("autoaugment runs in DataLoader workers; use --loader workers (or auto)")
    splits = make_splits(data, subset, val_split, label_noise, seed)
    if len(splits.train_labels) < batch_size:
        raise ValueError(f"batch size {batch_size} is larger than the {len(splits.train_labels)} training "
                         f"images; lower --batch-size or raise --subset")
    mean, std = channel_stats(splits.train_images)
    common = dict(device=device, seed=seed, padding_mode=padding_mode, rank=rank, world_size=world_size)
    train_norm = _Normaliser(mean, std, device, dtype, augment == "cutout", channels_last)
    if loader == "workers" or augment == "autoaugment":
        train = WorkerLoader(splits.train_images, splits.train_labels, batch_size=batch_size, augment=augment,
                             normaliser=train_norm, workers=workers, **common)
    else:
        train = DeviceLoader(splits.train_images, splits.train_labels, batch_size=batch_size, augment=augment,
                             normaliser=train_norm, train=True, **common)
    eval_norm = _Normaliser(mean, std, device, dtype, False, channels_last)
    evals = {name: DeviceLoader(x, y, batch_size=eval_batch_size or batch_size, device=device,
                                normaliser=eval_norm)
             for name, (x, y) in splits.eval_sets.items()}
    return train, evals
