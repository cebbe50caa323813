import numpy as np
import pytest
import torch

from data import DataError, build_loaders, load_cifar
from data.augment import channel_stats, cutout, pad_images, per_image_transform, random_crop_flip
from data.splits import make_splits, noisy_labels


# ---- loading and integrity -------------------------------------------------------------

def test_loads_synthetic_official_layout(synthetic_cifar, capsys):
    data = load_cifar("cifar10", synthetic_cifar)
    assert data.train_images.shape == (100, 3, 32, 32) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (20, 3, 32, 32) and data.num_classes == 10
    assert data.train_labels.dtype == np.int64 and set(data.train_labels) == set(range(10))
    assert data.fingerprint["official"] is False
    assert len(data.fingerprint["md5"]["data_batch_1"]) == 32
    assert capsys.readouterr().err == ""  # the note waits until the caller starts for real
    data.warn()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "official checksums" in err


def test_missing_folder_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="--download") as e:
        load_cifar("cifar10", tmp_path / "nowhere")
    assert "\n" not in str(e.value)


def test_truncated_batch_names_the_file(synthetic_cifar):
    path = synthetic_cifar / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_3.*--download") as e:
        load_cifar("cifar10", synthetic_cifar)
    assert "\n" not in str(e.value)


def test_missing_batch_names_the_file(synthetic_cifar):
    (synthetic_cifar / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch"):
        load_cifar("cifar10", synthetic_cifar)


def test_wrong_shaped_batch_names_the_file(synthetic_cifar):
    import pickle
    path = synthetic_cifar / "cifar-10-batches-py" / "data_batch_2"
    with open(path, "wb") as f:
        pickle.dump({"labels": [0] * 4, "data": np.zeros((4, 100), np.uint8)}, f, protocol=2)
    with pytest.raises(DataError, match="data_batch_2.*shape"):
        load_cifar("cifar10", synthetic_cifar)


def test_unknown_dataset():
    with pytest.raises(DataError, match="cifar10, cifar100"):
        load_cifar("mnist")


def test_default_data_dir_honours_the_environment(monkeypatch, tmp_path):
    from data import default_data_dir
    monkeypatch.setenv("SAM_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("SAM_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_data_dir() == tmp_path / "cache" / "sam-cifar"

@pytest.mark.slow

def test_real_pack_counts_and_statistics(cifar_pack):
    data = load_cifar("cifar10", cifar_pack)
    assert len(data.train_labels) == 50_000 and len(data.test_labels) == 10_000
    assert (np.bincount(data.train_labels) == 5000).all() and (np.bincount(data.test_labels) == 1000).all()
    mean, std = channel_stats(data.train_images)
    # Published CIFAR-10 training statistics; the JPEG pack is within a fraction of a percent.
    np.testing.assert_allclose(mean, [0.4914, 0.4822, 0.4465], atol=0.005)
    np.testing.assert_allclose(std, [0.2470, 0.2435, 0.2616], atol=0.005)
    # and the histogram method agrees with a direct float64 computation on a slice
    part = data.train_images[:2000].astype(np.float64) / 255
    m, s = channel_stats(data.train_images[:2000])
    np.testing.assert_allclose(m, part.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(s, part.std(axis=(0, 2, 3)), rtol=1e-10)


# ---- augmentations -----------------------------------------------------------------------

def coordinate_images(n):
    """Each pixel holds its own (row, column) in the padded 40x40 frame."""
    grid = torch.arange(40)[:, None] * 40 + torch.arange(40)[None, :]
    return grid.expand(n, 1, 40, 40).clone()


def test_crops_stay_inside_the_padded_image_and_flip_about_half_the_time():
    out = random_crop_flip(coordinate_images(4000), torch.Generator().manual_seed(0))
    rows, cols = out[:, 0] // 40, out[:, 0] % 40
    top, left = rows[:, 0, 0], cols[:, 0].amin(1)
    assert top.min() == 0 and top.max() == 8 and left.min() == 0 and left.max() == 8
    assert torch.equal(rows, top[:, None, None] + torch.arange(32)[None, :, None].expand(-1, -1, 32))
    flipped = cols[:, 0, 0] > cols[:, 0, -1]
    expected = left[:, None] + torch.arange(32)
    expected = torch.where(flipped[:, None], expected.flip(1), expected)
    assert torch.equal(cols[:, 0], expected) and torch.equal(cols, cols[:, :1].expand(-1, 32, -1))
    assert abs(flipped.float().mean().item() - 0.5) < 0.03  # 4000 draws: 0.03 is > 3.5 sigma


def test_cutout_zeroes_exactly_one_clipped_16x16_window():
    out = cutout(torch.ones(2000, 3, 32, 32), torch.Generator().manual_seed(0))
    zero = out == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # same window on every channel
    zero = zero[:, 0]
    rows, cols = zero.any(2), zero.any(1)
    heights, widths = rows.sum(1), cols.sum(1)
    assert torch.equal(zero.sum((1, 2)), heights * widths)  # a rectangle
    assert heights.min() == 8 and heights.max() == 16 and widths.min() == 8 and widths.max() == 16  # centres 0..31
    inside = (heights == 16) & (widths == 16)
    assert inside.float().mean() == pytest.approx((17 / 32) ** 2, abs=0.04)
    top = rows.float().argmax(1)
    clipped_top = (heights < 16) & (top == 0)
    clipped_bottom = (heights < 16) & (top > 0)
    assert torch.equal(clipped_top | clipped_bottom, heights < 16)
    assert (top[clipped_bottom] + heights[clipped_bottom] == 32).all()


@pytest.mark.parametrize("mode", ["reflect", "constant", "edge", "symmetric"])
def test_padding_is_four_pixels_of_the_mode_asked_on_the_host_and_on_the_device(mode):
    from data.augment import pad_batch
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    padded = pad_images(images, mode)
    assert padded.shape == (3, 3, 40, 40)
    np.testing.assert_array_equal(padded, np.pad(images, ((0, 0), (0, 0), (4, 4), (4, 4)), mode=mode))
    np.testing.assert_array_equal(pad_batch(torch.from_numpy(images), mode).numpy(), padded)


def test_the_worker_pipelines_are_the_papers_augmentations_in_the_official_order():
    from torchvision.transforms import v2

    from data.autoaugment import OfficialAutoAugment

    def kinds(augment, policy="official"):
        transform = per_image_transform(augment, "reflect", policy)
        return [type(t) for t in getattr(transform, "transforms", [transform])]

    assert kinds("none") == [v2.Identity]
    assert kinds("basic") == kinds("cutout") == [v2.RandomCrop, v2.RandomHorizontalFlip]
    assert kinds("autoaugment") == [OfficialAutoAugment, v2.RandomHorizontalFlip, v2.RandomCrop]  # AA, flip, crop
    assert kinds("autoaugment", "torchvision") == [v2.RandomCrop, v2.RandomHorizontalFlip, v2.AutoAugment]
    crop = per_image_transform("basic", "edge").transforms[0]
    assert (crop.padding, crop.padding_mode) == ([4, 4, 4, 4], "edge")


def test_identical_seeds_give_identical_batches(synthetic_cifar):
    data = load_cifar("cifar10", synthetic_cifar)

    def epoch(seed, e):
        train, _ = build_loaders(data, augment="cutout", batch_size=16, device="cpu", seed=seed)
        train.set_epoch(e)
        return [b for b in train]

    a, b, c, d = epoch(1, 0), epoch(1, 0), epoch(1, 1), epoch(2, 0)
    assert len(a) == 100 // 16
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0]) and not torch.equal(a[0][0], d[0][0])

@pytest.mark.slow

def test_device_and_worker_paths_agree_in_distribution():
    """Same image, 6000 draws each: both paths reach the same 162 crops x flips (reflect
    padding included) with frequencies consistent with one uniform distribution."""
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8))
    n = 6000
    padded = torch.from_numpy(pad_images(image[None].numpy(), "reflect")).expand(n, -1, -1, -1)
    device_out = random_crop_flip(padded, torch.Generator().manual_seed(0))
    transform = per_image_transform("basic", "reflect")
    torch.manual_seed(0)
    worker_out = torch.stack([transform(image) for _ in range(n)])

    def counts(batch):
        keys, inverse = torch.unique(batch.reshape(n, -1), dim=0, return_inverse=True)
        return keys, torch.bincount(inverse, minlength=len(keys))

    k1, c1 = counts(device_out)
    k2, c2 = counts(worker_out)
    assert len(k1) == len(k2) == 162 and torch.equal(k1, k2)
    # chi-square homogeneity test, 161 degrees of freedom: the 0.999 quantile is about 220
    total = (c1 + c2).double()
    expected = total / 2
    chi2 = (((c1 - expected) ** 2 + (c2 - expected) ** 2) / expected).sum().item()
    assert chi2 < 220

@pytest.mark.slow

def test_normalised_batches_are_channels_last_and_standardised(cifar_pack):
    data = load_cifar("cifar10", cifar_pack)
    _, evals = build_loaders(data, augment="basic", batch_size=1000, device="cpu")
    x = torch.cat([b[0] for b in evals["test"]])
    assert x.is_contiguous(memory_format=torch.channels_last) and x.shape == (10_000, 3, 32, 32)
    # normalised with training statistics, so the test set is close to (0, 1), not exactly
    assert x.mean((0, 2, 3)).abs().max() < 0.05 and (x.std((0, 2, 3)) - 1).abs().max() < 0.05


@pytest.mark.parametrize("augment, loader, placement", [
    ("cutout", "device", "batch"), ("cutout", "device", "image"), ("cutout", "workers", "image"),
    ("basic", "workers", "batch"), ("autoaugment_cutout", "device", "batch"), ("autoaugment", "workers", "batch")])
def test_ranks_take_slices_of_the_single_process_batches_augmentation_included(synthetic_cifar, augment, loader,
                                                                               placement):
    """Process r of N gets the r-th slice of each global batch, augmented exactly as one process
    augments those images (one Cutout window per image included): N processes are one process split
    into N groups."""
    data = load_cifar("cifar10", synthetic_cifar)
    kw = dict(augment=augment, batch_size=16, device="cpu", seed=3, loader=loader, workers=0, channels_last=False,
              cutout_placement=placement)

    def epoch(rank=0, world_size=1):
        train, _ = build_loaders(data, rank=rank, world_size=world_size, **kw)
        train.set_epoch(1)
        return list(train)

    whole = epoch()
    ranks = [epoch(r, 4) for r in range(4)]
    assert len(whole) == 100 // 16
    for i, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([r[i][1] for r in ranks]), y)
        assert torch.equal(torch.cat([r[i][0] for r in ranks]), x)


# ---- paper extras --------------------------------------------------------------------------

def test_label_noise_rule_other_is_exact_and_never_keeps_the_label():
    labels = np.arange(10_000) % 10
    noisy = noisy_labels(labels, 0.2, 10, seed=0, rule="other")
    changed = noisy != labels
    assert changed.sum() == 2000
    assert np.array_equal(noisy_labels(labels, 0.2, 10, seed=0, rule="other"), noisy)
    assert sorted(np.unique(noisy[changed])) == list(range(10))
    for label in range(10):  # uniform over the 9 other classes: each about 200 / 9 of a class's 200 changes
        counts = np.bincount(noisy[changed & (labels == label)], minlength=10)
        assert counts[label] == 0 and (np.delete(counts, label) > 5).all()


def test_uniform_label_noise_redraws_from_every_class():
    """The uniform rule (Jiang et al., the paper's Table 4) redraws a label from all classes, its own included."""
    labels = np.arange(10_000) % 10
    noisy = noisy_labels(labels, 0.5, 10, seed=0)
    changed = noisy != labels
    assert 0.45 * 0.9 < changed.mean() < 0.55 * 0.9  # half redrawn, a tenth of those to their own class
    counts = np.bincount(noisy[labels == 3], minlength=10)  # 1000 images of class 3, about 500 redrawn
    assert (np.delete(counts, 3) > 25).all() and counts[3] > 500


def test_splits_noise_only_training_labels(synthetic_cifar):
    data = load_cifar("cifar10", synthetic_cifar)
    splits = make_splits(data, val_split=0.2, label_noise=0.5, seed=1, noise_rule="other")
    assert len(splits.train_labels) == 80 and len(splits.eval_sets["val"][1]) == 20
    assert np.array_equal(splits.eval_sets["test"][1], data.test_labels)
    # validation labels are clean: they equal the original labels of the same images
    val_x, val_y = splits.eval_sets["val"]
    originals = {data.train_images[i].tobytes(): data.train_labels[i] for i in range(100)}
    assert all(originals[x.tobytes()] == y for x, y in zip(val_x, val_y))
    clean = np.array([originals[x.tobytes()] for x in splits.train_images])
    assert (clean != splits.train_labels).sum() == 40


def test_validation_split_is_fixed_across_run_seeds(synthetic_cifar):
    data = load_cifar("cifar10", synthetic_cifar)
    a = make_splits(data, val_split=0.1, seed=1).eval_sets["val"][0]
    b = make_splits(data, val_split=0.1, seed=2).eval_sets["val"][0]
    assert np.array_equal(a, b)


def test_validation_split_is_the_last_images_as_in_the_official_code(synthetic_cifar):
    """dataset_source.py holds out train[45000:]: with --val-split 0.1 of 50,000, the same images."""
    data = load_cifar("cifar10", synthetic_cifar)
    splits = make_splits(data, val_split=0.1)
    assert np.array_equal(splits.eval_sets["val"][0], data.train_images[90:])
    assert np.array_equal(splits.train_images, data.train_images[:90])


def test_subset_takes_the_first_images(synthetic_cifar):
    data = load_cifar("cifar10", synthetic_cifar)
    splits = make_splits(data, subset=30)
    assert np.array_equal(splits.train_images, data.train_images[:30])
    assert np.array_equal(splits.train_labels, data.train_labels[:30])  # no noise unless asked
    assert np.array_equal(splits.eval_sets["test"][0], data.test_images[:20])


def test_bad_loader_arguments(synthetic_cifar):
    data = load_cifar("cifar10", synthetic_cifar)
    with pytest.raises(ValueError, match="augmentation"):
        build_loaders(data, augment="mixup", batch_size=8, device="cpu")
    with pytest.raises(ValueError, match="--loader workers"):
        build_loaders(data, augment="autoaugment", batch_size=8, device="cpu", loader="device",
                      autoaugment_policy="torchvision")
    with pytest.raises(ValueError, match="batch size"):
        build_loaders(data, augment="basic", batch_size=1000, device="cpu")


@pytest.mark.parametrize("policy", ["official", "torchvision"])
def test_worker_loader_runs_autoaugment(synthetic_cifar, policy):
    data = load_cifar("cifar10", synthetic_cifar)
    train, _ = build_loaders(data, augment="autoaugment_cutout", batch_size=16, device="cpu", workers=0,
                             loader="workers", autoaugment_policy=policy)
    train.set_epoch(0)
    x, y = next(iter(train))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_cutout_per_batch_places_one_window_for_the_whole_batch(synthetic_cifar):
    """The official cutout draws one centre per batch; DeVries & Taylor's one per image."""
    data = load_cifar("cifar10", synthetic_cifar)
    for placement, windows in (("batch", range(1, 2)), ("image", range(9, 17))):  # clipped ones may coincide
        train, _ = build_loaders(data, augment="cutout", batch_size=16, device="cpu", cutout_placement=placement,
                                 channels_last=False)
        train.set_epoch(0)
        x, _ = next(iter(train))
        zero = (x == 0).all(1)  # normalised zero: the window (the test images have no exact mean pixel)
        assert len({tuple(z.nonzero().min(0).values.tolist()) for z in zero}) in windows


def test_download_uses_torchvisions_official_url_and_md5(tmp_path, monkeypatch):
    import urllib.error
    from torchvision.datasets import CIFAR10

    import data.cifar
    calls = []

    def fake_download(url, root, filename, md5):
        calls.append((url, filename, md5))
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(data.cifar, "download_and_extract_archive", fake_download)
    with pytest.raises(DataError, match="downloading .*failed") as e:
        load_cifar("cifar10", tmp_path, download=True)
    assert calls == [(CIFAR10.url, CIFAR10.filename, CIFAR10.tgz_md5)]
    assert "\n" not in str(e.value)


def test_download_is_skipped_when_the_data_is_there(synthetic_cifar, monkeypatch):
    import data.cifar
    monkeypatch.setattr(data.cifar, "download_and_extract_archive", lambda *a, **k: pytest.fail("downloaded"))
    assert len(load_cifar("cifar10", synthetic_cifar, download=True).train_labels) == 100


def test_the_normaliser_standardises_and_lays_out_as_asked():
    from data.augment import Normaliser
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])
    for channels_last in (True, False):
        x = Normaliser(mean, std, "cpu", channels_last=channels_last)(images)
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last) == channels_last
        want = (images.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        torch.testing.assert_close(x.double(), want, rtol=1e-6, atol=1e-6)


def training_stats(images):
    """The normaliser's mean and std of uint8 training images, shaped to broadcast over a batch."""
    return (torch.tensor(x, dtype=torch.float32).view(1, 3, 1, 1) for x in channel_stats(images))


def test_evaluation_batches_hold_every_test_image_once_in_order_unaugmented(synthetic_cifar):
    """The test loader neither shuffles, nor augments, nor drops the last partial batch."""
    data = load_cifar("cifar10", synthetic_cifar)
    _, evals = build_loaders(data, augment="cutout", batch_size=16, device="cpu", channels_last=False)
    batches = list(evals["test"])
    assert [len(y) for _, y in batches] == [16, 4] and len(evals["test"]) == 2  # 20 test images
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    mean, std = training_stats(data.train_images)
    assert torch.equal(y, torch.from_numpy(data.test_labels))
    torch.testing.assert_close(x, (torch.from_numpy(data.test_images).float() / 255 - mean) / std)


def test_one_batch_may_hold_every_training_image(synthetic_cifar):
    data = load_cifar("cifar10", synthetic_cifar)
    train, _ = build_loaders(data, augment="basic", batch_size=32, device="cpu", subset=32)
    train.set_epoch(0)
    assert len(train) == 1 and [len(y) for _, y in train] == [32]


@pytest.mark.parametrize("loader", ["device", "workers"])
def test_the_padding_mode_reaches_the_training_crops(synthetic_cifar, loader):
    """Bright images (128..255): reflected padding keeps every pixel bright, zero padding brings in black."""
    data = load_cifar("cifar10", synthetic_cifar)
    data.train_images = np.random.default_rng(0).integers(128, 256, data.train_images.shape, dtype=np.uint8)
    mean, std = training_stats(data.train_images)
    for mode in ("reflect", "constant"):
        train, _ = build_loaders(data, augment="basic", batch_size=64, device="cpu", loader=loader, workers=0,
                                 padding_mode=mode, channels_last=False)
        train.set_epoch(0)
        x, _ = next(iter(train))
        pixels = (x * std + mean) * 255
        assert (pixels.min() < 64) == (mode == "constant"), mode


def test_the_loader_setting_picks_the_pipeline(synthetic_cifar):
    from torch.utils.data import DataLoader

    from data.loaders import DeviceLoader
    data = load_cifar("cifar10", synthetic_cifar)
    for loader, kind in (("device", DeviceLoader), ("workers", DataLoader)):
        train, _ = build_loaders(data, augment="basic", batch_size=16, device="cpu", loader=loader, workers=0)
        assert isinstance(getattr(train, "loader", train), kind), loader


@pytest.mark.parametrize("loader", ["device", "workers"])
@pytest.mark.parametrize("augment", ["none", "basic"])
def test_each_training_image_is_its_source_under_the_augmentation_asked_and_no_other(synthetic_cifar, augment,
                                                                                      loader):
    """Channel 0 names each image's source; the image must be that source itself ("none") or one
    of its 162 reflect-padded crops and flips ("basic"): nothing more (no AutoAugment), nothing less."""
    data = load_cifar("cifar10", synthetic_cifar)
    images = np.random.default_rng(0).integers(0, 256, data.train_images.shape, dtype=np.uint8)
    images[:, 0] = np.arange(len(images), dtype=np.uint8)[:, None, None]
    data.train_images = images
    mean, std = training_stats(images)
    train, _ = build_loaders(data, augment=augment, batch_size=64, device="cpu", loader=loader, workers=0,
                             channels_last=False)
    train.set_epoch(0)
    x, _ = next(iter(train))
    got = ((x * std + mean) * 255).round().to(torch.uint8)
    sources = got[:, 0, 0, 0].long()
    assert len(set(sources.tolist())) == 64  # 64 different images of the permutation
    padded = torch.from_numpy(np.pad(images, ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect"))
    for image, k in zip(got, sources):
        if augment == "none":
            assert torch.equal(image, torch.from_numpy(images[k]))
            continue
        crops = [padded[k, :, t:t + 32, s:s + 32] for t in range(9) for s in range(9)]
        assert any(torch.equal(image, c) or torch.equal(image, c.flip(-1)) for c in crops)


@pytest.mark.parametrize("start", [0, 2])
def test_a_ranks_sampler_yields_as_many_indices_as_it_says(start):
    from data.loaders import _GlobalBatchSlices
    sampler = _GlobalBatchSlices(100, 16, seed=0, rank=1, world_size=4)
    sampler.start = start
    assert len(list(sampler)) == len(sampler) == (100 // 16 - start) * 4


def test_data_workers_ignore_stop_signals(synthetic_cifar):
    """SIGTERM reaches every process of a SLURM job: the main process checkpoints and stops, so the
    DataLoader workers must carry on until it does, not die under it."""
    import os
    import signal
    import time
    data = load_cifar("cifar10", synthetic_cifar)
    train, _ = build_loaders(data, augment="basic", batch_size=16, device="cpu", loader="workers", workers=1)
    train.set_epoch(0)
    batches = iter(train.loader)
    next(batches)
    worker = batches._workers[0]
    os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert worker.is_alive()
    assert len(list(batches)) == len(train) - 1


def test_subset_and_val_split_at_their_edges(synthetic_cifar):
    """--subset may take every training image but one (all of them: it would do nothing; more: there are
    none); --val-split may keep one training image and hold out one, and is refused where it holds out none
    or keeps none; --label-noise is refused where it would change no label."""
    data = load_cifar("cifar10", synthetic_cifar)
    n = len(data.train_labels)
    assert len(make_splits(data, subset=n - 1).train_labels) == n - 1
    with pytest.raises(ValueError, match=f"is all the {n} training images"):
        make_splits(data, subset=n)
    with pytest.raises(ValueError, match=f"more than the {n} training images"):
        make_splits(data, subset=n + 1)
    assert (make_splits(data, label_noise=0.51 / n, noise_rule="other").train_labels != data.train_labels).sum() == 1
    with pytest.raises(ValueError, match="changes no label"):
        make_splits(data, label_noise=0.5 / n, noise_rule="other")
    one_kept = make_splits(data, val_split=(n - 1) / n)
    assert len(one_kept.train_labels) == 1 and len(one_kept.eval_sets["val"][1]) == n - 1
    one_held = make_splits(data, val_split=1 / n)
    assert len(one_held.train_labels) == n - 1 and len(one_held.eval_sets["val"][1]) == 1
    with pytest.raises(ValueError, match="leaves no validation image"):
        make_splits(data, val_split=0.4 / n)
    with pytest.raises(ValueError, match="leaves no training image"):
        make_splits(data, val_split=(n - 0.4) / n)
