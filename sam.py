"""Sharpness-Aware Minimization (Foret et al., ICLR 2021, arXiv 2010.01412).

SAM wraps a base optimizer. The paper's run (m-sharpness, m = 32; train.py's default step, in
engine/step.py TrainStep._grouped) splits each batch into G groups of m images, each ascending with
its own gradient and normalising BatchNorm over itself:

    grads, losses, logits = groups.first(x, y)        # g_k of each group k (engine/groups.py), {p: G x p.shape}
    params, e, norms = optimizer.perturbation(grads)  # e_k = rho g_k / ||g_k||, one per group
    grads = groups.second(x, y, dict(zip(params, e))) # each group's gradient at w + e_k, averaged over k
    for p, g in grads.items():
        p.grad = g
    optimizer.second_step(zero_grad=True)             # w never moved: the base optimizer steps

With one group (m = the whole batch) that is the two calls of davda54/sam's API:

    loss_fn(model(x), y).backward()        # gradient g at w
    optimizer.first_step(zero_grad=True)   # w <- w + e,  e = rho * g / ||g||
    loss_fn(model(x), y).backward()        # gradient at w + e
    optimizer.second_step(zero_grad=True)  # w restored bitwise, base optimizer steps

With adaptive=True this is ASAM (Kwon et al., ICML 2021): e = rho * T_w^2 g / ||T_w g||
with T_w = |w| + eta, applied to every parameter of every param group whose `adaptive`
is true. Put biases and BatchNorm parameters in a group with adaptive=False to leave them
unscaled, as the ASAM authors do.

The paper's ablations: p (Appendix C.5, equation 2) maximises over a p-norm ball,
e = rho * sign(g) |g|^(q-1) / ||g||_q^(q-1) with 1/p + 1/q = 1 (p = 2 above; p = inf gives
e = rho * sign(g)). second_order=True (Appendix C.4) keeps the term dropped in equation 3:
the gradient of L(w + e(w)) is (I + de/dw)^T v with v the gradient at w + e, and
(de/dw)^T v = rho / ||g|| * H (v - g^ (g^ . v)) costs one Hessian-vector product through the
first pass's graph; that first backward must be `loss.backward(create_graph=True)`. torch then
warns of a .grad/graph cycle: first_step(zero_grad=True) and second_step() release it.

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
import math
import numbers

import numpy as np

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel


class SAM(torch.optim.Optimizer):
    """SAM around any optimizer class; param_groups (lr, rho, ...) are shared with it."""

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho=0.05, adaptive=False,
                 eta=0.0, eps=1e-12, p=2, second_order=False, **base_kwargs):
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(f"base_optimizer must be an optimizer class such as torch.optim.SGD, "
                            f"got {base_optimizer!r}")
        checked = _checked(dict(eps=eps, p=p, second_order=second_order))
        self.eps, self.p, self.second_order = checked["eps"], checked["p"], checked["second_order"]
        self.q = 1.0 if self.p == float("inf") else self.p / (self.p - 1)  # the dual exponent
        self._perturbed = None  # (params, backups) between first_step and second_step
        self._first = None      # second_order: (params, first-pass gradients with their graph, ||g||)
        self._ascended = False  # first_step() (or perturbation(grads)) done, second_step() due
        super().__init__(params, dict(rho=rho, adaptive=adaptive, eta=eta, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def add_param_group(self, param_group):
        """Optimizer.__init__ adds every group here too: each one, with the defaults filled in, has its
        hyperparameters checked (ValueError) and made plain floats and bools."""
        if {"eps", "p", "second_order"} & param_group.keys():
            raise ValueError("eps, p and second_order hold for all groups: pass them to SAM(...), not in a group")
        param_group.update(_checked({**self.defaults, **param_group}))
        if self.second_order and (self.p != 2 or param_group["adaptive"] or any(
                g["rho"] != param_group["rho"] for g in self.param_groups)):
            raise ValueError("second_order=True supports p=2, adaptive=False and one rho for all groups")
        super().add_param_group(param_group)

    @torch.no_grad()
    def perturbation(self, grads=None, in_place=False):
        """e = rho T^2 g / ||T g|| for every parameter with a gradient (T = 1, or |w| + eta in ASAM
        groups), and the norm ||T g|| over all of them; for p != 2, e = rho T sign(Tg) |Tg|^(q-1) /
        ||Tg||_q^(q-1) and the norm is ||Tg||_q.

        grads: None for the parameters' .grad; or, for m-sharpness, {param: G x param.shape}, the
        gradients of G groups of examples: each group k gets its own e_k and norm from its own g_k.
        in_place: scale the gradients themselves into e (when they are discarded next).
        -> (params, [e per param], norm): norm is a 0-dim tensor, or of shape (G,) for groups.
        With grads this is the ascent of a step: second_step() follows (w itself never moves)."""
        grouped = grads is not None
        if grouped:
            _check_grouped(grads)
            self._ascended = True
        entries, norms = [], []
        for group in self.param_groups:
            params = [p for p in group["params"] if (p in grads if grouped else p.grad is not None)]
            if not params:
                continue
            g = [grads[p] for p in params] if grouped else [p.grad for p in params]
            t_w = None
            if group["adaptive"]:
                t_w = torch._foreach_abs(params)
                if group["eta"]:
                    torch._foreach_add_(t_w, group["eta"])
                g = _mul(g, t_w)                       # T_w g, whose norm we need
            if self.q == 2:                            # T_w^2 g: a new tensor, ours to scale in place
                direction, own = (_mul(g, t_w), True) if t_w else (g, in_place)
            else:                                      # sign(Tg) |Tg|^(q-1), times T_w for ASAM
                direction, own = [x.sign() * x.abs().pow(self.q - 1) for x in g], True
                direction = _mul(direction, t_w) if t_w else direction
            norms += [torch.linalg.vector_norm(x.flatten(1), self.q, dim=1) for x in g] if grouped else \
                torch._foreach_norm(g, self.q)
            entries.append((group["rho"], params, direction, own))
        if not entries:
            return [], [], None
        # Norms of low-precision gradients are summed in float32; float64 models keep float64.
        dtype = torch.promote_types(norms[0].dtype, torch.float32)
        norm = torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]), self.q, dim=0)
        all_params, perturbations = [], []
        for rho, params, direction, own in entries:
            scale = rho / (norm ** (self.q - 1) + self.eps)  # eps: a zero gradient gives e = 0, not 0/0
            if grouped:  # one scale per group, broadcast over each parameter's shape
                direction = [d * scale.view(-1, *[1] * p.dim()).to(d.dtype) for d, p in zip(direction, params)]
            elif own:
                torch._foreach_mul_(direction, scale)
            else:
                direction = torch._foreach_mul(direction, scale)
            all_params += params
            perturbations += direction
        return all_params, perturbations, norm

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        """Ascend to w + e. Returns the ascent gradient norm as a device tensor (no host sync)."""
        if self._perturbed is not None:  # a second ascent would save w + e as w
            raise RuntimeError("first_step() called twice: call second_step() (or restore()) after each first_step()")
        if self.second_order:
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            if not any(g.requires_grad for g in grads):
                raise RuntimeError("second_order=True needs the first backward with create_graph=True")
        params, perturbations, norm = self.perturbation(in_place=zero_grad and not self.second_order)
        self._perturbed = None
        if params:
            if self.second_order:  # keep g with its graph for the Hessian-vector product
                self._first = (params, [p.grad for p in params], norm)
            weights = _weights(params, self.second_order)
            backups = [self._backup_buffer(p) for p in params]
            torch._foreach_copy_(backups, weights)
            torch._foreach_add_(weights, perturbations)
            self._perturbed = (params, backups)
        self._ascended = True
        if zero_grad:
            self.zero_grad()
        return norm

    def restore(self):
        """Put w back exactly (from a copy, not by subtracting e); with second_order, then add the
        second-order term to the gradients. second_step() calls it; call it yourself to work on
        the final gradient (clip it, say) before the base step."""
        with torch.no_grad():
            if self._perturbed is not None:
                params, backups = self._perturbed
                torch._foreach_copy_(_weights(params, self.second_order), backups)
                self._perturbed = None
        if self._first is not None:
            params, first, norm = self._first
            self._first = None
            v = [p.grad for p in params]  # the gradient at w + e
            with torch.no_grad():
                unit = [g.detach() / norm for g in first]
                along = sum((a * b).sum() for a, b in zip(unit, v))
                u = [b - along * a for a, b in zip(unit, v)]
            hvp = torch.autograd.grad(first, params, grad_outputs=u)  # H u, through the first pass's graph
            with torch.no_grad():
                torch._foreach_add_(v, torch._foreach_mul(hvp, self.param_groups[0]["rho"] / norm))

    @torch.no_grad()
    def second_step(self, zero_grad=False, scaler=None):
        """Restore w (see restore()) and step the base optimizer."""
        if not self._ascended:
            raise RuntimeError("second_step() without first_step(): call first_step() after the first backward, "
                               "then second_step() after the second")
        self._ascended = False
        self.restore()
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


def _weights(params, untracked):
    """The tensors to perturb and restore in place. With second_order, their .data: changing it
    does not bump autograd's version counter, so the first pass's graph (which saved w) stays
    usable, and w is back bitwise before the Hessian-vector product reads it."""
    return [p.data for p in params] if untracked else params


def _mul(a, b):
    """a * b elementwise over two lists; b may lack a's leading group dimension (broadcast)."""
    if all(x.shape == y.shape for x, y in zip(a, b)):
        return torch._foreach_mul(a, b)
    return [x * y for x, y in zip(a, b)]


def _check_grouped(grads):
    """perturbation's grads: {param: (G, *param.shape)}, one G >= 1 for all, else ValueError."""
    sizes = {g.shape[0] if g.dim() == p.dim() + 1 and g.shape[1:] == p.shape else 0 for p, g in grads.items()}
    if len(sizes) > 1 or 0 in sizes:
        raise ValueError("perturbation(grads) takes {param: tensor of shape (G, *param.shape)} with one G >= 1 "
                         f"for all, got shapes {[tuple(g.shape) for g in grads.values()]}")


# What SAM checks in each param group, the base optimizer's lr, momentum and weight decay included (and eps,
# p, second_order once): key -> (lowest, highest, why). Within them no float32 step overflows:
# |e_i| <= rho (|w_i| + eta), rho / eps <= 1e32, and |Tg|^q in the norm (q = p / (p - 1) <= 3) stays finite.
_F32_MAX = float(torch.finfo(torch.float32).max)
_RANGES = {"rho": (0, 100, "a larger ascent overflows float32 weights"),
           "eta": (0, 100, "ASAM's T_w = |w| + eta scales the ascent"),
           "eps": (1e-30, 1e-3, "guards 0/0 only; rho / eps must stay finite in float32"),
           "p": (1.5, math.inf, "as p nears 1, |g|^(p/(p-1)) overflows float32; the paper uses 2 and inf"),
           **{k: (0, _F32_MAX, "finite in float32") for k in ("lr", "momentum", "weight_decay")}}


def _checked(values):
    """values with SAM's hyperparameters checked, one ValueError line each, and made plain: a flag must be
    a bool (numpy's too); a number any real number type (numpy scalars, a one-element tensor), not a bool.
    Tensors stay tensors for the base optimizer (torch's SGD takes a tensor lr)."""
    out = dict(values)
    for key, value in values.items():
        if key in ("adaptive", "second_order"):
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{key} must be True or False, got {value!r}")
            out[key] = bool(value)
        elif key in _RANGES:
            low, high, why = _RANGES[key]
            number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
            if isinstance(number, bool) or not isinstance(number, numbers.Real) or not low <= number <= high:
                raise ValueError(f"{key} must be a real number in [{low:g}, {high:g}] ({why}), got {value!r}")
            tensor = isinstance(value, torch.Tensor) and key not in ("rho", "eta")
            out[key] = value if tensor else float(number)
    return out


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
