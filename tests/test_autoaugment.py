"""The official CIFAR AutoAugment (data/autoaugment.py): its table, its operations against PIL
(which the official TF ops copy) or hand computations, and its place in the pipeline."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from data import autoaugment as aa
from data.augment import pad_batch, random_crop_flip


def test_the_policy_table_is_the_official_one():
    """policies.py policy_cifar: 95 sub-policies (exp0_0..exp0_3, exp1_0..exp1_6, exp2_0..exp2_7)."""
    assert len(aa.POLICY) == 95 and all(len(sub) == 2 for sub in aa.POLICY)
    assert aa.POLICY[0] == (("Invert", 0.1, 7), ("Contrast", 0.2, 6))          # exp0_0[0]
    assert aa.POLICY[19] == (("Equalize", 0.7, 6), ("Color", 0.4, 9))         # exp0_3[4]
    assert aa.POLICY[20] == (("ShearY", 0.2, 7), ("Posterize", 0.3, 7))       # exp1_0[0]
    assert aa.POLICY[61] == (("Cutout", 0.2, 4), ("Equalize", 0.1, 1))        # exp2_1[1]
    assert aa.POLICY[94] == (("Equalize", 0.6, 9), ("Equalize", 0.4, 4))      # exp2_7[4]
    names = [name for sub in aa.POLICY for name, _, _ in sub]
    assert set(names) == set(aa.OPS) and names.count("TranslateY") == 23 and names.count("Cutout") == 3


def images(n=64, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    x[: n // 2] = (x[: n // 2] // 4 + 60)  # half of them low-contrast, so AutoContrast and Equalize work
    return x


def pil(image):
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def from_pil(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def apply(name, x, level, sign=1.0):
    n = x.shape[0]
    centre = torch.full((n, 2), x.shape[2] // 2)
    return aa._FUNCTIONS[name](x, torch.full((n,), float(level), dtype=torch.float64),
                               torch.full((n,), sign, dtype=torch.float64), centre)


@pytest.mark.parametrize("name, level, reference", [
    ("Equalize", 0, ImageOps.equalize),
    ("Invert", 0, ImageOps.invert),
    ("AutoContrast", 0, ImageOps.autocontrast),
    ("Posterize", 7, lambda im: ImageOps.posterize(im, 2)),      # int(7 / 10 * 4) = 2 bits
    ("Posterize", 9, lambda im: ImageOps.posterize(im, 3)),
    ("Solarize", 5, lambda im: ImageOps.solarize(im, 128)),      # int(5 / 10 * 256) = 128
    ("Solarize", 3, lambda im: ImageOps.solarize(im, 76)),
])
def test_operations_that_copy_pil_match_pil_exactly(name, level, reference):
    x = images()
    got = apply(name, x, level)
    want = torch.stack([from_pil(reference(pil(im))) for im in x])
    assert torch.equal(got, want)


def test_posterize_below_level_3_keeps_no_bits():
    assert torch.equal(apply("Posterize", images(), 2), torch.zeros(64, 3, 32, 32, dtype=torch.uint8))


def test_contrast_blends_towards_the_official_grey_level_4():
    """contrast(): the histogram's sum / 256 is the pixel count / 256 = 4 on 32 x 32 images
    (the EfficientNet code's slip; PIL would use the mean grey)."""
    x = images()
    factor = torch.tensor(6 / 10 * 1.8 + 0.1, dtype=torch.float32)  # blend() works in float32, as tf.to_float
    want = (4 + factor * (x.float() - 4)).clamp(0, 255).floor().to(torch.uint8)
    assert torch.equal(apply("Contrast", x, 6), want)


def test_brightness_and_color_are_blends():
    x = images()
    factor = torch.tensor(3 / 10 * 1.8 + 0.1, dtype=torch.float32)
    assert torch.equal(apply("Brightness", x, 3), (factor * x.float()).clamp(0, 255).floor().to(torch.uint8))
    grey = (((x.double() / 255) * torch.tensor([0.2989, 0.5870, 0.1140]).view(1, 3, 1, 1)).sum(1, keepdim=True)
            * 255.5).floor().clamp(0, 255)
    want = (grey + factor * (x.double() - grey)).clamp(0, 255).floor().to(torch.uint8)
    assert (apply("Color", x, 3).int() - want.int()).abs().max() <= 1  # float32 against float64 rounding


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_translate_moves_by_250_level_over_10_pixels_and_fills_grey(sign):
    x = images(4)
    out = apply("TranslateX", x, 1, sign)  # 25 pixels: only 7 columns of the image remain
    if sign > 0:  # x_in = x + 25
        assert torch.equal(out[..., :7], x[..., 25:]) and (out[..., 7:] == 128).all()
    else:
        assert torch.equal(out[..., 25:], x[..., :7]) and (out[..., :25] == 128).all()
    assert (apply("TranslateY", x, 2, sign) == 128).all()  # 50 pixels: nothing of the image is left


def test_shear_and_rotate_at_level_0_change_nothing_and_shear_follows_its_matrix():
    x = images(4)
    for name in ("ShearX", "ShearY", "Rotate"):
        assert torch.equal(apply(name, x, 0), x)
    out = apply("ShearX", x, 10)  # x_in = x + 0.3 y, nearest pixel, grey outside
    for y in (0, 5, 31):
        shift = int(np.floor(0.3 * y + 0.5))
        assert torch.equal(out[:, :, y, :32 - shift], x[:, :, y, shift:])
        assert (out[:, :, y, 32 - shift:] == 128).all()


def test_rotate_turns_about_the_centre():
    x = torch.zeros(1, 3, 33, 33, dtype=torch.uint8)
    x[:, :, 16, 16:] = 255  # a ray from the centre to the right edge
    out = apply("Rotate", x, 10)  # 30 degrees
    ys, xs = torch.nonzero(out[0, 0] == 255, as_tuple=True)
    angles = torch.atan2((ys - 16).double(), (xs - 16).double())
    assert out[0, 0, 16, 16] == 255 and len(ys) == 17  # the ray keeps its pixels, staircased
    assert angles[xs > 20].abs().mean().item() == pytest.approx(np.pi / 6, abs=0.02)


def test_the_cutout_operation_greys_a_square_of_twice_100_level_over_10():
    x = images(2)
    assert (apply("Cutout", x, 4) == 128).all()  # 2 * 40 pixels wide: the whole image
    out = apply("Cutout", x, 0.35)                # int(3.5) = 3: rows and columns 13..18 around the centre 16
    want = x.clone()
    want[:, :, 13:19, 13:19] = 128
    assert torch.equal(out, want)


def test_each_image_draws_its_own_sub_policy_and_the_draws_are_seeded():
    x = images(512)
    a = aa.autoaugment(x, torch.Generator().manual_seed(3))
    b = aa.autoaugment(x, torch.Generator().manual_seed(3))
    c = aa.autoaugment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = (a != x).flatten(1).any(1).float().mean().item()
    assert 0.4 < changed < 0.95  # some images untouched (probabilities below 1), most changed


def test_a_slice_of_a_global_batch_draws_as_the_whole_batch_does():
    x = images(32)
    whole = aa.autoaugment(x, torch.Generator().manual_seed(5))
    part = aa.autoaugment(x[8:16], torch.Generator().manual_seed(5), slice(8, 16), 32)
    assert torch.equal(part, whole[8:16])


def test_the_device_loader_runs_autoaugment_before_padding_crop_and_flip(synthetic_cifar):
    from data import build_loaders, load_cifar
    from data.loaders import seeded_generator
    data = load_cifar("cifar10", synthetic_cifar)
    train, _ = build_loaders(data, augment="autoaugment", batch_size=16, device="cpu", seed=2, channels_last=False)
    train.set_epoch(0)
    got, _ = next(iter(train))
    order = torch.randperm(100, generator=seeded_generator("cpu", 2, 0))
    g = seeded_generator("cpu", 2, 0, 0, 1)  # batch 0 of epoch 0
    raw = torch.from_numpy(data.train_images)[order[:16]]
    want = random_crop_flip(pad_batch(aa.autoaugment(raw, g), "reflect"), g)
    want = (want.float() / 255 - train.normaliser.mean) / train.normaliser.std
    assert torch.equal(got, want)
