"""Loss landscapes (Li et al., NeurIPS 2018, "Visualizing the Loss Landscape of Neural Nets"):
the loss along filter-normalised random directions, in 1-D and 2-D, and along the straight line
between two models."""

import torch
from tqdm import tqdm


def filter_normalised_direction(params, generator):
    """A Gaussian direction with each filter rescaled to the norm of the weights' filter: for a
    weight of shape (out, ...), row i of the direction gets norm ||w_i|| (a convolution's filter, a
    linear layer's row). Parameters with one dimension (biases, BatchNorm) get 0, as Li et al.'s
    default (ignore='biasbn')."""
    direction = []
    for w in params:
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
        if w.dim() <= 1:
            d.zero_()
        else:
            rows, norms = d.flatten(1), w.detach().flatten(1).norm(dim=1, keepdim=True)
            d = (rows / (rows.norm(dim=1, keepdim=True) + 1e-12) * norms).view_as(w)
        direction.append(d)
    return direction


@torch.no_grad()
def along(loss_fn, params, directions, coordinates, desc=None):
    """loss at w + sum_j c_j d_j for each tuple c of `coordinates`; the weights come back exactly."""
    start = [p.detach().clone() for p in params]
    losses = []
    for c in tqdm(coordinates, desc=desc, leave=False, disable=desc is None):
        for p, w, *ds in zip(params, start, *directions):
            p.copy_(w + sum(ci * d for ci, d in zip(c, ds)))
        losses.append(float(loss_fn()))
    for p, w in zip(params, start):
        p.copy_(w)
    return losses


@torch.no_grad()
def interpolate(loss_fn, params, a, b, alphas, desc=None):
    """loss at (1 - alpha) a + alpha b for each alpha; a, b: lists of tensors like params."""
    direction = [y - x for x, y in zip(a, b)]
    start = [p.detach().clone() for p in params]
    for p, x in zip(params, a):
        p.copy_(x)
    losses = along(loss_fn, params, [direction], [(alpha,) for alpha in alphas], desc)
    for p, w in zip(params, start):
        p.copy_(w)
    return losses
