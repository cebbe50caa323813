"""Sharpness-Aware Minimization (Foret et al., ICLR 2021, arXiv 2010.01412).

SAM wraps a base optimizer. One step is two forward-backward passes:

    loss_fn(model(x), y).backward()        # gradient g at w
    optimizer.first_step(zero_grad=True)   # w <- w + e,  e = rho * g / ||g||
    loss_fn(model(x), y).backward()        # gradient at w + e
    optimizer.second_step(zero_grad=True)  # w restored bitwise, base optimizer steps

With adaptive=True this is ASAM (Kwon et al., ICML 2021): e = rho * T_w^2 g / ||T_w g||
with T_w = |w| + eta, applied to every parameter of every param group whose `adaptive`
is true. Put biases and BatchNorm parameters in a group with adaptive=False to leave them
unscaled, as the ASAM authors do.

Mixed precision with fp16 and torch.amp.GradScaler, in this order:

    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)              # the norm (and what you log) is of true gradients
    optimizer.first_step(zero_grad=True)    # non-finite norm -> non-finite perturbation
    scaler.scale(loss_fn(model(x), y)).backward()
    optimizer.second_step(zero_grad=True, scaler=scaler)  # skips the base step on inf/NaN
    scaler.update()

Under bf16 autocast no scaler is needed. For BatchNorm statistics from the first pass only
and for DistributedDataParallel, see `frozen_bn_stats` and `local_gradients` below.
"""

import contextlib

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel


class SAM(torch.optim.Optimizer):
    """SAM around any optimizer class; param_groups (lr, rho, ...) are shared with it."""

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho=0.05, adaptive=False,
                 eta=0.0, eps=1e-12, **base_kwargs):
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(f"base_optimizer must be an optimizer class such as torch.optim.SGD, "
                            f"got {base_optimizer!r}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, eta=eta, **base_kwargs))
        for group in self.param_groups:
            _check_group(group)
        self.eps = eps
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._perturbed = None  # (params, backups) between first_step and second_step

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        """Ascend to w + e. Returns the ascent gradient norm as a device tensor (no host sync)."""
        norms, ascents = [], []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["adaptive"]:
                t_w = torch._foreach_abs(params)
                if group["eta"]:
                    torch._foreach_add_(t_w, group["eta"])
                scaled = torch._foreach_mul(t_w, grads)        # T_w g, whose norm we need
                norms.extend(torch._foreach_norm(scaled))
                direction = torch._foreach_mul(scaled, t_w)     # T_w^2 g
            else:
                norms.extend(torch._foreach_norm(grads))
                direction = grads
            # Scale in place where we own the tensors, or where the gradients are discarded next.
            ascents.append((group["rho"], params, direction, group["adaptive"] or zero_grad))
        if not norms:
            self._perturbed = None
            return None
        # Norms of low-precision gradients are summed in float32; float64 models keep float64.
        device = norms[0].device
        dtype = torch.promote_types(norms[0].dtype, torch.float32)
        grad_norm = torch.linalg.vector_norm(torch.stack([n.to(device, dtype) for n in norms]))

        all_params, all_backups = [], []
        for rho, params, direction, in_place in ascents:
            backups = [self._backup_buffer(p) for p in params]
            torch._foreach_copy_(backups, params)
            # The eps keeps a zero gradient from giving 0/0; then e = 0 and nothing moves.
            scale = rho / (grad_norm + self.eps)
            if in_place:
                torch._foreach_mul_(direction, scale)
            else:
                direction = torch._foreach_mul(direction, scale)
            torch._foreach_add_(params, direction)
            all_params += params
            all_backups += backups
        self._perturbed = (all_params, all_backups)
        if zero_grad:
            self.zero_grad()
        return grad_norm

    @torch.no_grad()
    def second_step(self, zero_grad=False, scaler=None):
        """Restore w exactly (from a copy, not by subtracting e) and step the base optimizer."""
        if self._perturbed is not None:
            params, backups = self._perturbed
            torch._foreach_copy_(params, backups)
            self._perturbed = None
        if scaler is None:
            self.base_optimizer.step()
        else:
            scaler.step(self.base_optimizer)
        # LR schedulers attached to this object check this flag to know a step happened.
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    def step(self, closure=None):
        """Closure form, as in davda54/sam: `loss.backward(); optimizer.step(closure)`.

        The closure does a full forward-backward and returns the loss; it is evaluated at
        w + e. If no gradient is present yet, it is first called once at w to get one.
        Returns the loss at w + e.
        """
        if closure is None:
            raise ValueError("SAM.step needs a closure that does a forward-backward pass; "
                             "or call first_step() and second_step() yourself")
        closure = torch.enable_grad()(closure)
        if not any(p.grad is not None for group in self.param_groups for p in group["params"]):
            closure()
        self.first_step(zero_grad=True)
        loss = closure()
        self.second_step()
        return loss

    def _backup_buffer(self, p):
        state = self.state[p]
        if "backup" not in state:
            state["backup"] = torch.empty_like(p, memory_format=torch.preserve_format)
        return state["backup"]

    def state_dict(self):
        """The base optimizer's state (momentum buffers) and the shared param groups (lr, rho)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.base_optimizer.load_state_dict(state_dict)
        # load_state_dict builds new group dicts; share them again.
        self.param_groups = self.base_optimizer.param_groups


def _check_group(group):
    if not isinstance(group["rho"], (int, float)) or group["rho"] < 0:
        raise ValueError(f"rho must be a number >= 0, got {group['rho']!r}")
    if not isinstance(group["eta"], (int, float)) or group["eta"] < 0:
        raise ValueError(f"eta must be a number >= 0, got {group['eta']!r}")


@contextlib.contextmanager
def frozen_bn_stats(model):
    """BatchNorm normalises with batch statistics but leaves running_mean/var and
    num_batches_tracked untouched: SAM's second pass must not update them (the official
    implementation keeps the statistics of the first, unperturbed pass)."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def local_gradients(model):
    """Context for SAM's first backward: under DistributedDataParallel, skip the all-reduce so
    each replica ascends with its own gradient (the paper's m-sharpness, m = per-replica batch).
    The second backward, outside this context, is averaged across replicas as usual."""
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()
