"""Checkpoints that are never half-written, and the RNG states a bitwise resume needs."""

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from data.cifar import RELEASES
from engine.config import defaults, model_options
from models import build_model


def atomic_write(path, write):
    """Call write(f) on a temporary binary file, fsync, then rename it over `path`: a crash at
    any moment leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or an interrupt: leave no partial file behind to fill it further
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_atomic(state, path):
    atomic_write(path, lambda f: torch.save(state, f))


def find(path):
    """A checkpoint path, or a run folder's last.pt."""
    path = Path(path)
    return path / "last.pt" if path.is_dir() else path


def load(path):
    """A checkpoint written by train.py, or ValueError with a one-line reason."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message here is a page about weights_only; ours is a line
        raise ValueError(f"{path} is not a readable train.py checkpoint (not a PyTorch file of tensors)") from None
    except Exception as e:  # a truncated or corrupt archive, an unreadable file
        reason = "truncated or corrupt" if "zip" in str(e) else type(e).__name__
        raise ValueError(f"{path} is not a readable train.py checkpoint ({reason})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "step", "config"} <= set(state):
        raise ValueError(f"{path} is not a train.py checkpoint (it lacks model/optimizer/epoch/step/config)")
    return state


def load_model(path, device):
    """The trained model of a checkpoint or run folder, on `device`, in train mode -> (model, state,
    checkpoint path, config): the run's settings, completed with the defaults of settings newer
    than the run. ValueError with a one-line reason when the file is not a train.py checkpoint."""
    path = find(path)
    state = load(path)
    config = {**defaults(), **state["config"]}
    model = build_model(config["model"], num_classes=RELEASES[config["dataset"]][2], **model_options(config))
    model.to(device).load_state_dict(state["model"])
    return model, state, path, config


def is_finite(module):
    """Every parameter and buffer of `module` is finite (one host sync)."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def rng_state():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
