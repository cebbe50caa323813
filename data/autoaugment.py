"""The official CIFAR AutoAugment of the SAM paper's AA rows (google-research/sam autoaugment/:
the policy_cifar table of policies.py; the ops, magnitudes and grey fill of autoaugment.py), as
batched tensor ops on uint8 images. Each image draws its own sub-policy, the chance of each of
its two operations, their signs and positions; every draw comes from a torch.Generator (or the
global one) made for the whole global batch, so a process that holds a slice draws what a
single process would for that slice.

What the official code does, kept as it is: it inherits the EfficientNet TPU implementation's
magnitudes, which were set for ImageNet: TranslateX/Y shift by up to 250 * level / 10 pixels and
its Cutout op covers up to 2 * 100 * level / 10 pixels, so on a 32-pixel image most of those
draws leave a uniform grey image; Contrast blends towards the grey level num_pixels / 256
(4 on CIFAR) rather than the image's mean; Posterize at level < 3 keeps no bits. Nearest-pixel
sampling, and 128 grey where a geometric op leaves the image.
"""

import math

import torch
import torch.nn.functional as F

MAX_LEVEL = 10.0
FILL = 128                             # autoaugment.py build_and_apply_nas_policy: replace_value
TRANSLATE_CONST, CUTOUT_CONST = 250, 100  # autoaugment.py distort_image_with_autoaugment: HParams

# policies.py policy_cifar (the "good policies" of Cubuk et al. 2019): exp0_0 ... exp2_7, 95
# sub-policies of two (operation, probability, level) each.
_TABLE = """
Invert 0.1 7, Contrast 0.2 6 | Rotate 0.7 2, TranslateX 0.3 9 | Sharpness 0.8 1, Sharpness 0.9 3
ShearY 0.5 8, TranslateY 0.7 9 | AutoContrast 0.5 8, Equalize 0.9 2
Solarize 0.4 5, AutoContrast 0.9 3 | TranslateY 0.9 9, TranslateY 0.7 9 | AutoContrast 0.9 2, Solarize 0.8 3
Equalize 0.8 8, Invert 0.1 3 | TranslateY 0.7 9, AutoContrast 0.9 1
Solarize 0.4 5, AutoContrast 0.0 2 | TranslateY 0.7 9, TranslateY 0.7 9 | AutoContrast 0.9 0, Solarize 0.4 3
Equalize 0.7 5, Invert 0.1 3 | TranslateY 0.7 9, TranslateY 0.7 9
Solarize 0.4 5, AutoContrast 0.9 1 | TranslateY 0.8 9, TranslateY 0.9 9 | AutoContrast 0.8 0, TranslateY 0.7 9
TranslateY 0.2 7, Color 0.9 6 | Equalize 0.7 6, Color 0.4 9
ShearY 0.2 7, Posterize 0.3 7 | Color 0.4 3, Brightness 0.6 7 | Sharpness 0.3 9, Brightness 0.7 9
Equalize 0.6 5, Equalize 0.5 1 | Contrast 0.6 7, Sharpness 0.6 5
Brightness 0.3 7, AutoContrast 0.5 8 | AutoContrast 0.9 4, AutoContrast 0.5 6 | Solarize 0.3 5, Equalize 0.6 5
TranslateY 0.2 4, Sharpness 0.3 3 | Brightness 0.0 8, Color 0.8 8
Solarize 0.2 6, Color 0.8 6 | Solarize 0.2 6, AutoContrast 0.8 1 | Solarize 0.4 1, Equalize 0.6 5
Brightness 0.0 0, Solarize 0.5 2 | AutoContrast 0.9 5, Brightness 0.5 3
Contrast 0.7 5, Brightness 0.0 2 | Solarize 0.2 8, Solarize 0.1 5 | Contrast 0.5 1, TranslateY 0.2 9
AutoContrast 0.6 5, TranslateY 0.0 9 | AutoContrast 0.9 4, Equalize 0.8 4
Brightness 0.0 7, Equalize 0.4 7 | Solarize 0.2 5, Equalize 0.7 5 | Equalize 0.6 8, Color 0.6 2
Color 0.3 7, Color 0.2 4 | AutoContrast 0.5 2, Solarize 0.7 2
AutoContrast 0.2 0, Equalize 0.1 0 | ShearY 0.6 5, Equalize 0.6 5 | Brightness 0.9 3, AutoContrast 0.4 1
Equalize 0.8 8, Equalize 0.7 7 | Equalize 0.7 7, Solarize 0.5 0
Equalize 0.8 4, TranslateY 0.8 9 | TranslateY 0.8 9, TranslateY 0.6 9 | TranslateY 0.9 0, TranslateY 0.5 9
AutoContrast 0.5 3, Solarize 0.3 4 | Solarize 0.5 3, Equalize 0.4 4
Color 0.7 7, TranslateX 0.5 8 | Equalize 0.3 7, AutoContrast 0.4 8 | TranslateY 0.4 3, Sharpness 0.2 6
Brightness 0.9 6, Color 0.2 8 | Solarize 0.5 2, Invert 0.0 3
AutoContrast 0.1 5, Brightness 0.0 0 | Cutout 0.2 4, Equalize 0.1 1 | Equalize 0.7 7, AutoContrast 0.6 4
Color 0.1 8, ShearY 0.2 3 | ShearY 0.4 2, Rotate 0.7 0
ShearY 0.1 3, AutoContrast 0.9 5 | TranslateY 0.3 6, Cutout 0.3 3 | Equalize 0.5 0, Solarize 0.6 6
AutoContrast 0.3 5, Rotate 0.2 7 | Equalize 0.8 2, Invert 0.4 0
Equalize 0.9 5, Color 0.7 0 | Equalize 0.1 1, ShearY 0.1 3 | AutoContrast 0.7 3, Equalize 0.7 0
Brightness 0.5 1, Contrast 0.1 7 | Contrast 0.1 4, Solarize 0.6 5
Solarize 0.2 3, ShearX 0.0 0 | TranslateX 0.3 0, TranslateX 0.6 0 | Equalize 0.5 9, TranslateY 0.6 7
ShearX 0.1 0, Sharpness 0.5 1 | Equalize 0.8 6, Invert 0.3 6
AutoContrast 0.3 9, Cutout 0.5 3 | ShearX 0.4 4, AutoContrast 0.9 2 | ShearX 0.0 3, Posterize 0.0 3
Solarize 0.4 3, Color 0.2 4 | Equalize 0.1 4, Equalize 0.7 6
Equalize 0.3 8, AutoContrast 0.4 3 | Solarize 0.6 4, AutoContrast 0.7 6 | AutoContrast 0.2 9, Brightness 0.4 8
Equalize 0.1 0, Equalize 0.0 6 | Equalize 0.8 4, Equalize 0.0 4
Equalize 0.5 5, AutoContrast 0.1 2 | Solarize 0.5 5, AutoContrast 0.9 5 | AutoContrast 0.6 1, AutoContrast 0.7 8
Equalize 0.2 0, AutoContrast 0.1 2 | Equalize 0.6 9, Equalize 0.4 4
"""
POLICY = tuple(tuple((name, float(prob), int(level)) for name, prob, level in (op.split() for op in sub.split(",")))
               for sub in _TABLE.replace("\n", "|").split("|") if sub.strip())
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast", "Brightness",
       "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout")


def _blend(degenerate, image, factor):
    """autoaugment.py blend: degenerate + factor (image - degenerate), clipped, truncated."""
    f = factor.view(-1, 1, 1, 1).float()
    return (degenerate.float() + f * (image.float() - degenerate.float())).clamp(0, 255).floor().to(torch.uint8)


def _grey(images):
    """tf.image.rgb_to_grayscale on uint8: weights on [0, 1] values, back to uint8 by x * 255.5."""
    weights = torch.tensor([0.2989, 0.5870, 0.1140], device=images.device).view(1, 3, 1, 1)
    grey = ((images.float() / 255) * weights).sum(1, keepdim=True) * 255.5
    return grey.floor().clamp(0, 255).to(torch.uint8).expand_as(images)


def _enhance(level):
    return level / MAX_LEVEL * 1.8 + 0.1


def _sample(images, matrix):
    """Nearest-pixel projective sampling: matrix (N x 2 x 3) maps output (x, y, 1) to input
    coordinates; outside the image, FILL (the official wrap/unwrap)."""
    n, c, h, w = images.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=images.device, dtype=torch.float64),
                            torch.arange(w, device=images.device, dtype=torch.float64), indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)]).view(3, -1)       # 3 x HW
    source = (matrix.double() @ points)                                  # N x 2 x HW
    source = torch.sign(source) * torch.floor(source.abs() + 0.5)        # std::round: half away from zero
    sx, sy = source[:, 0].long(), source[:, 1].long()
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    index = (sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)).unsqueeze(1).expand(n, c, -1)
    out = images.flatten(2).gather(2, index)
    return torch.where(inside.unsqueeze(1), out, torch.full_like(out, FILL)).view(n, c, h, w)


def _affine(images, a, b, tx, d, e, ty):
    """Per-image maps x_in = a x + b y + tx, y_in = d x + e y + ty (each a tensor of N or a number)."""
    n = images.shape[0]
    rows = [torch.as_tensor(v, dtype=torch.float64, device=images.device).expand(n) for v in (a, b, tx, d, e, ty)]
    return _sample(images, torch.stack(rows, 1).view(n, 2, 3))


def _autocontrast(x, level, sign, centre):
    flat = x.flatten(2).float()
    low, high = flat.amin(2)[..., None, None], flat.amax(2)[..., None, None]
    scale = 255.0 / (high - low).clamp(min=1)
    out = (x.float() * scale - low * scale).clamp(0, 255).floor().to(torch.uint8)
    return torch.where(high > low, out, x)


def _equalize(x, level, sign, centre):
    n, c, h, w = x.shape
    values = x.flatten(2).long()                                             # N x C x HW
    hist = torch.zeros(n, c, 256, dtype=torch.long, device=x.device).scatter_add_(2, values, torch.ones_like(values))
    last = hist.gather(2, values.amax(2, keepdim=True)).squeeze(2)           # count of the last non-empty bin
    step = (h * w - last) // 255
    safe = step.clamp(min=1).unsqueeze(2)
    lut = torch.div(hist.cumsum(2) + safe // 2, safe, rounding_mode="floor")
    lut = torch.cat([torch.zeros_like(lut[..., :1]), lut[..., :-1]], 2).clamp(0, 255)
    out = lut.gather(2, values).view(n, c, h, w).to(torch.uint8)
    return torch.where((step > 0)[..., None, None], out, x)


def _invert(x, level, sign, centre):
    return 255 - x


def _rotate(x, level, sign, centre):
    theta = (level / MAX_LEVEL * 30.0 * sign) * math.pi / 180
    h, w = x.shape[2:]
    cos, sin = torch.cos(theta), torch.sin(theta)
    tx = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2  # tfa angles_to_projective_transforms: about the centre
    ty = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2
    return _affine(x, cos, -sin, tx, sin, cos, ty)


def _posterize(x, level, sign, centre):
    bits = torch.floor(level / MAX_LEVEL * 4)
    step = (2 ** (8 - bits)).long().view(-1, 1, 1, 1)
    return (x.long() // step * step).to(torch.uint8)


def _solarize(x, level, sign, centre):
    threshold = torch.floor(level / MAX_LEVEL * 256).view(-1, 1, 1, 1)
    return torch.where(x.float() < threshold, x, 255 - x)


def _color(x, level, sign, centre):
    return _blend(_grey(x), x, _enhance(level))


def _contrast(x, level, sign, centre):
    mean = min(x.shape[2] * x.shape[3] / 256.0, 255.0)  # the official histogram's sum / 256
    return _blend(torch.full_like(x, int(mean)), x, _enhance(level))


def _brightness(x, level, sign, centre):
    return _blend(torch.zeros_like(x), x, _enhance(level))


def _sharpness(x, level, sign, centre):
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], device=x.device) / 13
    smooth = F.conv2d(x.float(), kernel.expand(3, 1, 3, 3), groups=3).clamp(0, 255).floor().to(torch.uint8)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth  # the border keeps the original pixels
    return _blend(degenerate, x, _enhance(level))


def _shear_x(x, level, sign, centre):
    return _affine(x, 1, level / MAX_LEVEL * 0.3 * sign, 0, 0, 1, 0)


def _shear_y(x, level, sign, centre):
    return _affine(x, 1, 0, 0, level / MAX_LEVEL * 0.3 * sign, 1, 0)


def _translate_x(x, level, sign, centre):
    return _affine(x, 1, 0, level / MAX_LEVEL * TRANSLATE_CONST * sign, 0, 1, 0)


def _translate_y(x, level, sign, centre):
    return _affine(x, 1, 0, 0, 0, 1, level / MAX_LEVEL * TRANSLATE_CONST * sign)


def _cutout(x, level, sign, centre):
    half = torch.floor(level / MAX_LEVEL * CUTOUT_CONST).view(-1, 1)
    h, w = x.shape[2:]
    cy, cx = centre[:, :1], centre[:, 1:]
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    inside = (((rows >= cy - half) & (rows < cy + half))[:, :, None] & ((cols >= cx - half) & (cols < cx + half))[:, None])
    return torch.where(inside[:, None], torch.full_like(x, FILL), x)


_FUNCTIONS = dict(zip(OPS, (_autocontrast, _equalize, _invert, _rotate, _posterize, _solarize, _color, _contrast,
                            _brightness, _sharpness, _shear_x, _shear_y, _translate_x, _translate_y, _cutout)))
_OP_INDEX = torch.tensor([[OPS.index(name) for name, _, _ in sub] for sub in POLICY])
_PROB = torch.tensor([[prob for _, prob, _ in sub] for sub in POLICY], dtype=torch.float64)
_LEVEL = torch.tensor([[level for _, _, level in sub] for sub in POLICY], dtype=torch.float64)


def autoaugment(images, generator=None, part=slice(None), total=None):
    """The official CIFAR AutoAugment on a uint8 N x 3 x H x W batch. The draws are made for
    `total` images (default N), of which `part` are these."""
    n, device = images.shape[0], images.device
    total = total or n

    def draw(fn, *shape, **kw):
        return fn(*shape, generator=generator, device=device, **kw)[part]

    sub = draw(torch.randint, 0, len(POLICY), (total,))
    chance = draw(torch.rand, total, 2, dtype=torch.float64)
    sign = torch.where(draw(torch.rand, total, 2) < 0.5, -1.0, 1.0).double()
    centre = torch.stack([draw(torch.randint, 0, images.shape[2], (total, 2)),
                          draw(torch.randint, 0, images.shape[3], (total, 2))], -1)   # N x stage x (y, x)
    ops, probs, levels = (t.to(device)[sub] for t in (_OP_INDEX, _PROB, _LEVEL))
    out = images.clone()
    for stage in range(2):
        apply = torch.floor(chance[:, stage] + probs[:, stage]) >= 1  # _apply_func_with_prob
        for index, name in enumerate(OPS):
            chosen = (apply & (ops[:, stage] == index)).nonzero().squeeze(1)
            if len(chosen):
                out[chosen] = _FUNCTIONS[name](out[chosen], levels[chosen, stage], sign[chosen, stage],
                                               centre[chosen, stage])
    return out


class OfficialAutoAugment(torch.nn.Module):
    """autoaugment() on one C x H x W image, for the per-image DataLoader pipeline (draws from the
    global generator, which the loader seeds per image)."""

    def forward(self, image):
        return autoaugment(image.unsqueeze(0))[0]
