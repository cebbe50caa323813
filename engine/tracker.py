"""Every metric goes to the run folder's metrics.jsonl and, unless disabled, to Weights &
Biases, so nothing depends on the network."""

import json
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from engine.checkpoint import atomic_write


def has_wandb_credentials():
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode(flag):
    """--wandb-mode, else $WANDB_MODE, else online with credentials and offline without."""
    if flag:
        return flag
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":  # wandb's old name for offline
        return "offline"
    return "online" if has_wandb_credentials() else "offline"


class Tracker:
    def __init__(self, run_dir, config, *, mode, project, entity, group, tags, run_id, resumed_step):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.run = None
        if resumed_step is not None:
            self._truncate_after(resumed_step)  # the resumed run logs those steps again
        if mode != "disabled":
            import wandb
            self.run = wandb.init(project=project, entity=entity, group=group, tags=tags, config=config,
                                  name=Path(run_dir).name, id=run_id, resume="allow", mode=mode,
                                  dir=str(run_dir))
            if mode == "offline":
                print(f"W&B is offline; upload later with: wandb sync {run_dir}/wandb/offline-run-*")

    @property
    def run_id(self):
        return self.run.id if self.run else None

    def log(self, metrics, step):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
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
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
        atomic_write(self.path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))
