"""Config -> the objects of a run: device, precision, model, optimizer, schedule."""

import contextlib
import functools
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from engine.config import ConfigError, model_options
from models import build_model
from sam import SAM


def resolve_device(name, local_rank=0):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        print("warning: no CUDA device found, training on the CPU (slow; fine for smoke tests)", file=sys.stderr)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} but no CUDA device is available; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def resolve_precision(precision, device):
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision


def autocast_factory(precision, device):
    """A zero-argument callable returning the autocast context for the forward passes."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, device.type, dtype=dtype)


def grad_scaler(precision, device):
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def build_network(config, num_classes, device, channels_last, dist_info):
    """-> (module, net, forward): the plain module (for state_dict), the module or its DDP
    wrapper (for gradient sync and BN control), and what the step calls (maybe compiled)."""
    model = build_model(config["model"], num_classes=num_classes, **model_options(config)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if dist_info.enabled:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = net if config["compile"] == "off" else torch.compile(net, mode=None if config["compile"] == "default"
                                                                   else config["compile"])
    return model, net, forward


def build_optimizer(config, model, device):
    fused = device.type == "cuda"  # one kernel for the whole SGD update
    kwargs = dict(lr=config["lr"], momentum=config["momentum"], nesterov=config["nesterov"] and config["momentum"] > 0,
                  weight_decay=config["weight_decay"])
    if fused:
        kwargs["fused"] = True
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), **kwargs)
    params = model.parameters()
    if config["adaptive"]:  # ASAM scales weights (BatchNorm's too) by |w|, not biases, as its authors do
        named = list(model.named_parameters())
        params = [{"params": [p for n, p in named if n.endswith("weight")], "adaptive": True},
                  {"params": [p for n, p in named if not n.endswith("weight")], "adaptive": False}]
    return SAM(params, torch.optim.SGD, rho=config["rho"], adaptive=config["adaptive"], eta=config["eta"], **kwargs)


def build_schedule(optimizer, total_steps):
    """Cosine decay to zero, stepped every batch, no warmup (the official implementation)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
