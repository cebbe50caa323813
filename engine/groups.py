"""m-sharpness on one process (Foret et al. Section 4.1). The per-process batch is split into G
consecutive groups of m images. Each group normalises BatchNorm over its own m images, ascends
with the gradient of its own mean loss, and takes its second gradient at its own w + e_k; the
descent uses the mean of the G second gradients. That is what the paper's 8 accelerators with
32 images each computed (the official code's per-device pmap), on one device.

BatchNorm running statistics: the first pass only, and the mean over groups of each group's
update, which is what averaging the replicas' statistics gives (the official eval_step pmeans
them). Two implementations compute the same gradients:
  vmap: the G groups batched by torch.func (per-group weights become grouped convolutions);
  loop: the groups one after another, the readable reference the fast path is tested against.
"""

import contextlib

import torch
from torch.func import functional_call, grad, grad_and_value, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from sam import frozen_bn_stats

IMPLEMENTATIONS = ("vmap", "loop")


@contextlib.contextmanager
def fp32_batchnorm_inputs(model):
    """Under autocast, BatchNorm gets bf16/fp16 activations; vmap's BatchNorm rule, with each group's
    running statistics batched, refuses them next to fp32 statistics (on the CPU at least). So for the
    vmap path, BatchNorm takes float32 inputs: what it computes in anyway, and the next convolution
    casts back to the autocast type (ReLU in between commutes with that rounding)."""
    def to_fp32(module, args):
        return (args[0].float(),) if args[0].dtype in (torch.bfloat16, torch.float16) else None
    hooks = [m.register_forward_pre_hook(to_fp32) for m in model.modules() if isinstance(m, _BatchNorm)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def split(tensor, groups):
    """B x ... -> G x (B / G) x ...: consecutive images form a group."""
    return tensor.view(groups, tensor.shape[0] // groups, *tensor.shape[1:])


class GroupGradients:
    """Gradients of `model` for G groups of a batch. `loss_fn(logits, labels)` is the per-group loss;
    weight_decay adds the official (wd/2)||w||^2 of the group's own weights (w or w + e_k)."""

    def __init__(self, model, loss_fn, autocast, impl="vmap", weight_decay=0.0):
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"unknown m-sharpness implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
        self.model, self.loss_fn, self.autocast, self.impl = model, loss_fn, autocast, impl
        self.weight_decay = weight_decay
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def _loss(self, params, buffers, images, labels):
        """-> (the objective, (the cross-entropy alone, logits))."""
        with self.autocast():
            logits = functional_call(self.model, (params, buffers), (images,))
            loss = self.loss_fn(logits, labels)
        # Plain ops, not step.py's fused half_squared_norm: its autograd.Function does not run under vmap.
        penalty = 0.5 * self.weight_decay * sum(w.square().sum() for w in params.values()) if self.weight_decay else 0
        return loss + penalty, (loss, logits)

    def first(self, images, labels, mean=False):
        """Pass 1 at w, each group with its own BatchNorm statistics; running statistics become the
        mean of the groups' updates. -> ({param: G x shape} gradients, or their mean if `mean`,
        G losses, G x m x classes logits)."""
        if self.impl == "loop":
            return self._first_loop(images, labels, mean)
        buffers = dict(self.model.named_buffers())
        per_group = {n: b.expand(len(images), *b.shape).clone() for n, b in buffers.items()}
        weights = {n: p.detach() for n, p in self.params.items()}
        with fp32_batchnorm_inputs(self.model):
            grads, (_, (losses, logits)) = vmap(grad_and_value(self._loss, has_aux=True), in_dims=(None, 0, 0, 0),
                                                randomness="different")(weights, per_group, images, labels)
        self._set_buffers({n: b.mean(0) if b.is_floating_point() else b[0] for n, b in per_group.items()})
        grads = {p: grads[n].mean(0) if mean else grads[n] for n, p in self.params.items()}
        return grads, losses, logits

    def second(self, images, labels, perturbations):
        """Pass 2: group k's gradient at w + e_k (perturbations: {param: G x shape}), BatchNorm
        statistics untouched. -> {param: mean over groups of the gradients}."""
        if self.impl == "loop":
            return self._second_loop(images, labels, perturbations)
        weights = {n: p.detach() + perturbations[p] for n, p in self.params.items()}
        buffers = dict(self.model.named_buffers())
        with frozen_bn_stats(self.model), fp32_batchnorm_inputs(self.model):
            grads = vmap(grad(lambda *a: self._loss(*a)[0]), in_dims=(0, None, 0, 0),
                         randomness="different")(weights, buffers, images, labels)
        return {p: grads[n].mean(0) for n, p in self.params.items()}

    # ---- the reference: one group at a time ----------------------------------------------------

    def _first_loop(self, images, labels, mean):
        start = {n: b.clone() for n, b in self.model.named_buffers()}
        updated, grads, losses, logits = [], [], [], []
        for x, y in zip(images, labels):
            self._set_buffers(start)  # every group updates the same running statistics
            objective, (loss, out) = self._loss(dict(self.params), dict(self.model.named_buffers()), x, y)
            grads.append(torch.autograd.grad(objective, list(self.params.values())))
            updated.append({n: b.clone() for n, b in self.model.named_buffers()})
            losses.append(loss.detach())
            logits.append(out.detach())
        self._set_buffers({n: torch.stack([u[n] for u in updated]).mean(0) if b.is_floating_point() else updated[0][n]
                           for n, b in start.items()})
        stacked = {p: torch.stack([g[i] for g in grads]) for i, p in enumerate(self.params.values())}
        grads = {p: g.mean(0) if mean else g for p, g in stacked.items()}
        return grads, torch.stack(losses), torch.stack(logits)

    def _second_loop(self, images, labels, perturbations):
        params = list(self.params.values())
        backups = [p.detach().clone() for p in params]
        total = [torch.zeros_like(p) for p in params]
        with frozen_bn_stats(self.model):
            for k, (x, y) in enumerate(zip(images, labels)):
                with torch.no_grad():
                    for p, w in zip(params, backups):
                        p.copy_(w + perturbations[p][k])
                objective, _ = self._loss(dict(self.params), dict(self.model.named_buffers()), x, y)
                for t, g in zip(total, torch.autograd.grad(objective, params)):
                    t += g
        with torch.no_grad():
            torch._foreach_copy_(params, backups)
        return {p: t / len(images) for p, t in zip(params, total)}

    @torch.no_grad()
    def _set_buffers(self, values):
        for name, buffer in self.model.named_buffers():
            buffer.copy_(values[name])
