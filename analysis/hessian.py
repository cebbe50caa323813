"""The Hessian of a loss with respect to a model's parameters, through Hessian-vector products
(double backward), never formed: top eigenvalues by Lanczos with full reorthogonalisation, the
spectral density by stochastic Lanczos quadrature (Ghorbani et al., ICML 2019), and a quick
lambda_max by power iteration (for train.py --sharpness-every)."""

import math

import torch
from tqdm import tqdm


class HessianOperator:
    """v -> H v for the mean of `loss_fn(batch)` over `batches`, H taken at the parameters' current
    values. Vectors are flat, in the parameters' dtype and device."""

    def __init__(self, loss_fn, params, batches):
        self.loss_fn, self.params, self.batches = loss_fn, list(params), batches
        self.size = sum(p.numel() for p in self.params)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device

    def __call__(self, vector):
        pieces = list(torch.split(vector, [p.numel() for p in self.params]))
        pieces = [v.view_as(p) for v, p in zip(pieces, self.params)]
        total = torch.zeros_like(vector)
        for batch in self.batches:
            grads = torch.autograd.grad(self.loss_fn(batch), self.params, create_graph=True)
            hv = torch.autograd.grad(grads, self.params, grad_outputs=pieces)
            total += torch.cat([h.reshape(-1) for h in hv])
        return total / len(self.batches)

    def random(self, generator, rademacher=False):
        if rademacher:
            v = torch.randint(0, 2, (self.size,), generator=generator, device="cpu").to(self.dtype) * 2 - 1
        else:
            v = torch.randn(self.size, generator=generator, dtype=self.dtype, device="cpu")
        return (v / torch.linalg.vector_norm(v)).to(self.device)


def lanczos(operator, start, steps, progress=None):
    """`steps` Lanczos iterations from the unit vector `start`, with full reorthogonalisation
    (exact in exact arithmetic, and stable in floating point). -> (alphas, betas) of the
    tridiagonal matrix T, whose eigenvalues are the Ritz values."""
    basis = [start]
    alphas, betas = [], []
    bar = tqdm(range(steps), desc=progress, leave=False, disable=progress is None)
    for i in bar:
        w = operator(basis[-1])
        alpha = torch.dot(w, basis[-1])
        w = w - alpha * basis[-1] - (betas[-1] * basis[-2] if betas else 0)
        for q in basis:  # reorthogonalise against every earlier vector, twice is enough
            w = w - torch.dot(w, q) * q
        for q in basis:
            w = w - torch.dot(w, q) * q
        alphas.append(alpha.item())
        beta = torch.linalg.vector_norm(w).item()
        if i == steps - 1 or beta < 1e-10 * max(1.0, abs(alphas[-1])):  # the Krylov space is exhausted
            break
        betas.append(beta)
        basis.append(w / beta)
    bar.close()
    return alphas, betas


def tridiagonal(alphas, betas):
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas[:len(alphas) - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t


def lanczos_steps(k, size, steps=None):
    """The Lanczos iterations top_eigenvalues runs for k eigenvalues of a `size`-dimensional operator:
    `steps` (default max(3k, k + 30)), at most the dimension."""
    return min(size, steps or max(3 * k, k + 30))


def top_eigenvalues(operator, k, steps=None, seed=0):
    """The k largest eigenvalues (by value), from Lanczos with `steps` iterations (default
    max(3k, k + 30), at most the dimension): one Hessian-vector product each."""
    steps = lanczos_steps(k, operator.size, steps)
    start = operator.random(torch.Generator().manual_seed(seed))
    alphas, betas = lanczos(operator, start, steps, progress="Lanczos")
    ritz = torch.linalg.eigvalsh(tridiagonal(alphas, betas))
    return sorted(ritz.tolist(), reverse=True)[:k]


def spectral_density(operator, runs=5, steps=60, seed=0, grid=2000, sigma=None):
    """Stochastic Lanczos quadrature: for each of `runs` random Rademacher vectors, `steps` Lanczos
    iterations give Ritz values theta_i with weights tau_i (the squared first components of T's
    eigenvectors, summing to 1); the density is the mean over runs of sum_i tau_i N(lambda;
    theta_i, sigma^2). -> (grid of lambda, density values) on a grid spanning every Ritz value."""
    generator = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for r in range(runs):
        alphas, betas = lanczos(operator, operator.random(generator, rademacher=True), min(steps, operator.size),
                                progress=f"density {r + 1}/{runs}")
        theta, vectors = torch.linalg.eigh(tridiagonal(alphas, betas))
        nodes.append(theta)
        weights.append(vectors[0] ** 2)
    nodes, weights = torch.cat(nodes), torch.cat(weights) / runs
    low, high = nodes.min().item(), nodes.max().item()
    span = max(high - low, 1e-12)
    sigma = sigma or span / 200  # wide enough to smooth, narrow against the spread of the spectrum
    lam = torch.linspace(low - 0.05 * span - 5 * sigma, high + 0.05 * span + 5 * sigma, grid, dtype=torch.float64)
    kernels = torch.exp(-0.5 * ((lam[:, None] - nodes[None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return lam, kernels @ weights


def power_iteration(operator, iters=20, seed=0):
    """lambda_max estimate (the eigenvalue of largest magnitude) from `iters` power iterations."""
    v = operator.random(torch.Generator().manual_seed(seed))
    value = torch.zeros((), dtype=torch.float64)
    for _ in range(iters):
        w = operator(v)
        value = torch.dot(w, v)
        v = w / (torch.linalg.vector_norm(w) + 1e-30)
    return value.item()
