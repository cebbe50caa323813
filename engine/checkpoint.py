"""Checkpoints that are never half-written and prove they are whole and whose they are, the RNG
states a bitwise resume needs, and the lock that keeps one live process per run folder."""

import errno
import fcntl
import hashlib
import io
import os
import pickle
import random
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from data.cifar import RELEASES
from engine.config import SETTINGS, ConfigError, check_path, defaults, model_options, read, setting_value
from models import build_model

LOCK = ".lock"
# What train.py's last.pt holds, each for one reason: what resumes the computation (model, optimizer,
# scaler, rng, epoch, batch, step, partial), what the run reports (sam_steps, best, metrics, wall_time),
# what proves the file is this run's, on this run's data, and whole (config, run_id, data_md5, digest).
RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "results.json", ".lock", "stdout.log")  # a run folder's own
RUN_FOLDERS = ("wandb", "slurm")  # W&B's files, and submitit's

UMASK = os.umask(0o022)
os.umask(UMASK)

KEYS = {"model", "optimizer", "scaler", "rng", "epoch", "batch", "step", "partial", "sam_steps", "best", "metrics",
        "wall_time", "config", "run_id", "data_md5", "digest"}


def atomic_write(path, data):
    """Write bytes to a new temporary file beside `path` (created, never opened through a link that
    lies in wait), fsync, then rename it over `path`: a crash at any moment leaves either the old file
    or the new one, never a torn one. A full disk raises OSError(ENOSPC) with `needed` (the bytes it
    was writing) and leaves no partial file behind."""
    path = Path(path)
    if path.exists() and not path.is_file():  # the rename would put a file where a device or a pipe was
        raise OSError(errno.EEXIST, "not a regular file, so it is not replaced", str(path))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp)
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # as open() would make it (mkstemp makes it private)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk or an interrupt: leave no partial file behind to fill it further
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            e.needed = len(data)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_atomic(state, path):
    """torch.save into memory first: serialising never meets the disk, so a full disk is one plain
    OSError from the write (torch's own file writer reports it as a RuntimeError about zip offsets)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getbuffer())


def digest(value, h=None):
    """SHA-256 of a checkpoint's contents (tensors by dtype, shape and bytes; other values by repr),
    the same before saving and after loading: a flipped byte anywhere shows."""
    h = h or hashlib.sha256()
    if isinstance(value, dict):
        for k, v in value.items():
            h.update(repr(k).encode())
            digest(v, h)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for v in value:
            digest(v, h)
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(value).encode())
    return h.hexdigest()


def seal(state):
    """The state with its digest: load() refuses a checkpoint whose contents no longer match it."""
    state = {k: v for k, v in state.items() if k != "digest"}
    return {**state, "digest": digest(state)}


def check_belongs(state, earlier, run_dir):
    """A checkpoint continues the run of its folder: the run id in last.pt is the one in config.yaml."""
    theirs = (earlier or {}).get("meta", {}).get("wandb_id")
    if theirs != state["run_id"]:
        found = f"its config.yaml names run {theirs}" if theirs else "it holds no readable config.yaml"
        raise ConfigError(f"{run_dir / 'last.pt'} is the checkpoint of run {state['run_id']}, but {run_dir} is not "
                          f"that run's folder ({found}); put the checkpoint back in its own folder, or start a new run")


def finished(run_dir):
    """Whether a run folder holds a finished run: a results.json naming the run of the folder's config.yaml
    (a results.json copied from another run, or unreadable, finishes nothing)."""
    import json
    try:
        said = json.loads(read(Path(run_dir) / "results.json")).get("run_id")
    except (OSError, ValueError, RecursionError, AttributeError, ConfigError):
        return False
    return said is not None and str(said) == folder_run_id(run_dir)


def folder_run_id(folder):
    """The run id that a run folder's config.yaml names (None: no config.yaml; "" : one without an id)."""
    path = Path(folder) / "config.yaml"
    if not path.exists():
        return None
    try:
        saved = yaml.safe_load(read(path).decode())
        return str(saved["meta"]["wandb_id"])
    except Exception:  # unreadable, not a mapping, no meta: it names no run
        return ""


def disk_full(error):
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def is_run_folder(folder):
    """Whether train.py wrote this folder: its checkpoint, metrics or results, or a config.yaml of its own
    (settings and their meta), which it writes first. A project's own config.yaml beside it is not one."""
    folder = Path(folder)
    if any((folder / name).is_file() for name in ("last.pt", "metrics.jsonl", "results.json")):
        return True
    try:
        saved = yaml.safe_load(read(folder / "config.yaml").decode()) if (folder / "config.yaml").is_file() else None
    except Exception:  # unreadable: not evidence of a run
        return False
    return isinstance(saved, dict) and "meta" in saved and "model" in saved


def enclosing_run(path):
    """The run folder train.py wrote that `path` is, or lies inside (after following links), or None."""
    real = Path(os.path.realpath(path))
    return next((folder for folder in (real, *real.parents) if is_run_folder(folder)), None)


def find(path):
    """A checkpoint path, or a run folder's last.pt (ConfigError for a path the system cannot take)."""
    path = check_path(path, "the run")
    return path / "last.pt" if path.is_dir() else path


def load(path, in_its_folder=True):
    """A checkpoint written by train.py, whole, with settings this code can build, and (`in_its_folder`)
    the run of the folder it lies in, when that is a run folder; else ValueError with a one-line reason.
    Memory-mapped: reading its settings costs nothing; tensors are read when used."""
    if not Path(path).is_file():
        raise ValueError(f"{path} is not a readable train.py checkpoint (no such file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # torch's message here is a page about weights_only; ours is a line
        raise ValueError(f"{path} is not a readable train.py checkpoint (not a PyTorch file of tensors)") from None
    except Exception as e:  # a truncated or corrupt archive, an unreadable file
        reason = "truncated or corrupt" if "zip" in str(e) else type(e).__name__
        raise ValueError(f"{path} is not a readable train.py checkpoint ({reason})") from None
    if not isinstance(state, dict) or not KEYS <= set(state):
        missing = sorted(KEYS - set(state)) if isinstance(state, dict) else sorted(KEYS)
        raise ValueError(f"{path} is not a train.py checkpoint of this version (it lacks {', '.join(missing)})")
    if digest({k: v for k, v in state.items() if k != "digest"}) != state["digest"]:
        raise ValueError(f"{path} is damaged (its contents do not match the digest it was saved with)")
    if not isinstance(state["config"], dict):
        raise ValueError(f"{path} holds no settings (its config is a {type(state['config']).__name__})")
    try:  # settings this code can build: a value of a newer version (or a hand-sealed file) is refused here
        state["config"] = {k: setting_value(k, v, f"in {path}") if k in SETTINGS and v is not None else v
                           for k, v in state["config"].items()}  # None: unset (wandb_mode), or unused
    except ConfigError as e:
        raise ValueError(str(e)) from None
    theirs = folder_run_id(Path(path).parent) if in_its_folder else None  # in a run folder: that run's
    if theirs is not None and theirs != str(state["run_id"]):
        raise ValueError(f"{path} is the checkpoint of run {state['run_id']}, but its folder's config.yaml "
                         f"names {'run ' + theirs if theirs else 'no run'}: it is not this folder's run; put it "
                         f"back in its own folder")
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


class RunLock:
    """One live process per run folder: an OS lock (flock) on the run folder itself, and on <run>/.lock
    (a file lock also holds on network file systems, where a folder cannot always be locked). The
    kernel releases both when the process ends however it ends, so a kill -9 leaves no stale lock,
    and deleting .lock does not release the folder's. The file names the holder."""

    def __init__(self, run_dir):
        self.dir, self.path, self.fds = Path(run_dir), Path(run_dir) / LOCK, []

    def acquire(self):
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.fds = [_lock(os.open(self.dir, os.O_RDONLY), fcntl.LOCK_EX, optional=True)]
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)  # never through a link
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(errno.EINVAL, "not a regular file", str(self.path))
            self.fds.append(_lock(fd, fcntl.LOCK_EX))  # closes fd when another process holds it
        except BlockingIOError:
            self.release()
            raise ConfigError(in_use(self.dir)) from None
        except OSError as e:  # the folder cannot be made, or .lock is a folder, a link or a named pipe
            self.release()
            raise ConfigError(f"cannot create and lock run folder {self.dir} ({e.strerror}: {e.filename}); choose "
                              f"another --out-dir, or move a .lock that is not a regular file away") from None
        note = self.fds[-1]
        os.ftruncate(note, 0)
        os.write(note, f"process {os.getpid()} on {socket.gethostname()} since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        return self

    def release(self):
        for fd in self.fds:
            if fd is not None:
                os.close(fd)  # closing drops the lock
        self.fds = []


def _lock(fd, how, optional=False):
    """flock(fd, how | LOCK_NB) -> fd; BlockingIOError when another process holds it. optional: a file
    system that cannot lock this (ENOLCK, EBADF, EINVAL) gives None instead of an error."""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:
        os.close(fd)
        if optional:
            return None
        raise
    return fd


def holder(run_dir):
    """Who holds the run folder's lock (its line in .lock), or None when no live process does."""
    for path in (Path(run_dir), Path(run_dir) / LOCK):
        try:  # a .lock that is a link or a named pipe is nobody's lock (and must not block this reader)
            fd = os.open(path, os.O_RDONLY | (os.O_NOFOLLOW | os.O_NONBLOCK if path.name == LOCK else 0))
        except OSError:
            continue
        if path.name == LOCK and not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            continue
        try:
            got = _lock(fd, fcntl.LOCK_SH, optional=True)
        except BlockingIOError:
            try:
                return read(Path(run_dir) / LOCK).decode(errors="replace").strip() or "another process"
            except OSError:
                return "another process"
        if got is not None:
            os.close(got)
    return None


def in_use(run_dir):
    return (f"run folder {run_dir} is in use by {holder(run_dir) or 'another process'}; wait for it to end or stop "
            f"it (a run stopped by a signal checkpoints first), then run this again")


def write_failure(run_dir, e):
    """One line for a failed write of a run: what, where, how much space it needed, how to continue."""
    if disk_full(e):
        folder = next(p for p in (run_dir, *run_dir.parents) if p.exists())
        needed = f", and the write needed {size(e.needed)}" if getattr(e, "needed", None) else ""
        problem = f"No space left on device: the disk holding {run_dir} has {size(shutil.disk_usage(folder).free)} " \
                  f"free{needed}"
    else:
        problem = f"writing the run failed: {e.strerror or e} ({e.filename or run_dir})"
    if not (run_dir / "last.pt").is_file():
        return f"{problem}; nothing was checkpointed; free space or fix the folder, then run the same command again"
    return (f"{problem}; the last good checkpoint {run_dir / 'last.pt'} is intact; free space or fix the folder, "
            f"then continue with: python train.py --resume {run_dir}")


def size(n):
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"
