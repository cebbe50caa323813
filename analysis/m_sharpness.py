"""m-sharpness (Foret et al. Section 4.1): the mean over disjoint groups of m examples of how much
the group's loss rises after one SAM ascent step of size rho on that group's own gradient,
   (1 / G) sum_k [ L_k(w + rho g_k / ||g_k||) - L_k(w) ],   g_k the gradient of L_k at w,
the one-step estimate of max_{||e|| <= rho} L_k(w + e) - L_k(w)."""

import torch


def m_sharpness(loss_fn, params, groups, rho):
    """groups: an iterable of batches of m examples each; loss_fn(batch) is the batch's mean loss."""
    params = list(params)
    rises = []
    for group in groups:
        loss = loss_fn(group)
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        with torch.no_grad():
            start = [p.detach().clone() for p in params]
            for p, g in zip(params, grads):
                p.add_(rho * g / norm.to(g.dtype))
            rises.append(float(loss_fn(group)) - float(loss))
            for p, w in zip(params, start):
                p.copy_(w)
    return sum(rises) / len(rises)
