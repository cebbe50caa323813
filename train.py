"""Reproduce Sharpness-Aware Minimization (Foret et al., ICLR 2021) on CIFAR-10/100.

    python train.py                                   # the paper's WRN-28-10 SAM run (the defaults)
    python train.py --config configs/resnet18_sgd.yaml --seed 1
    python train.py --epochs 200 --lr 0.1 --batch_size 128 --rho 0.05
    python train.py --resume runs/NAME                # continue a run with its own settings
    torchrun --nproc_per_node=8 train.py ...          # data parallel, per-GPU ascent

Settings: engine/config.py (every default, with its source; docs/settings.md) -> configs/*.yaml -> flags.
A run writes <out-dir>/<name>/: config.yaml, metrics.jsonl, last.pt, results.json; and to W&B.

Reading order: main() -> prepare(), which does everything that can fail on bad input and writes
nothing -> train(), whose loop is one epoch: train_epoch() (SAM's two passes are run.training.step,
engine/step.py), evaluate(), save_checkpoint(). A stop signal (SLURM's SIGTERM, Ctrl-C) ends the step
in flight, checkpoints that step and exits (engine/stopping.py); --resume continues from that step.
"""

import json
import os
import shutil
import signal
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
from data.cifar import check_files, resolve_data_dir
from engine import checkpoint
from engine.bootstrap import label_predictor
from engine.config import (EXPERIMENT, SETTINGS, ConfigError, default_name, defaults, loader_kind, m_sharpness_error,
                           parse_config, validate)
from engine.distributed import Dist, all_reduce_sum, averaged_state, average_buffers, init_distributed, \
    replica_digests
from engine.evaluation import evaluate_loader
from engine.step import Runtime, Training, build_training, group_count, resolve_runtime, takes_sam_step
from engine.stopping import Stopper, exit_code
from engine.tracker import Tracker, Window, has_wandb_credentials, new_run_id, wandb_mode

REPO = Path(__file__).resolve().parent
# What --resume --allow-changes may change: the optimizer and the step read them from the settings, and
# tests/test_resume.py shows each takes effect from the resume step on. Anything else starts a new run.
CHANGEABLE = ("epochs", "lr", "rho", "weight_decay", "grad_clip", "label_smoothing")


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
    num_classes: int
    wandb_id: str
    epoch: int = 0                  # epochs completed
    batch: int = 0                  # batches done of the epoch in progress (a run stopped mid-epoch)
    step: int = 0                   # optimisation steps completed
    sam_steps: int = 0              # of which SAM steps (the rest: SGD steps of late-phase or randomized SAM)
    best: dict = field(default_factory=dict)
    wall_time: float = 0.0          # seconds of training before this process started
    changes: list = field(default_factory=list)  # settings changed on resume, and when
    last_metrics: dict = field(default_factory=dict)
    saved_epoch: int = None         # epoch of the checkpoint on disk, if any
    restarted: bool = False         # an earlier attempt stopped before its first checkpoint
    relabelled: dict = None         # bootstrap: where the training labels came from
    sharpness_batch: tuple = None   # --sharpness-every: the fixed batch lambda_max is measured on
    meta: dict = None               # run_metadata() as this process started: code, versions, data
    original_md5: dict = None       # the data files' checksums when the run first started
    partial: dict = None            # the epoch in progress: device sums, images and SAM steps so far
    window: Window = None           # step metrics since the last log
    lock: checkpoint.RunLock = None
    started: float = 0.0            # perf_counter() when this process started training


def main(argv=None):
    run = None
    try:
        parsed = parse_config(argv)
        if parsed.check_all:
            return check_all(parsed.check_all)
        if parsed.check:
            print(f"ok: {check(parsed)}")
            return 0
        run = prepare(parsed)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted while starting: no step was taken", file=sys.stderr)
        return exit_code(signal.SIGINT)
    if run is None:
        return 0
    try:
        return train(run)
    except OSError as e:  # a full disk, a folder made read-only mid-run
        print(f"error: {write_failure(run, e)}", file=sys.stderr)
        return 1
    finally:
        run.lock and run.lock.release()


# ---- preparation: everything that can fail on bad input, before anything is written ----------

@dataclass
class Resolved:
    """A command resolved without its data or model: what --check reports and prepare() builds on."""
    config: dict
    run_dir: Path
    state: dict            # the checkpoint on --resume, else None
    earlier: dict          # config.yaml of an earlier attempt, else None
    changes: dict          # {setting: (saved, new)}
    runtime: Runtime
    finished: bool
    stamp: tuple           # last.pt's (mtime, size) when read: a second process must not slip in


def resolve(parsed):
    config, run_dir, state, earlier, changes, stamp = resolve_run(parsed)
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    runtime = resolve_runtime(config, int(os.environ.get("LOCAL_RANK", "0")))
    if config["batch_size"] % world_size:
        raise ConfigError(f"batch size {config['batch_size']} does not split evenly over {world_size} "
                          f"processes; use a multiple of {world_size}")
    check_combinations(config, runtime, world_size)
    if rank == 0 and wandb_mode(config["wandb_mode"]) == "online" and not has_wandb_credentials():
        raise ConfigError("W&B online mode needs credentials and we never prompt: run `wandb login` or set "
                          "WANDB_API_KEY, or use --wandb-mode offline")
    finished = state is not None and state["epoch"] >= config["epochs"] and (run_dir / "results.json").exists()
    if finished and changes:
        raise ConfigError(f"run {run_dir} is finished ({state['epoch']} epochs), so {describe(changes)} would change "
                          f"nothing; give a longer --epochs to train on with it, or drop it")
    if not finished:
        check_writable(run_dir)
        if rank == 0 and checkpoint.holder(run_dir):
            raise ConfigError(checkpoint.in_use(run_dir))
    return Resolved(config, run_dir, state, earlier, changes, runtime, finished, stamp)


def check(parsed):
    """--check: the command's settings, run folder, device and data files, without training -> a line."""
    r = resolve(parsed)
    if r.finished:
        return f"{r.run_dir} is finished; nothing to do"
    check_files(r.config["dataset"], r.config["data_dir"], r.config["download"])
    if r.config["relabel_from"]:
        relabel_source(r.config)
    return f"{r.run_dir} ({'resumes at step ' + str(r.state['step']) if r.state else 'a new run'})"


def check_all(path):
    """--check-all FILE: --check for each train.py command line in FILE; the first bad one is the error."""
    import shlex
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--check-all: cannot read {path} ({e}); pass a file of train.py command lines")
    for n, line in enumerate(lines, 1):
        words = shlex.split(line)
        label = words[words.index("--name") + 1] if "--name" in words[:-1] else f"line {n} of {path}"
        try:
            check(parse_config(words))
        except (ConfigError, DataError) as e:
            raise ConfigError(f"{label}: {e}") from None
    print(f"ok: {len(lines)} command(s)")
    return 0


def prepare(parsed):
    """-> Run, or None when the run asked for is already finished."""
    r = resolve(parsed)
    config, run_dir, state, runtime = r.config, r.run_dir, r.state, r.runtime
    dist = init_distributed(runtime.device.type)
    if r.finished:
        if dist.main:
            print(f"run {run_dir} is finished ({state['epoch']} of {config['epochs']} epochs); nothing to do. "
                  f"Results: {run_dir / 'results.json'}")
        return None

    config["data_dir"] = str(resolve_data_dir(config["data_dir"]))  # record the folder actually used
    data = load_cifar(config["dataset"], config["data_dir"], config["download"])
    earlier = r.earlier or {}
    recorded = (state or {}).get("data_md5") or (earlier.get("meta", {}).get("dataset_md5") if state else None)
    changes = {**r.changes, **data_changes(recorded, data.fingerprint, parsed.allow_changes, config["data_dir"])}
    relabel, relabelled = None, None
    if config["relabel_from"]:
        relabel, relabelled = label_predictor(config["relabel_from"], config, runtime)
    train_loader, eval_loaders = data_loaders(config, data, runtime, dist, relabel)
    torch.manual_seed(config["seed"])
    if runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    steps_per_epoch = len(train_loader)
    training = build_training(config, data.num_classes, runtime, config["epochs"] * steps_per_epoch,
                              distributed=dist.enabled, world_size=dist.world_size)
    run = Run(config, run_dir, dist, runtime, training, train_loader, eval_loaders, data.fingerprint,
              data.num_classes, wandb_id=earlier.get("meta", {}).get("wandb_id") or new_run_id(),
              restarted=bool(r.earlier), relabelled=relabelled, window=Window(runtime.device),
              original_md5=earlier.get("meta", {}).get("dataset_md5") if state else None)
    if state is not None:
        restore(run, state, changes)
    if config["sharpness_every"] and dist.main:
        run.sharpness_batch = training_batches(data, config, 1, min(config["batch_size"], len(train_loader.labels)),
                                               device=runtime.device, channels_last=runtime.channels_last)[0]
    if dist.main:
        run.lock = checkpoint.RunLock(run_dir).acquire()
        if stamp(run_dir / "last.pt") != r.stamp:
            run.lock.release()
            raise ConfigError(f"{run_dir / 'last.pt'} changed while this process started (another process is "
                              f"training this run); run the command again to continue from it")
        data.warn()  # files that are not the official release: said once everything else is fine
    return run


def data_loaders(config, data, runtime, dist=Dist(), relabel=None):
    """A run's training loader and evaluation loaders, from its settings (train.py and evaluate.py)."""
    try:
        return build_loaders(
            data, augment=config["augment"], batch_size=config["batch_size"], device=runtime.device,
            seed=config["seed"], loader=loader_kind(config), workers=config["workers"],
            padding_mode=config["padding_mode"], val_split=config["val_split"], label_noise=config["label_noise"],
            subset=config["subset"], eval_batch_size=config["eval_batch_size"], rank=dist.rank,
            world_size=dist.world_size, channels_last=runtime.channels_last,
            autoaugment_policy=config["autoaugment_policy"], cutout_placement=config["cutout_placement"],
            noise_rule=config["label_noise_rule"], mixup_alpha=config["mixup_alpha"], relabel=relabel)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def stamp(path):
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


def resolve_run(parsed):
    """The run folder and, on --resume, its checkpoint, with the run's own settings: what was saved,
    changed only by what the user gave explicitly, and only with --allow-changes. -> (config, run
    folder, checkpoint or None, config.yaml found there or None, {setting: (saved, new)}, stamp)."""
    config = parsed.config
    if parsed.resume in (None, "auto"):
        run_dir = Path(config["out_dir"]) / (config["name"] or default_name(config))
        path = run_dir / "last.pt"
    else:
        path = checkpoint.find(parsed.resume)
        run_dir = path.parent
    last = run_dir / "last.pt"
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path} is not a file, so it cannot be this run's checkpoint; move it away and run again")
    earlier = read_run_config(run_dir)
    if parsed.resume is None:
        if path.exists():
            raise ConfigError(f"run folder {run_dir} already holds a run; pass --resume to continue it "
                              f"or --name for a new run")
        if earlier and experiment_changes(earlier["config"], config):
            raise ConfigError(f"run folder {run_dir} holds an unfinished attempt of a different experiment "
                              f"({describe(experiment_changes(earlier['config'], config))}); use another --name")
        return config, run_dir, None, earlier, {}, stamp(last)

    if path.is_file():
        try:
            state = checkpoint.load(path)
        except ValueError as e:
            raise ConfigError(f"--resume: {e}; pass the last.pt of a run folder") from None
        saved = state["config"]
    elif earlier is not None:  # stopped before its first checkpoint: start it over with its settings
        state, saved = None, earlier["config"]
    else:
        raise ConfigError(f"--resume: no checkpoint at {path}; check --out-dir/--name or pass the run folder "
                          f"(its name changes with the settings: see python train.py --check)")
    config = {**defaults(), **{k: v for k, v in saved.items() if k in SETTINGS},
              **parsed.given, "out_dir": str(run_dir.parent), "name": run_dir.name}
    validate(config, parsed.flags)
    changes = experiment_changes(saved, config)
    fixed = {k: v for k, v in changes.items() if k not in CHANGEABLE}
    if fixed:
        raise ConfigError(f"resuming {run_dir} with settings that change the experiment: {describe(fixed)}; a "
                          f"resumed run continues the same experiment (only {', '.join(CHANGEABLE)} may change, "
                          f"with --allow-changes): drop them, or start a new run")
    if changes and not parsed.allow_changes:
        raise ConfigError(f"resuming {run_dir} with changed settings: {describe(changes)}; pass --allow-changes "
                          f"to continue with them (recorded in config.yaml, results.json and W&B), or drop them")
    if state is not None and config["epochs"] <= state["epoch"] and "epochs" in changes:
        raise ConfigError(f"--epochs {config['epochs']}: {run_dir} has trained {state['epoch']} epochs already; "
                          f"give more than {state['epoch']}")
    return config, run_dir, state, earlier, changes, stamp(last)


def data_changes(recorded, fingerprint, allow_changes, folder):
    """A resumed run trains on the data it trained on so far (`recorded`: the checksums its checkpoint
    holds): other files are refused, or with --allow-changes recorded as a change."""
    if recorded is None or recorded == fingerprint["md5"]:
        return {}
    differ = sorted(f for f in {*recorded, *fingerprint["md5"]} if recorded.get(f) != fingerprint["md5"].get(f))
    if not allow_changes:
        raise ConfigError(f"the data in {folder} is not what this run trained on ({', '.join(differ)} differ from "
                          f"the checksums in its checkpoint); point --data-dir at the run's data, or pass "
                          f"--allow-changes to continue on this data (recorded)")
    return {"data files": ({f: recorded.get(f) for f in differ}, {f: fingerprint["md5"].get(f) for f in differ})}


def experiment_changes(saved, config):
    return {k: (saved.get(k, SETTINGS[k].default), config[k]) for k in EXPERIMENT
            if saved.get(k, SETTINGS[k].default) != config[k]}


def describe(changes):
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def read_run_config(run_dir):
    """The config.yaml a run folder holds (written when the run started), or None."""
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
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
                              "eagerly); drop --compile, or use --m-sharpness 0")
    if config["sam_second_order"]:
        for problem, fix in ((group_count(config, world_size) > 1, "--m-sharpness 0 (or the whole batch)"),
                             (runtime.precision == "fp16", "--precision bf16 or fp32"),
                             (config["compile"] != "off", "--compile off (compiled graphs have no double backward)"),
                             (world_size > 1, "one process (it needs each replica's own second gradient)")):
            if problem:
                raise ConfigError(f"--sam-second-order does not combine with this setting; use {fix}")


def check_writable(run_dir):
    for path in (run_dir, *run_dir.parents):
        if path.is_symlink() and not path.exists():
            raise ConfigError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; create "
                              f"it or choose another --out-dir")
        if path.exists():
            break
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise ConfigError(f"cannot create or write the run folder {run_dir}: {existing} is not a writable folder; "
                          f"choose another --out-dir")


def relabel_source(config):
    """--relabel-from names a finished run's checkpoint on the same data set (read, not loaded)."""
    try:
        source = checkpoint.load(checkpoint.find(config["relabel_from"]))["config"]
    except ValueError as e:
        raise ConfigError(f"--relabel-from: {e}; pass a finished run's folder or its last.pt") from None
    if source.get("dataset") != config["dataset"]:
        raise ConfigError(f"--relabel-from {config['relabel_from']}: that model was trained on {source.get('dataset')}"
                          f", this run is on {config['dataset']}; pass a run on the same data set")


def restore(run, state, changes):
    """Load a checkpoint into the run. The checkpoint gives the state (weights, momentum, step, RNG, the
    position in the epoch); this run's settings give every hyperparameter, so a change that
    --allow-changes accepted (lr, rho, a longer schedule, ...) is what the run trains with from here."""
    t = run.training
    settings = [{k: v for k, v in group.items() if k != "params"} for group in t.optimizer.param_groups]
    base_lrs, length = list(t.schedule.base_lrs), t.schedule.total_steps
    old_lr = state["optimizer"]["param_groups"][0]["lr"]
    try:
        t.model.load_state_dict(state["model"])
        t.optimizer.load_state_dict(state["optimizer"])  # momentum buffers, and the saved group settings...
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:160]
        raise ConfigError(f"--resume: the checkpoint does not fit this run's model/optimizer "
                          f"({state['config'].get('model')} saved, {run.config['model']} built): {first}") from None
    for group, values in zip(t.optimizer.param_groups, settings):
        group.update(values)                      # ...which this run's settings replace
    t.schedule.load_state_dict(state["schedule"])  # the step count
    t.schedule.base_lrs = base_lrs
    t.schedule.set_length(length)                  # the learning rate at this step, from these settings
    if t.scaler and state.get("scaler"):
        t.scaler.load_state_dict(state["scaler"])
    checkpoint.set_rng_state(state["rng"])
    run.epoch, run.batch, run.step, run.best = state["epoch"], state.get("batch", 0), state["step"], state["best"]
    run.sam_steps = state.get("sam_steps", run.step if run.config["optimizer"] == "sam" else 0)
    run.wall_time, run.saved_epoch = state.get("wall_time", 0.0), state["epoch"]
    run.last_metrics = state.get("metrics", {})
    run.wandb_id = state.get("wandb_id") or run.wandb_id
    run.changes = list(state.get("changes", []))
    run.original_md5 = run.original_md5 or state.get("data_md5")
    if state.get("partial"):  # stopped mid-epoch: the epoch's sums so far (global: rank 0 carries them)
        run.partial = {**state["partial"], "sums": state["partial"]["sums"].to(run.runtime.device)}
        run.window.load_state_dict(state["partial"]["window"])
        if not run.dist.main:
            run.partial["sums"].zero_()
            run.window.sums.zero_()
    if changes:
        run.changes.append({"step": run.step, "epoch": run.epoch,
                            "changes": {k: [old, new] for k, (old, new) in changes.items()}})
        if run.dist.main:
            print(f"warning: continuing {run.dir} at step {run.step} with changed settings: {describe(changes)} "
                  f"(recorded in config.yaml, results.json and W&B)", file=sys.stderr)
    if ("epochs" in changes or "lr" in changes) and run.dist.main:
        print(f"warning: the cosine schedule now peaks at {run.config['lr']:g} over {run.config['epochs']} epochs: "
              f"the learning rate at step {run.step} moves from {old_lr:.6g} to "
              f"{t.optimizer.param_groups[0]['lr']:.6g}", file=sys.stderr)


# ---- training -----------------------------------------------------------------------------------

def train(run):
    config, dist = run.config, run.dist
    with Stopper(config["checkpoint_every_min"], dist.control if dist.enabled else None) as stopper:
        tracker = start_tracking(run) if dist.main else None
        if dist.main:
            project_duration(run)
        run.started = time.perf_counter()
        first, first_batch = run.epoch, run.batch
        if stopper.poll()[0]:  # a signal while starting: no step taken, nothing new to checkpoint
            return stopped(run, tracker, stopper)
        try:
            for epoch in range(first, config["epochs"]):
                epoch_start = time.perf_counter()
                metrics = train_epoch(run, epoch, tracker, stopper)  # SAM's two passes: run.training.step
                if metrics is None:
                    return stopped(run, tracker, stopper)            # a signal: that step is checkpointed
                train_time = time.perf_counter() - epoch_start
                metrics.update(evaluate(run))                        # test (and val) loss and accuracy
                if config["sharpness_every"] and (epoch + 1) % config["sharpness_every"] == 0:
                    metrics.update(sharpness(run))
                if dist.main:
                    elapsed = time.perf_counter() - run.started
                    done = epoch + 1 - first - first_batch / len(run.train_loader)  # epochs this process trained
                    eta = elapsed / max(done, 1e-9) * (config["epochs"] - epoch - 1)
                    metrics.update(epoch_time_s=time.perf_counter() - epoch_start, train_time_s=train_time)
                    if run.runtime.device.type == "cuda":
                        metrics["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(run.runtime.device) / 2**30
                    tracker.log(metrics, run.step, "epoch")
                    print(epoch_line(epoch, config["epochs"], metrics, eta), flush=True)
                save_checkpoint(run, metrics, stopper)
                if epoch + 1 < config["epochs"] and stopper.poll()[0]:  # a signal during evaluation
                    return stopped(run, tracker, stopper)
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once
            if dist.main:
                print(f"\ninterrupted in epoch {run.epoch + 1}, at step {run.step}; {saved_note(run)}. Continue "
                      f"with: {resume_command(run)}", file=sys.stderr)
                tracker.finish(exit_code=130)
            return exit_code(signal.SIGINT)

    if dist.enabled:
        digests = replica_digests(run.training.model, dist)
        torch.distributed.destroy_process_group()
        if len(set(digests)) > 1:
            print(f"error: replicas diverged (parameter SHA-256 per rank: {digests})", file=sys.stderr)
            return 1
        if dist.main:
            print(f"replicas identical: {dist.world_size} ranks, parameter SHA-256 {digests[0][:16]}")
    if dist.main:
        finish(run, tracker)
    return 0


def train_epoch(run, epoch, tracker, stopper):
    """One pass over the training set, from batch run.batch (0, or where a stopped run left off).
    Metrics stay on the device and reach the host every --log-every steps and at the end of the
    epoch. After each step, a stop signal or a due time-based checkpoint writes a checkpoint of
    that step. -> the epoch's metrics, or None when a signal stopped it."""
    config, step_fn, device = run.config, run.training.step, run.runtime.device
    batches, window = len(run.train_loader), run.window
    if run.partial is None:
        run.partial = {"sums": torch.zeros(3, dtype=torch.float64, device=device), "images": 0, "sam_steps": 0}
    run.train_loader.set_epoch(epoch, run.batch)
    bar = tqdm(run.train_loader, desc=f"epoch {epoch + 1}/{config['epochs']}", leave=False, initial=run.batch,
               total=batches, disable=not run.dist.main, dynamic_ncols=True)
    for i, (images, labels) in enumerate(bar, start=run.batch):
        sam = takes_sam_step(config, epoch, run.step)
        loss, correct, ascent_norm = step_fn(images, labels, sam)  # engine/step.py: SAM's two passes, or SGD
        run.training.schedule.step()
        run.step, run.batch, run.sam_steps = run.step + 1, i + 1, run.sam_steps + sam
        window.add(run.step, loss, correct, ascent_norm, len(labels))
        if run.step % config["log_every"] == 0 or i == batches - 1:
            run.partial["sums"] += window.sums
            run.partial["images"] += window.images
            run.partial["sam_steps"] += window.sam_steps
            log_window(run, window, epoch, tracker, bar)
        stop, due = stopper.poll()
        if stop or due:
            save_checkpoint(run, None, stopper)  # this exact step, mid-epoch
            if stop:
                bar.close()
                return None
    bar.close()
    average_buffers(run.training.model, run.dist)  # replicas' BatchNorm statistics, as the official eval
    loss_sum, correct_sum, _ = all_reduce_sum(run.partial["sums"], run.dist).tolist()
    n = run.partial["images"] * run.dist.world_size
    metrics = {"epoch": epoch + 1, "train/loss": loss_sum / n, "train/acc": correct_sum / n,
               "train/error": 1 - correct_sum / n}
    if config["optimizer"] == "sam":
        metrics["train/sam_share"] = run.partial["sam_steps"] / batches
    run.partial = None
    return metrics


def log_window(run, window, epoch, tracker, bar):
    world = run.dist.world_size
    sums = all_reduce_sum(window.sums.clone(), run.dist).tolist()  # the loop's one host sync
    stop_if_not_finite(run, window.first_bad, tracker)
    images = window.images * world
    metrics = {"train/step_loss": sums[0] / images, "train/step_acc": sums[1] / images,
               "lr": run.training.schedule.get_last_lr()[0],
               "images_per_s": images / (time.perf_counter() - window.start), "epoch": epoch + 1}
    if run.config["optimizer"] == "sam":
        metrics["sam/share"] = window.sam_steps / window.steps
        if window.sam_steps:
            metrics["sam/ascent_grad_norm"] = sums[2] / (window.sam_steps * world)
    bar.set_postfix(loss=f"{metrics['train/step_loss']:.3f}", acc=f"{metrics['train/step_acc']:.3f}",
                    lr=f"{metrics['lr']:.4f}", img_s=f"{metrics['images_per_s']:.0f}")
    if tracker:
        tracker.log(metrics, run.step, "step")
    window.reset()


@torch.no_grad()
def evaluate(run):
    """Loss and accuracy on each evaluation set, on rank 0 (others wait); {} elsewhere."""
    model, step, results = run.training.model, run.training.step, {}
    forward = model if run.dist.enabled else step.forward  # DDP's own forward would sync
    if run.dist.main:
        model.eval()
        for name, loader in run.eval_loaders.items():
            r = evaluate_loader(forward, loader, run.runtime.autocast, run.num_classes, step.mark)
            results.update({f"{name}/loss": r["loss"], f"{name}/acc": r["acc"], f"{name}/error": r["error"]})
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


def save_checkpoint(run, metrics, stopper):
    """Atomically, and only a model that is finite (weights, BatchNorm statistics, evaluation loss).
    metrics: the epoch's, at its end; None mid-epoch (a signal, or --checkpoint-every-min), where the
    checkpoint also carries the epoch's sums so far and the replicas' averaged BatchNorm statistics."""
    mid_epoch = metrics is None
    finite = checkpoint.is_finite(run.training.model) and all(
        v == v and abs(v) != float("inf") for k, v in (metrics or {}).items() if k.endswith("/loss"))
    if run.dist.enabled:  # rank 0 evaluated: its verdict holds for every rank
        verdict = torch.tensor([int(finite)], device=run.runtime.device)
        torch.distributed.broadcast(verdict, src=0)
        finite = bool(verdict.item())
    where = f"at step {run.step}" if mid_epoch else f"after epoch {run.epoch + 1}"
    if not finite:
        stop(run, f"the model is not finite {where} (weights, BatchNorm statistics or evaluation loss); "
                  f"{saved_note(run)}. {fix_hint(run)}", None)
    partial = None
    model_state = averaged_state(run.training.model, run.dist) if mid_epoch else run.training.model.state_dict()
    if mid_epoch:
        stop_if_not_finite(run, run.window.first_bad, None)
        partial = {"sums": all_reduce_sum(run.partial["sums"].clone(), run.dist).cpu(), "images": run.partial["images"],
                   "sam_steps": run.partial["sam_steps"],
                   "window": {**run.window.state_dict(), "sums": all_reduce_sum(run.window.sums.clone(), run.dist).cpu()}}
    else:
        for name in run.eval_loaders:
            if metrics.get(f"{name}/acc", -1) > run.best.get(f"best_{name}_acc", -1):
                run.best[f"best_{name}_acc"] = metrics[f"{name}/acc"]
        run.epoch, run.batch, run.last_metrics = run.epoch + 1, 0, metrics
    if run.dist.main:
        t = run.training
        checkpoint.save_atomic({
            "model": model_state, "optimizer": t.optimizer.state_dict(),
            "schedule": t.schedule.state_dict(), "scaler": t.scaler.state_dict() if t.scaler else None,
            "rng": checkpoint.rng_state(), "epoch": run.epoch, "batch": run.batch, "step": run.step,
            "sam_steps": run.sam_steps, "partial": partial, "best": run.best, "wall_time": wall_time(run),
            "metrics": run.last_metrics, "wandb_id": run.wandb_id, "changes": run.changes, "config": run.config,
            "data_md5": run.data_fingerprint["md5"]}, run.dir / "last.pt")
        run.saved_epoch = run.epoch
    stopper.saved()
    if run.dist.enabled:
        torch.distributed.barrier()


def stopped(run, tracker, stopper):
    """A signal stopped the run; its last step is checkpointed. One line, and the documented exit code."""
    name = signal.Signals(stopper.signum).name
    if run.dist.main:
        where = f"epoch {run.epoch + 1}, batch {run.batch} of {len(run.train_loader)}" if run.batch else \
            f"the end of epoch {run.epoch}"
        if (run.dir / "last.pt").is_file():
            print(f"\nstopped by {name} after step {run.step} ({where}); {run.dir / 'last.pt'} holds that step. "
                  f"Continue with: {resume_command(run)}", file=sys.stderr, flush=True)
        else:
            print(f"\nstopped by {name} before the first step; nothing to checkpoint. Start it with the same "
                  f"command again", file=sys.stderr, flush=True)
        tracker.finish(exit_code=exit_code(stopper.signum))
    if run.dist.enabled:
        torch.distributed.destroy_process_group()
    return exit_code(stopper.signum)


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


def wall_time(run):
    return run.wall_time + time.perf_counter() - run.started


def saved_note(run):
    if run.saved_epoch is None:
        return "no step was checkpointed, so nothing was saved"
    return f"the last good checkpoint {run.dir / 'last.pt'} (epoch {run.saved_epoch}) is intact"


def fix_hint(run):
    fixes = "lower --lr or --rho" + (", or use --precision fp32" if run.runtime.precision != "fp32" else "")
    return f"To fix: {fixes}, and start a new run (or --resume with --allow-changes)"


def resume_command(run):
    return f"python train.py --resume {run.dir}"


def write_failure(run, e):
    """One line for a failed write: what, where, how much space it needed, and how to continue."""
    if checkpoint.disk_full(e):
        folder = next(p for p in (run.dir, *run.dir.parents) if p.exists())
        needed = f", and the write needed {size(e.needed)}" if getattr(e, "needed", None) else ""
        problem = f"No space left on device: the disk holding {run.dir} has {size(shutil.disk_usage(folder).free)} " \
                  f"free{needed}"
    else:
        problem = f"writing the run failed: {e.strerror or e} ({e.filename or run.dir})"
    if run.saved_epoch is None and not (run.dir / "last.pt").is_file():
        return f"{problem}; nothing was checkpointed; free space or fix the folder, then run the same command again"
    return f"{problem}; {saved_note(run)}; free space or fix the folder, then continue with: {resume_command(run)}"


def size(n):
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def project_duration(run, budget_s=3.0):
    """On the CPU, before committing to the run: time steps of this model (a throwaway copy, the run's
    random state untouched) on 8 images, and on 64 when 8 are quick (a small batch overstates the cost
    per image of a small model), keep the fastest (other work on the machine only slows a step down),
    scale it to the whole run, and say so, with a smoke command when it would take hours. A first step
    over a second is taken as it is (a slight overestimate), so a large model costs one step here."""
    if run.runtime.device.type != "cpu":
        return
    config = run.config
    with torch.random.fork_rng(devices=[]):
        step = build_training({**config, "m_sharpness": 0, "compile": "off"}, run.num_classes, run.runtime,
                              total_steps=2).step
        deadline = time.perf_counter() + budget_s
        for probe in (8, 64):
            images, labels = torch.zeros(probe, 3, 32, 32), torch.zeros(probe, dtype=torch.long)
            times = []
            while len(times) < 4 and (len(times) < 2 or time.perf_counter() < deadline) and max(times, default=0) < 1:
                start = time.perf_counter()
                step(images, labels, False)
                times.append(time.perf_counter() - start)
            times = times[1:] or times  # the first step warms up, unless it was all there was time for
            if min(times) > 0.5 or probe >= config["batch_size"] or time.perf_counter() > deadline:
                break
    pass_s = min(times) / probe  # one forward-backward pass, per image
    steps = len(run.train_loader)
    passes = sum(1 + (config["optimizer"] == "sam" and e >= config["sam_start_epoch"]) * config["sam_prob"]
                 for e in range(run.epoch, config["epochs"])) * steps - run.batch
    evaluation = sum(len(loader.labels) for loader in run.eval_loaders.values()) / 3 * (config["epochs"] - run.epoch)
    total = pass_s * (passes * config["batch_size"] + evaluation)
    line = (f"note: on this CPU the {config['epochs'] - run.epoch} epochs to go would take about "
            f"{format_duration(total)} (measured: one pass of {probe} images took {min(times):.2f} s)")
    if total > 3600:
        line += (". For a smoke test of the whole pipeline in about a minute: python train.py --config "
                 "configs/resnet18_sam.yaml --subset 512 --batch-size 64 --epochs 2")
    print(line, file=sys.stderr, flush=True)


def format_duration(seconds):
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


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
        where = f", batch {run.batch} of {len(run.train_loader)} of epoch {run.epoch + 1}" if run.batch else ""
        print(f"resuming {run.dir} from epoch {run.epoch}, step {run.step}{where}"
              + (" (the earlier attempt stopped before its first checkpoint)" if not run.step else ""))
    print(yaml.safe_dump({"config": config, **meta}, sort_keys=False).rstrip())
    run.dir.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write(run.dir / "config.yaml", yaml.safe_dump({**config, "meta": meta}, sort_keys=False).encode())
    return Tracker(run.dir, {**config, "meta": meta}, mode=wandb_mode(config["wandb_mode"]),
                   project=config["wandb_project"], entity=config["wandb_entity"], group=config["wandb_group"],
                   tags=config["wandb_tags"].split(",") if config["wandb_tags"] else None, run_id=run.wandb_id,
                   resumed_step=run.step if (run.step or run.restarted) else None)


def finish(run, tracker):
    last, config = run.last_metrics, run.config
    results = {"final_test_acc": last.get("test/acc"),
               "final_test_error": 1 - last["test/acc"] if "test/acc" in last else None,
               "best_test_acc": run.best.get("best_test_acc"),
               "best_test_error": 1 - run.best["best_test_acc"] if "best_test_acc" in run.best else None,
               "epochs": run.epoch, "steps": run.step, "sam_steps": run.sam_steps,
               "passes_per_step": (run.step + run.sam_steps) / run.step, "wall_time_s": wall_time(run),
               **{k: config[k] for k in ("model", "dataset", "augment", "optimizer", "rho", "seed")},
               "settings": {**{k: config[k] for k in EXPERIMENT}, "precision": run.runtime.precision,
                            "loader": loader_kind(config)},  # auto resolved: what the run used
               "changes": run.changes,
               "git_commit": run.meta["git_commit"], "dataset_md5": run.meta["dataset_md5"],
               "dataset_official": run.data_fingerprint["official"]}
    if "val/acc" in last:
        results.update(final_val_acc=last["val/acc"], best_val_acc=run.best.get("best_val_acc"))
    checkpoint.atomic_write(run.dir / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    tracker.summary(results)
    if config["save_artifact"]:
        tracker.log_artifact(run.dir / "last.pt", f"{run.dir.name}-checkpoint")
    tracker.finish()
    print(f"done: final test accuracy {results['final_test_acc']:.4f}, best {results['best_test_acc']:.4f}, "
          f"{results['wall_time_s'] / 60:.1f} min of training; results in {run.dir}")


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
        "dataset_official": run.data_fingerprint["official"],
        "dataset_md5": run.original_md5 or run.data_fingerprint["md5"],  # what the run started on, never replaced
        "wandb_id": run.wandb_id, "changes": run.changes,
        **({"relabelled_from": run.relabelled} if run.relabelled else {}),
    }


if __name__ == "__main__":
    sys.exit(main())
