"""What a run records about itself: config.yaml (its settings, and the metadata beside them: code,
versions, device, data) and W&B as it starts, results.json at the end. Every value is what the run used."""

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from engine.checkpoint import atomic_write
from engine.config import EXPERIMENT, loader_kind, recorded
from engine.tracker import Tracker, wandb_mode

REPO = Path(__file__).resolve().parents[1]


def git(*args):
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run_metadata(run, data, wandb_id, relabelled=None):
    device, model = run.runtime.device, run.training.model
    return {
        "command": " ".join([sys.executable, *sys.argv]),
        "git_commit": git("rev-parse", "HEAD") or None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "torch": str(torch.__version__), "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": run.runtime.precision, "world_size": run.dist.world_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dataset_official": data.fingerprint["official"], "dataset_md5": data.fingerprint["md5"],
        "wandb_id": wandb_id,
        **({"relabelled_from": relabelled} if relabelled else {}),
    }


def results(run):
    """results.json: the final and best accuracies, the run's length and cost, and its settings."""
    last, best, config = run.last_metrics, run.best, recorded(run.config)
    out = {"final_test_acc": last.get("test/acc"),
           "final_test_error": 1 - last["test/acc"] if "test/acc" in last else None,
           "best_test_acc": best.get("best_test_acc"),
           "best_test_error": 1 - best["best_test_acc"] if "best_test_acc" in best else None,
           "epochs": run.epoch, "steps": run.step, "sam_steps": run.sam_steps,
           "passes_per_step": (run.step + run.sam_steps) / run.step,
           **{k: config[k] for k in ("model", "dataset", "augment", "optimizer", "rho", "seed")},
           "settings": {**{k: config[k] for k in EXPERIMENT}, "precision": run.runtime.precision,
                        "loader": loader_kind(run.config)},  # auto resolved: what the run used
           "run_id": run.meta["wandb_id"], "git_commit": run.meta["git_commit"], "dataset_md5": run.meta["dataset_md5"],
           "dataset_official": run.meta["dataset_official"]}
    if "val/acc" in last:
        out.update(final_val_acc=last["val/acc"], best_val_acc=best.get("best_val_acc"))
    return out


def start_tracking(run):
    config, meta = recorded(run.config), run.meta
    resumed = run.step > 0 or (run.dir / "config.yaml").is_file()  # an earlier attempt logged to this run
    if resumed:
        from engine.stopping import position
        print(f"resuming {run.dir} after step {run.step} ({position(run)})" if run.step else
              f"resuming {run.dir} from its start (the earlier attempt stopped before its first checkpoint)")
    print(yaml.safe_dump({"config": config, **meta}, sort_keys=False).rstrip())
    run.dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run.dir / "config.yaml", yaml.safe_dump({**config, "meta": meta}, sort_keys=False).encode())
    return Tracker(run.dir, {**config, "meta": meta}, mode=wandb_mode(config["wandb_mode"]),
                   project=config["wandb_project"], entity=config["wandb_entity"], group=config["wandb_group"],
                   tags=config["wandb_tags"].split(",") if config["wandb_tags"] else None, run_id=meta["wandb_id"],
                   resumed_step=run.step if resumed else None)


def finish(run, tracker, wall_time):
    out = {**results(run), "wall_time_s": wall_time}
    atomic_write(run.dir / "results.json", (json.dumps(out, indent=2) + "\n").encode())
    tracker.summary(out)
    if run.config["save_artifact"]:
        tracker.log_artifact(run.dir / "last.pt", f"{run.dir.name}-checkpoint")
    tracker.finish()
    tested = len(run.eval_loaders["test"].labels)  # all 10,000, or the first --subset of them
    print(f"done: final test accuracy {out['final_test_acc']:.4f} on {tested:,} test images, best "
          f"{out['best_test_acc']:.4f}, "
          f"{out['wall_time_s'] / 60:.1f} min of training; results in {run.dir}")
