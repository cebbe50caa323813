"""Reproduce Sharpness-Aware Minimization (Foret et al., ICLR 2021) on CIFAR-10/100.

    python train.py                                   # the paper's WRN-28-10 SAM run
    python train.py --config configs/resnet18_sgd.yaml --seed 1
    python train.py --epochs 200 --lr 0.1 --batch_size 128 --rho 0.05
    python train.py --resume runs/NAME                # continue a run with its own settings
    torchrun --nproc_per_node=8 train.py ...          # data parallel, per-GPU ascent

Settings: engine/config.py (every default, with its source) -> configs/*.yaml -> flags (--help).
A run writes <out-dir>/<name>/: config.yaml, metrics.jsonl, last.pt, results.json; and to W&B.

Reading order: main() -> prepare(), which does everything that can fail on bad input and writes
nothing -> train(), whose loop is one epoch: train_epoch() (SAM's two passes are run.training.step,
engine/step.py), evaluate(), save_checkpoint().
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from analysis.batches import training_batches
from analysis.hessian import HessianOperator, power_iteration
from data import DataError, build_loaders, load_cifar
from data.cifar import resolve_data_dir
from engine import checkpoint
from engine.bootstrap import label_predictor
from engine.config import (EXPERIMENT, SETTINGS, ConfigError, default_name, defaults, loader_kind, m_sharpness_error,
                           parse_config, validate)
from engine.distributed import Dist, all_reduce_sum, average_buffers, init_distributed, replica_digests
from engine.step import Runtime, Training, build_training, group_count, resolve_runtime
from engine.tracker import Tracker, Window, has_wandb_credentials, new_run_id, wandb_mode

REPO = Path(__file__).resolve().parent


@dataclass
class Run:
    """What prepare() resolved and train() runs; the counters move as it trains."""
    config: dict
    dir: Path
    dist: Dist
    runtime: Runtime
    training: Training
    train_loader: object
    eval_loaders: dict
    data_fingerprint: dict
    wandb_id: str
    epoch: int = 0                  # epochs completed
    step: int = 0                   # optimisation steps completed
    best: dict = field(default_factory=dict)
    wall_time: float = 0.0          # seconds of training before this process started
    changes: list = field(default_factory=list)  # settings changed on resume, and when
    last_metrics: dict = field(default_factory=dict)
    saved_epoch: int = None         # epoch of the checkpoint on disk, if any
    restarted: bool = False         # an earlier attempt stopped before its first checkpoint
    relabelled: dict = None         # bootstrap: where the training labels came from
    sharpness_batch: tuple = None   # --sharpness-every: the fixed batch lambda_max is measured on
    meta: dict = None               # run_metadata() as this process started: code, versions, data


def main(argv=None):
    try:
        run = prepare(parse_config(argv))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if run is None:
        return 0
    try:
        return train(run)
    except OSError as e:  # a full disk, a folder made read-only mid-run
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: writing the run failed: {e.strerror or e}{where}; {saved_note(run)}; free space or fix "
              f"the folder, then continue with: {resume_command(run)}", file=sys.stderr)
        return 1


# ---- preparation: everything that can fail on bad input, before anything is written ----------

def prepare(parsed):
    """-> Run, or None when the run asked for is already finished."""
    config, run_dir, state, earlier, changes = resolve_run(parsed)
    runtime = resolve_runtime(config, int(os.environ.get("LOCAL_RANK", "0")))
    dist = init_distributed(runtime.device.type)
    if config["batch_size"] % dist.world_size:
        raise ConfigError(f"batch size {config['batch_size']} does not split evenly over {dist.world_size} "
                          f"processes; use a multiple of {dist.world_size}")
    check_combinations(config, runtime, dist.world_size)
    if dist.main and wandb_mode(config["wandb_mode"]) == "online" and not has_wandb_credentials():
        raise ConfigError("W&B online mode needs credentials and we never prompt: run `wandb login` or set "
                          "WANDB_API_KEY, or use --wandb-mode offline")
    if state is not None and state["epoch"] >= config["epochs"] and (run_dir / "results.json").exists():
        if dist.main:
            print(f"run {run_dir} is finished ({state['epoch']} of {config['epochs']} epochs); nothing to do. "
                  f"Results: {run_dir / 'results.json'}")
        return None
    check_writable(run_dir)

    config["data_dir"] = str(resolve_data_dir(config["data_dir"]))  # record the folder actually used
    data = load_cifar(config["dataset"], config["data_dir"], config["download"])
    relabel, relabelled = None, None
    if config["relabel_from"]:
        relabel, relabelled = label_predictor(config["relabel_from"], config, runtime)
    try:
        train_loader, eval_loaders = build_loaders(
            data, augment=config["augment"], batch_size=config["batch_size"], device=runtime.device,
            seed=config["seed"], loader=loader_kind(config), workers=config["workers"],
            padding_mode=config["padding_mode"], val_split=config["val_split"], label_noise=config["label_noise"],
            subset=config["subset"], eval_batch_size=config["eval_batch_size"], rank=dist.rank,
            world_size=dist.world_size, channels_last=runtime.channels_last,
            autoaugment_policy=config["autoaugment_policy"], cutout_placement=config["cutout_placement"],
            noise_rule=config["label_noise_rule"], mixup_alpha=config["mixup_alpha"], relabel=relabel)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    torch.manual_seed(config["seed"])
    if runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    steps_per_epoch = len(train_loader)
    training = build_training(config, data.num_classes, runtime, config["epochs"] * steps_per_epoch,
                              distributed=dist.enabled, world_size=dist.world_size)
    run = Run(config, run_dir, dist, runtime, training, train_loader, eval_loaders, data.fingerprint,
              wandb_id=(earlier or {}).get("meta", {}).get("wandb_id") or new_run_id(), restarted=bool(earlier),
              relabelled=relabelled)
    if state is not None:
        restore(run, state, changes, steps_per_epoch)
    if config["sharpness_every"] and dist.main:
        run.sharpness_batch = training_batches(data, config, 1, min(config["batch_size"], len(train_loader.labels)),
                                               device=runtime.device, channels_last=runtime.channels_last)[0]
    return run


def resolve_run(parsed):
    """The run folder and, on --resume, its checkpoint, with the run's own settings: what was saved,
    changed only by what the user gave explicitly, and only with --allow-changes when that changes
    the experiment. -> (config, run folder, checkpoint or None, config.yaml found there or None,
    {setting: (saved, new)})."""
    config = parsed.config
    if parsed.resume in (None, "auto"):
        run_dir = Path(config["out_dir"]) / (config["name"] or default_name(config))
        path = run_dir / "last.pt"
    else:
        path = checkpoint.find(parsed.resume)
        run_dir = path.parent
    earlier = read_run_config(run_dir)
    if parsed.resume is None:
        if path.exists():
            raise ConfigError(f"run folder {run_dir} already holds a run; pass --resume to continue it "
                              f"or --name for a new run")
        if earlier and experiment_changes(earlier["config"], config):
            raise ConfigError(f"run folder {run_dir} holds an unfinished attempt of a different experiment "
                              f"({describe(experiment_changes(earlier['config'], config))}); use another --name")
        return config, run_dir, None, earlier, {}

    if path.is_file():
        try:
            state = checkpoint.load(path)
        except ValueError as e:
            raise ConfigError(f"--resume: {e}; pass the last.pt of a run folder") from None
        saved = state["config"]
    elif earlier is not None:  # stopped before its first checkpoint: start it over with its settings
        state, saved = None, earlier["config"]
    else:
        raise ConfigError(f"--resume: no checkpoint at {path}; check --out-dir/--name or pass the checkpoint path")
    config = {**defaults(), **{k: v for k, v in saved.items() if k in SETTINGS},
              **parsed.given, "out_dir": str(run_dir.parent), "name": run_dir.name}
    validate(config, parsed.flags)
    changes = experiment_changes(saved, config)
    if changes and not parsed.allow_changes:
        raise ConfigError(f"resuming {run_dir} with settings that change the experiment: {describe(changes)}; "
                          f"a resumed run continues the same experiment: drop them, or pass --allow-changes to "
                          f"continue with them (recorded in config.yaml and W&B)")
    return config, run_dir, state, earlier, changes


def experiment_changes(saved, config):
    return {k: (saved.get(k), config[k]) for k in EXPERIMENT if saved.get(k, SETTINGS[k].default) != config[k]}


def describe(changes):
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def read_run_config(run_dir):
    """The config.yaml a run folder holds (written when the run started), or None."""
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(saved, dict):
        return None
    meta = saved.pop("meta", {}) or {}
    return {"config": saved, "meta": meta}


def check_combinations(config, runtime, world_size):
    """Settings that only the resolved device, precision or process count can rule out."""
    m = config["m_sharpness"]
    if m and (config["batch_size"] // world_size) % m:
        raise ConfigError(m_sharpness_error(config, world_size))
    if group_count(config, world_size) > 1:
        if runtime.precision == "fp16":
            raise ConfigError("--m-sharpness does not support --precision fp16 (its GradScaler); use bf16 or fp32")
        if config["compile"] != "off":
            raise ConfigError("--compile does not apply to the per-group step of --m-sharpness yet (it runs "
                              "eagerly); drop --compile")
    if config["sam_second_order"]:
        for problem, fix in ((group_count(config, world_size) > 1, "--m-sharpness 0 (or the whole batch)"),
                             (runtime.precision == "fp16", "--precision bf16 or fp32"),
                             (config["compile"] != "off", "--compile off (compiled graphs have no double backward)"),
                             (world_size > 1, "one process (it needs each replica's own second gradient)")):
            if problem:
                raise ConfigError(f"--sam-second-order does not combine with this setting; use {fix}")


def check_writable(run_dir):
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise ConfigError(f"cannot create or write the run folder {run_dir}: {existing} is not a writable folder; "
                          f"choose another --out-dir")


def restore(run, state, changes, steps_per_epoch):
    """Load a checkpoint into the run; a changed length rebuilds the schedule for the new length."""
    t = run.training
    try:
        t.model.load_state_dict(state["model"])
        t.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:160]
        raise ConfigError(f"--resume: the checkpoint does not fit this run's model/optimizer "
                          f"({state['config'].get('model')} saved, {run.config['model']} built): {first}") from None
    t.schedule.load_state_dict(state["schedule"])
    if t.scaler and state.get("scaler"):
        t.scaler.load_state_dict(state["scaler"])
    checkpoint.set_rng_state(state["rng"])
    run.epoch, run.step, run.best = state["epoch"], state["step"], state["best"]
    run.wall_time, run.saved_epoch = state.get("wall_time", 0.0), state["epoch"]
    run.last_metrics = state.get("metrics", {})
    run.wandb_id = state.get("wandb_id") or run.wandb_id
    run.changes = list(state.get("changes", []))
    if changes:
        run.changes.append({"step": run.step, "epoch": run.epoch,
                            "changes": {k: [old, new] for k, (old, new) in changes.items()}})
        if run.dist.main:
            print(f"warning: continuing {run.dir} at step {run.step} with changed settings: {describe(changes)} "
                  f"(recorded in config.yaml and W&B)", file=sys.stderr)
    if "epochs" in changes:
        old_lr = t.optimizer.param_groups[0]["lr"]
        t.schedule.set_length(run.config["epochs"] * steps_per_epoch)  # the cosine at this step, new length
        if run.dist.main:
            print(f"warning: the cosine schedule now spans {run.config['epochs']} epochs: the learning rate at "
                  f"step {run.step} moves from {old_lr:.6g} to {t.optimizer.param_groups[0]['lr']:.6g}",
                  file=sys.stderr)


# ---- training -----------------------------------------------------------------------------------

def train(run):
    config, dist = run.config, run.dist
    tracker = start_tracking(run) if dist.main else None
    start = time.perf_counter()
    epoch = first = run.epoch  # run.epoch moves with each checkpoint
    try:
        for epoch in range(first, config["epochs"]):
            epoch_start = time.perf_counter()
            metrics = train_epoch(run, epoch, tracker, epoch == first)  # SAM's two passes: run.training.step
            train_time = time.perf_counter() - epoch_start
            metrics.update(evaluate(run))                       # test (and val) loss and accuracy
            if config["sharpness_every"] and (epoch + 1) % config["sharpness_every"] == 0:
                metrics.update(sharpness(run))
            if dist.main:
                elapsed = time.perf_counter() - start
                eta = elapsed / (epoch + 1 - first) * (config["epochs"] - epoch - 1)
                metrics.update(epoch_time_s=time.perf_counter() - epoch_start, train_time_s=train_time)
                if run.runtime.device.type == "cuda":
                    metrics["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(run.runtime.device) / 2**30
                tracker.log(metrics, run.step)
                print(epoch_line(epoch, config["epochs"], metrics, eta), flush=True)
            save_checkpoint(run, epoch + 1, metrics, run.wall_time + time.perf_counter() - start)
    except KeyboardInterrupt:
        if dist.main:
            print(f"\ninterrupted in epoch {epoch + 1}, at step {run.step}; {saved_note(run)}. Continue with: "
                  f"{resume_command(run)}", file=sys.stderr)
            tracker.finish(exit_code=130)
        return 130

    if dist.enabled:
        digests = replica_digests(run.training.model, dist)
        torch.distributed.destroy_process_group()
        if len(set(digests)) > 1:
            print(f"error: replicas diverged (parameter SHA-256 per rank: {digests})", file=sys.stderr)
            return 1
        if dist.main:
            print(f"replicas identical: {dist.world_size} ranks, parameter SHA-256 {digests[0][:16]}")
    if dist.main:
        finish(run, tracker, run.wall_time + time.perf_counter() - start)
    return 0


def train_epoch(run, epoch, tracker, first=False):
    """One pass over the training set. Metrics stay on the device and reach the host every
    --log-every steps and at the end of the epoch. `first`: this process's first epoch."""
    config, step_fn, device = run.config, run.training.step, run.runtime.device
    run.train_loader.set_epoch(epoch)
    window, epoch_sums = Window(device), torch.zeros(3, dtype=torch.float64, device=device)
    images_seen, batches = 0, len(run.train_loader)
    bar = tqdm(run.train_loader, desc=f"epoch {epoch + 1}/{config['epochs']}", leave=False,
               disable=not run.dist.main, dynamic_ncols=True)
    for i, (images, labels) in enumerate(bar):
        step_start = time.perf_counter()
        loss, correct, ascent_norm = step_fn(images, labels)   # engine/step.py: SAM's two passes, or SGD
        run.training.schedule.step()
        run.step += 1
        window.add(run.step, loss, correct, ascent_norm, len(labels))
        if run.step % config["log_every"] == 0 or i == batches - 1:
            epoch_sums += window.sums
            images_seen += window.images
            log_window(run, window, epoch, tracker, bar)
        if i == 1 and first and device.type == "cpu" and run.dist.main:
            warn_cpu_duration(run, time.perf_counter() - step_start, batches)
    bar.close()
    average_buffers(run.training.model, run.dist)  # replicas' BatchNorm statistics, as the official eval
    loss_sum, correct_sum, _ = all_reduce_sum(epoch_sums, run.dist).tolist()
    n = images_seen * run.dist.world_size
    return {"epoch": epoch + 1, "train/loss": loss_sum / n, "train/acc": correct_sum / n,
            "train/error": 1 - correct_sum / n}


def log_window(run, window, epoch, tracker, bar):
    world = run.dist.world_size
    sums = all_reduce_sum(window.sums.clone(), run.dist).tolist()  # the loop's one host sync
    stop_if_not_finite(run, window.first_bad, tracker)
    images = window.images * world
    metrics = {"train/step_loss": sums[0] / images, "train/step_acc": sums[1] / images,
               "lr": run.training.schedule.get_last_lr()[0],
               "images_per_s": images / (time.perf_counter() - window.start), "epoch": epoch + 1}
    if run.config["optimizer"] == "sam":
        metrics["sam/ascent_grad_norm"] = sums[2] / (window.steps * world)
    bar.set_postfix(loss=f"{metrics['train/step_loss']:.3f}", acc=f"{metrics['train/step_acc']:.3f}",
                    lr=f"{metrics['lr']:.4f}", img_s=f"{metrics['images_per_s']:.0f}")
    if tracker:
        tracker.log(metrics, run.step)
    window.reset()


@torch.no_grad()
def evaluate(run):
    """Loss and accuracy on each evaluation set, on rank 0 (others wait); {} elsewhere."""
    model, step, results = run.training.model, run.training.step, {}
    forward = model if run.dist.enabled else step.forward  # DDP's own forward would sync
    if run.dist.main:
        model.eval()
        for name, loader in run.eval_loaders.items():
            total = torch.zeros(2, dtype=torch.float64, device=run.runtime.device)
            for images, labels in loader:
                step.mark()  # a new CUDA-graph step per batch under --compile reduce-overhead
                with run.runtime.autocast():
                    logits = forward(images)
                total += torch.stack([torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"),
                                      (logits.argmax(1) == labels).sum()])
            loss, correct = (total / len(loader.labels)).tolist()
            results.update({f"{name}/loss": loss, f"{name}/acc": correct, f"{name}/error": 1 - correct})
        model.train()
    if run.dist.enabled:
        torch.distributed.barrier()
    return results


def sharpness(run):
    """lambda_max of the training loss's Hessian on one fixed batch, on rank 0 (others wait)."""
    results = {}
    if run.dist.main:
        start, model = time.perf_counter(), run.training.model
        model.eval()  # BatchNorm's running statistics: a fixed function of the weights
        operator = HessianOperator(lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]),
                                   [p for p in model.parameters() if p.requires_grad], [run.sharpness_batch])
        results["sharpness/lambda_max"] = power_iteration(operator, iters=20)
        model.train()
        results["sharpness/time_s"] = time.perf_counter() - start
    if run.dist.enabled:
        torch.distributed.barrier()
    return results


def save_checkpoint(run, epoch, metrics, wall_time):
    """Atomically, and only a model that is finite (weights, BatchNorm statistics, evaluation loss)."""
    finite = checkpoint.is_finite(run.training.model) and all(
        v == v and abs(v) != float("inf") for k, v in metrics.items() if k.endswith("/loss"))
    if run.dist.enabled:  # rank 0 evaluated: its verdict holds for every rank
        verdict = torch.tensor([int(finite)], device=run.runtime.device)
        torch.distributed.broadcast(verdict, src=0)
        finite = bool(verdict.item())
    if not finite:
        stop(run, f"the model is not finite after epoch {epoch} (weights, BatchNorm statistics or evaluation "
                  f"loss); {saved_note(run)}. {fix_hint(run)}", None)
    for name in run.eval_loaders:
        if metrics.get(f"{name}/acc", -1) > run.best.get(f"best_{name}_acc", -1):
            run.best[f"best_{name}_acc"] = metrics[f"{name}/acc"]
    run.epoch, run.last_metrics = epoch, metrics
    if run.dist.main:
        t = run.training
        checkpoint.save_atomic({
            "model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
            "schedule": t.schedule.state_dict(), "scaler": t.scaler.state_dict() if t.scaler else None,
            "rng": checkpoint.rng_state(), "epoch": epoch, "step": run.step, "best": run.best,
            "wall_time": wall_time, "metrics": metrics, "wandb_id": run.wandb_id, "changes": run.changes,
            "config": run.config}, run.dir / "last.pt")
        run.saved_epoch = epoch
    if run.dist.enabled:
        torch.distributed.barrier()


def stop_if_not_finite(run, first_bad, tracker):
    bad = first_bad.clone()
    if run.dist.enabled:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if int(bad) >= 0:
        stop(run, f"the training loss became non-finite at step {int(bad)}; {saved_note(run)}. {fix_hint(run)}",
             tracker)


def stop(run, message, tracker):
    if run.dist.main:
        print(f"error: {message}", file=sys.stderr)
        if tracker:
            tracker.finish(exit_code=1)
    sys.exit(1)


def saved_note(run):
    if run.saved_epoch is None:
        return "no epoch was checkpointed, so nothing was saved"
    return f"the last good checkpoint {run.dir / 'last.pt'} (epoch {run.saved_epoch}) is intact"


def fix_hint(run):
    fixes = "lower --lr or --rho" + (", or use --precision fp32" if run.runtime.precision != "fp32" else "")
    return f"To fix: {fixes}, and start a new run (or --resume with --allow-changes)"


def resume_command(run):
    return f"python train.py --resume {run.dir}"


def warn_cpu_duration(run, step_seconds, steps_per_epoch):
    """On the CPU, say plainly what the whole run would take (measured on the second step)."""
    total = step_seconds * steps_per_epoch * (run.config["epochs"] - run.epoch)
    if total > 3600:
        print(f"\nnote: on this CPU a step takes {step_seconds:.1f} s, so the remaining {run.config['epochs'] - run.epoch}"
              f" epochs would take about {format_duration(total)}. For a smoke test in minutes try: python train.py "
              f"--config configs/resnet18_sam.yaml --subset 2048 --epochs 2 --batch-size 64 --wandb-mode disabled",
              file=sys.stderr)


def format_duration(seconds):
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min"


def epoch_line(epoch, epochs, m, eta):
    val = f"  val acc {m['val/acc']:.4f}" if "val/acc" in m else ""
    return (f"epoch {epoch + 1:3d}/{epochs}  train loss {m['train/loss']:.4f} acc {m['train/acc']:.4f}  "
            f"test loss {m['test/loss']:.4f} acc {m['test/acc']:.4f}{val}  {m['epoch_time_s']:.1f}s  "
            f"ETA {format_duration(eta)}")


# ---- bookkeeping ----------------------------------------------------------------------------------

def start_tracking(run):
    config, meta = run.config, run_metadata(run)
    run.meta = meta
    if run.step or run.restarted:
        print(f"resuming {run.dir} from epoch {run.epoch}, step {run.step}"
              + (" (the earlier attempt stopped before its first checkpoint)" if not run.step else ""))
    print(yaml.safe_dump({"config": config, **meta}, sort_keys=False).rstrip())
    run.dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({**config, "meta": meta}, sort_keys=False)
    checkpoint.atomic_write(run.dir / "config.yaml", lambda f: f.write(text.encode()))
    return Tracker(run.dir, {**config, "meta": meta}, mode=wandb_mode(config["wandb_mode"]),
                   project=config["wandb_project"], entity=config["wandb_entity"], group=config["wandb_group"],
                   tags=config["wandb_tags"].split(",") if config["wandb_tags"] else None, run_id=run.wandb_id,
                   resumed_step=run.step if (run.step or run.restarted) else None)


def finish(run, tracker, wall_time):
    last, config = run.last_metrics, run.config
    results = {"final_test_acc": last.get("test/acc"),
               "final_test_error": 1 - last["test/acc"] if "test/acc" in last else None,
               "best_test_acc": run.best.get("best_test_acc"),
               "best_test_error": 1 - run.best["best_test_acc"] if "best_test_acc" in run.best else None,
               "epochs": run.epoch, "steps": run.step, "wall_time_s": wall_time,
               **{k: config[k] for k in ("model", "dataset", "augment", "optimizer", "rho", "seed")},
               "settings": {k: config[k] for k in EXPERIMENT}, "changes": run.changes,
               "git_commit": run.meta["git_commit"], "dataset_md5": run.data_fingerprint["md5"],
               "dataset_official": run.data_fingerprint["official"]}
    if "val/acc" in last:
        results.update(final_val_acc=last["val/acc"], best_val_acc=run.best.get("best_val_acc"))
    text = json.dumps(results, indent=2) + "\n"
    checkpoint.atomic_write(run.dir / "results.json", lambda f: f.write(text.encode()))
    tracker.summary(results)
    if config["save_artifact"]:
        tracker.log_artifact(run.dir / "last.pt", f"{run.dir.name}-checkpoint")
    tracker.finish()
    print(f"done: final test accuracy {results['final_test_acc']:.4f}, best {results['best_test_acc']:.4f}, "
          f"{wall_time / 60:.1f} min of training; results in {run.dir}")


def git(*args):
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run_metadata(run):
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
        "dataset_official": run.data_fingerprint["official"], "dataset_md5": run.data_fingerprint["md5"],
        "wandb_id": run.wandb_id, "changes": run.changes,
        **({"relabelled_from": run.relabelled} if run.relabelled else {}),
    }


if __name__ == "__main__":
    sys.exit(main())
