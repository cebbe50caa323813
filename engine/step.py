"""One optimisation step (SAM's two passes, or SGD) and the objects it is made of. train.py and
benchmarks/throughput.py both build it with build_training(), so the benchmark times the real step."""

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from data.loaders import derived_seed
from engine.config import ConfigError, model_options
from engine.distributed import all_reduce_mean
from engine.groups import GroupGradients, split
from models import build_model
from sam import SAM, frozen_bn_stats, local_gradients


@dataclass
class Runtime:
    device: torch.device
    precision: str        # bf16, fp16 or fp32
    channels_last: bool

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


def resolve_device(name, local_rank=0):
    """--device (auto, cpu, cuda, cuda:N) -> torch.device, or ConfigError naming the fix."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} but no CUDA device is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name} but only {torch.cuda.device_count()} CUDA device(s) exist; "
                          f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


def resolve_runtime(config, local_rank=0):
    """Device, precision and memory format from the config ('auto' resolved), or ConfigError."""
    device = resolve_device(config["device"], local_rank)
    precision = config["precision"]
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    channels_last = device.type == "cuda" if config["channels_last"] is None else config["channels_last"]
    return Runtime(device, precision, channels_last)


@dataclass
class Training:
    """What a run trains: `model` (for state_dict and evaluation), `step` (one optimisation step
    on a batch), and the optimizer state a checkpoint must carry."""
    model: torch.nn.Module
    step: "TrainStep"
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler = None


def build_training(config, num_classes, runtime, total_steps, distributed=False, world_size=1):
    device = runtime.device
    model = build_model(config["model"], num_classes=num_classes, **model_options(config)).to(device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model  # what gradient sync and BatchNorm control act on
    if distributed:  # each replica keeps its own BatchNorm statistics; train.py averages them each epoch
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
    forward = net
    if config["compile"] != "off":
        forward = torch.compile(net, mode=None if config["compile"] == "default" else config["compile"])

    decay_in_loss = config["weight_decay"] if config["weight_decay_in"] == "loss" else 0.0
    kwargs = dict(lr=config["lr"], momentum=config["momentum"], nesterov=config["nesterov"],
                  weight_decay=config["weight_decay"] - decay_in_loss)
    if device.type == "cuda":
        kwargs["fused"] = True  # one kernel for the whole SGD update
    if config["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), **kwargs)
    else:
        params = model.parameters()
        if config["adaptive"]:  # ASAM scales weights (BatchNorm's too) by |w|, not biases, as its authors do
            named = list(model.named_parameters())
            params = [{"params": [p for n, p in named if n.endswith("weight")], "adaptive": True},
                      {"params": [p for n, p in named if not n.endswith("weight")], "adaptive": False}]
        optimizer = SAM(params, torch.optim.SGD, rho=config["rho"], adaptive=config["adaptive"], eta=config["eta"],
                        p=config["sam_p"], second_order=config["sam_second_order"], **kwargs)
    schedule = CosineSchedule(optimizer, total_steps)
    scaler = torch.amp.GradScaler(device.type) if runtime.precision == "fp16" else None
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
    groups = None
    count = group_count(config, world_size)
    if count > 1:  # m-sharpness: groups of m images in each process's batch (engine/groups.py)
        groups = (count, GroupGradients(model, criterion, runtime.autocast, config["m_sharpness_impl"],
                                        weight_decay=decay_in_loss))
    step = TrainStep(forward, net, optimizer, criterion, sam=config["optimizer"] == "sam", autocast=runtime.autocast,
                     scaler=scaler, cudagraphs=config["compile"] == "reduce-overhead" and device.type == "cuda",
                     weight_decay=decay_in_loss, grad_clip=config["grad_clip"], groups=groups)
    return Training(model, step, optimizer, schedule, scaler)


def takes_sam_step(config, epoch, step):
    """Whether optimisation step `step` (0-based, counted over the run) in `epoch` (0-based) is a SAM
    step: SAM runs take SGD steps before --sam-start-epoch (late-phase SAM, Zhou et al. 2025) and, with
    --sam-prob P < 1, a SAM step with probability P, drawn from (seed, step) alone, so a resumed run
    draws the same (randomized SAM, Zhao et al. 2022)."""
    if config["optimizer"] != "sam" or epoch < config["sam_start_epoch"]:
        return False
    p = config["sam_prob"]
    return p >= 1 or (p > 0 and np.random.default_rng(derived_seed(config["seed"], step, 3)).random() < p)


def group_count(config, world_size):
    """Groups of m images per process; 1 when m is off or is the whole per-process batch (then
    per-group SAM is plain SAM, and the plain step computes it)."""
    m = config["m_sharpness"]
    return config["batch_size"] // world_size // m if m else 1


class CosineSchedule(torch.optim.lr_scheduler.LambdaLR):
    """lr = peak * (1 + cos(pi * step / total_steps)) / 2, stepped every batch, no warmup (official
    flax_training.py get_cosine_schedule). Closed form: a resumed run seeks to its step."""

    def __init__(self, optimizer, total_steps):
        self.total_steps = total_steps
        super().__init__(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, self.total_steps)
                                                                      / self.total_steps)))

    def seek(self, step):
        self.last_epoch = step
        for group, base_lr, factor in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas):
            group["lr"] = base_lr * factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class TrainStep:
    """`forward` runs the batch (maybe compiled); `net` is the module it wraps (maybe DDP), for
    BatchNorm and gradient-sync control. A call returns device tensors: the first pass's mean
    loss (cross-entropy, without the weight penalty), its number of correct predictions, and
    SAM's ascent gradient norm (None for an SGD step). Nothing here waits for the device.

    sam: the optimizer is SAM (its base optimizer takes the steps). A call's `sam=False` takes an SGD
    step with it instead: one pass, the same base optimizer, decay, clip and groups (late-phase and
    randomized SAM).

    weight_decay: the official loss term (wd/2)||w||^2 (0 when SGD applies the decay instead).
    grad_clip: clip the global norm of the descent gradient, after averaging, before the step."""

    def __init__(self, forward, net, optimizer, criterion, *, sam, autocast, scaler=None, cudagraphs=False,
                 weight_decay=0.0, grad_clip=0.0, groups=None):
        self.forward, self.net, self.optimizer, self.criterion = forward, net, optimizer, criterion
        self.sam, self.autocast, self.scaler = sam, autocast, scaler
        self.base = optimizer.base_optimizer if sam else optimizer
        self.weight_decay, self.grad_clip = weight_decay, grad_clip
        self.second_order = sam and optimizer.second_order
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.groups = groups  # (G, GroupGradients) with m-sharpness, else None
        # With CUDA graphs each forward replays into the same output buffers: mark every
        # forward as a new step and copy what we keep before the next one.
        self.mark = torch.compiler.cudagraph_mark_step_begin if cudagraphs else (lambda: None)

    def _loss(self, images, labels):
        self.mark()
        with self.autocast():
            logits = self.forward(images)
            return self.criterion(logits, labels), logits

    def _backward(self, loss, create_graph=False):
        if self.weight_decay:
            loss = loss + half_squared_norm(self.params, self.weight_decay)
        if self.scaler:
            loss = self.scaler.scale(loss)
        if create_graph:  # the graph of g stays for SAM's second-order term (autograd.grad: no .grad cycle)
            for p, g in zip(self.params, torch.autograd.grad(loss, self.params, create_graph=True)):
                p.grad = g
        else:
            loss.backward()

    def _descend(self, sam):
        """The base optimizer's step on the final gradient: w restored (SAM), unscaled (fp16),
        clipped, stepped."""
        if sam:
            self.optimizer.restore()  # w back, and the second-order term added if asked for
        if self.scaler:
            self.scaler.unscale_(self.base)
        if self.grad_clip:
            clip_global_norm([p.grad for p in self.params if p.grad is not None], self.grad_clip)
        if sam:
            self.optimizer.second_step(zero_grad=True, scaler=self.scaler)
        else:
            self.scaler.step(self.base) if self.scaler else self.base.step()
            self.base.zero_grad(set_to_none=True)
            self.optimizer._opt_called = True  # for the schedule, attached to SAM (whose second_step sets it too)
        if self.scaler:
            self.scaler.update()

    def __call__(self, images, labels, sam=None):
        sam = self.sam if sam is None else sam and self.sam
        if self.groups:
            return self._grouped(images, labels, sam)
        with local_gradients(self.net) if sam else contextlib.nullcontext():
            loss, logits = self._loss(images, labels)
            self._backward(loss, create_graph=sam and self.second_order)
        loss_value = loss.detach().clone()
        correct = (logits.detach().argmax(1) == hard(labels)).sum()
        grad_norm = None
        if sam:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)  # the ascent norm is of true gradients
            grad_norm = self.optimizer.first_step(zero_grad=True)
            with frozen_bn_stats(self.net):  # running statistics come from the first pass only
                loss2, _ = self._loss(images, labels)
                self._backward(loss2)
        self._descend(sam)
        return loss_value, correct, grad_norm

    def _grouped(self, images, labels, sam):
        """m-sharpness: G groups of m images, each with its own BatchNorm statistics and, for SAM,
        its own ascent; the descent uses the mean of the groups' (second) gradients."""
        count, group_grads = self.groups
        x, y = split(images, count), split(labels, count)
        if sam:
            grads, losses, logits = group_grads.first(x, y)
            params, perturbations, norms = self.optimizer.perturbation(grads)
            grads = group_grads.second(x, y, dict(zip(params, perturbations)))
        else:
            grads, losses, logits = group_grads.first(x, y, mean=True)
        for p, g in grads.items():
            p.grad = g
        if torch.distributed.is_initialized():  # the gradients were taken outside DDP: average them here
            all_reduce_mean([p.grad for p in grads])
        self._descend(sam)
        correct = (logits.detach().argmax(-1) == hard(y)).sum()
        return losses.detach().mean(), correct, norms.mean() if sam else None


def hard(labels):
    """Class indices; mixup's soft labels count as their larger part."""
    return labels.argmax(-1) if labels.is_floating_point() else labels


class _HalfSquaredNorm(torch.autograd.Function):
    """(wd/2) sum ||w||^2 in one fused reduction, and its gradient wd * w in one fused multiply."""

    @staticmethod
    def forward(ctx, weight_decay, *params):
        ctx.weight_decay = weight_decay
        ctx.save_for_backward(*params)
        return 0.5 * weight_decay * torch.stack(torch._foreach_norm(params)).square().sum()

    @staticmethod
    def backward(ctx, grad):
        params, scale = ctx.saved_tensors, grad * ctx.weight_decay
        if torch.is_grad_enabled():  # create_graph: the gradient stays differentiable (SAM's second order)
            return None, *[p * scale for p in params]
        return None, *torch._foreach_mul(params, scale)


def half_squared_norm(params, weight_decay):
    """The official weight penalty (wd/2) ||w||^2 over all parameters (flax_training.py train_step)."""
    return _HalfSquaredNorm.apply(weight_decay, *params)


@torch.no_grad()
def clip_global_norm(grads, max_norm):
    """The official clip_by_global_norm: unchanged below max_norm, else g * max_norm / ||g||
    (torch's clip_grad_norm_ adds 1e-6 to the norm, a different rule by a hair)."""
    norms = torch.stack(torch._foreach_norm(grads))
    norm = torch.linalg.vector_norm(norms.to(torch.promote_types(norms.dtype, torch.float32)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / norm, max=1.0).to(grads[0].dtype))
