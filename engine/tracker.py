"""Every metric goes to the run folder's metrics.jsonl and, unless disabled, to Weights & Biases,
so nothing depends on the network. A metrics.jsonl row holds the keys of the W&B row logged with it,
plus "step" (W&B's step) and "kind": "step" (every --log-every steps) or "epoch" (an epoch's end).
Step metrics accumulate on the device in a Window and reach the host only when logged."""

import json
import netrc
import os
import secrets
import time
from pathlib import Path
from urllib.parse import urlparse

import torch

from engine.checkpoint import atomic_write
from engine.config import ConfigError, read


def has_wandb_credentials():
    """Whether W&B would find a key: $WANDB_API_KEY, or the netrc file ($NETRC, else ~/.netrc) holding one
    for $WANDB_BASE_URL's host. ConfigError for a netrc that is not a readable text file or a URL W&B
    could not use (a netrc it cannot parse holds no key for it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    except ValueError as e:
        raise ConfigError(f"$WANDB_BASE_URL is not a URL ({e}); fix or unset it") from None
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    if not path.exists():
        return False
    try:
        read(path).decode()  # a named pipe or a folder is refused, never waited on
        return netrc.netrc(str(path)).authenticators(host) is not None
    except netrc.NetrcParseError:  # a netrc W&B cannot use either: no key
        return False
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"the netrc file {path} (W&B's credentials) cannot be read ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:100] if str(e) else '-'}); fix it, or set $NETRC to another file") \
            from None


def wandb_mode(flag):
    """--wandb-mode, else $WANDB_MODE, else online with credentials and offline without. A $WANDB_MODE
    that wandb would not understand is refused even under the flag (wandb reads it too)."""
    if flag and os.environ.get("WANDB_MODE") in (None, "online", "offline", "disabled", "dryrun"):
        return flag
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":  # wandb's old name for offline
        return "offline"
    if env is not None:
        from engine.config import ConfigError
        raise ConfigError(f"$WANDB_MODE is {env!r}; set it to online, offline or disabled (or dryrun, W&B's old "
                          f"name for offline), or unset it")
    return "online" if has_wandb_credentials() else "offline"


def no_links(path, flags):
    """An opener for a run's appended files: never through a link (it would write into another's file)."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o666)  # the umask decides, as open() does (os.open: 0o777)


def wandb_dir(run_dir):
    """Where W&B keeps a run's files: $WANDB_DIR when set (W&B's own convention), else the run folder."""
    return Path(os.environ.get("WANDB_DIR") or run_dir)


def new_run_id():
    """Chosen when a run folder is created and kept in its config.yaml, so every process that
    works on the run (restarts and resumes included) logs to the same W&B run."""
    return secrets.token_hex(4)


class Tracker:
    def __init__(self, run_dir, config, *, mode, project, entity, group, tags, run_id, resumed_step):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.run = None
        if resumed_step is not None:
            self._truncate_after(resumed_step)  # the resumed process logs those steps again
        if mode != "disabled":
            import wandb
            folder = wandb_dir(run_dir)
            self.run = wandb.init(project=project, entity=entity, group=group, tags=tags, name=Path(run_dir).name,
                                  id=run_id, resume="allow", mode=mode, dir=str(folder))
            self.run.config.update(config, allow_val_change=True)  # a resume may record changed settings
            if mode == "offline":
                print(f"W&B is offline; upload later with: wandb sync {self.run.dir.rsplit('/files', 1)[0]}")

    def log(self, metrics, step, kind):
        """kind: "step" or "epoch"."""
        with open(self.path, "a", opener=no_links) as f:
            f.write(json.dumps({"step": step, "kind": kind, **metrics}) + "\n")
        if self.run:
            self.run.log(metrics, step=step)

    def summary(self, values):
        if self.run:
            self.run.summary.update(values)

    def log_artifact(self, path, name):
        if self.run:
            import wandb
            artifact = wandb.Artifact(name, type="model")
            artifact.add_file(str(path))
            self.run.log_artifact(artifact)

    def finish(self, exit_code=0):
        if self.run:
            self.run.finish(exit_code=exit_code)

    def _truncate_after(self, step):
        if not self.path.is_file():
            return
        kept = []
        for line in read(self.path).splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError, RecursionError):  # torn by a kill, not text, too deep: dropped
                continue
        atomic_write(self.path, b"".join(line + b"\n" for line in kept))


class Window:
    """Sums of the step metrics since the last log, kept on the device: loss x images, correct
    predictions, ascent gradient norm; and on the host how many steps, SAM steps and images went in.
    `first_bad` is the first step whose loss was not finite (-1 while none)."""

    def __init__(self, device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.steps = self.sam_steps = self.images = 0
        self.start = time.perf_counter()

    def add(self, step, loss, correct, ascent_norm, n):
        norm = ascent_norm.double() if ascent_norm is not None else torch.zeros((), dtype=torch.float64,
                                                                                 device=self.sums.device)
        self.sums += torch.stack([loss.double() * n, correct.double(), norm])
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)
        self.steps, self.images = self.steps + 1, self.images + n
        self.sam_steps += ascent_norm is not None

    def reset(self):
        self.sums.zero_()
        self.steps = self.sam_steps = self.images = 0
        self.start = time.perf_counter()

    def state_dict(self):
        return {"sums": self.sums.cpu(), "steps": self.steps, "sam_steps": self.sam_steps, "images": self.images}

    def load_state_dict(self, state):
        self.sums.copy_(state["sums"])
        self.steps, self.sam_steps, self.images = state["steps"], state["sam_steps"], state["images"]
