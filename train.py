"""Reproduce Sharpness-Aware Minimization (Foret et al., ICLR 2021) on CIFAR-10/100.

    python train.py                                   # the paper's WRN-28-10 SAM run (the defaults)
    python train.py --config configs/resnet18_sgd.yaml --seed 1
    python train.py --epochs 200 --lr 0.1 --batch_size 128 --rho 0.05
    python train.py --resume runs/NAME                # continue a stopped run, the same experiment
    torchrun --nproc_per_node=8 train.py ...          # data parallel, per-GPU ascent

Settings: engine/config.py (every default, with its source; docs/settings.md) -> configs/*.yaml -> flags.
A run writes <out-dir>/<name>/: config.yaml, metrics.jsonl, last.pt, results.json; and to W&B.

This file is the story: main() -> prepare() (everything that can be refused is checked first, in
engine/preflight.py, and nothing is written) -> train(), whose loop is one epoch: train_epoch() (SAM's
two passes are run.training.step, engine/step.py), evaluate(), save_checkpoint(). A stop signal ends
the step in flight, checkpoints that step and exits (engine/stopping.py); --resume continues from it.
"""

import signal

if __name__ == "__main__":  # Ctrl-C while Python imports torch: exit now, no traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from analysis.batches import training_batches
from analysis.hessian import HessianOperator, power_iteration
from data import DataError, build_loaders, load_cifar
from data.cifar import resolve_data_dir
from engine import checkpoint, preflight, resume
from engine.bootstrap import label_predictor
from engine.config import ConfigError, idle_sam_prob, loader_kind, num_classes, parse_config, printable, refuse
from engine.distributed import Dist, all_reduce_sum, average_buffers, averaged_state, init_distributed, \
    replica_digests
from engine.evaluation import evaluate_loader
from engine.records import finish, run_metadata, start_tracking
from engine.projection import format_duration, project
from engine.step import Runtime, Training, build_training, takes_sam_step
from engine.stopping import Stopper, StoppedStarting, exit_code, fix_hint, saved_note, stop, stop_if_not_finite, stopped
from engine.tracker import Window, new_run_id


@dataclass
class Run:
    """What prepare() built and train() runs; the counters move as it trains."""
    config: dict
    dir: Path
    dist: Dist
    runtime: Runtime
    training: Training
    train_loader: object
    eval_loaders: dict
    window: Window                  # step metrics since the last log, on the device
    meta: dict = None               # config.yaml's meta: code, versions, data checksums, W&B id
    epoch: int = 0                  # epochs completed
    batch: int = 0                  # batches done of the epoch in progress (a run stopped mid-epoch)
    step: int = 0                   # optimisation steps completed
    sam_steps: int = 0              # of which SAM steps (the rest: SGD steps of late-phase or randomized SAM)
    best: dict = field(default_factory=dict)
    last_metrics: dict = field(default_factory=dict)
    wall_time: float = 0.0          # seconds of training, up to `started` (this process's start)
    started: float = 0.0
    partial: dict = None            # the epoch in progress: device sums, images and SAM steps so far
    sharpness_batch: tuple = None   # --sharpness-every: the fixed batch lambda_max is measured on
    lock: checkpoint.RunLock = None


def main(argv=None):
    run = None
    with Stopper() as stopper:  # a stop signal: at once while starting, after the step in flight once training
        try:
            parsed = parse_config(argv)
            if parsed.check:
                print(f"ok: {preflight.check(parsed)}")
                return 0
            run = prepare(parsed)
        except (ConfigError, DataError) as e:
            return refuse(e)
        except StoppedStarting as e:
            print(f"\n{e} while starting: stopped before the first step; nothing was written", file=sys.stderr)
            return exit_code(e.signum)
        if run is None:
            return 0
        try:
            return train(run, stopper)
        except OSError as e:  # a full disk, a folder made read-only mid-run
            print(f"error: {printable(checkpoint.write_failure(run.dir, e))}", file=sys.stderr)
            return 1
        finally:
            run.lock and run.lock.release()


def prepare(parsed):
    """-> Run, or None when the run asked for is already finished. Writes nothing but the lock."""
    r = preflight.resolve(parsed)  # settings, environment, run folder and checkpoint: all checked
    config, state = r.config, r.state
    dist = init_distributed(r.runtime.device.type)
    if r.finished:
        if dist.main:
            print(f"run {r.run_dir} is finished ({state['epoch']} of {config['epochs']} epochs); nothing to do. "
                  f"Results: {r.run_dir / 'results.json'}")
        return None
    config["data_dir"] = str(resolve_data_dir(config["data_dir"]))  # record the folder actually used
    data = load_cifar(config["dataset"], config["data_dir"], config["download"])
    resume.check_data(state, data.fingerprint, config["data_dir"])
    relabel, relabelled = label_predictor(config["relabel_from"], config, r.runtime) if config["relabel_from"] \
        else (None, None)
    train_loader, eval_loaders = data_loaders(config, data, r.runtime, dist, relabel)
    if idle_sam_prob(config, len(train_loader)):  # known once the data is: as --check says
        raise ConfigError(idle_sam_prob(config, len(train_loader)))
    torch.manual_seed(config["seed"])
    if r.runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    training = build_training(config, num_classes(config), r.runtime, config["epochs"] * len(train_loader),
                              distributed=dist.enabled, world_size=dist.world_size)
    run = Run(config, r.run_dir, dist, r.runtime, training, train_loader, eval_loaders, Window(r.runtime.device))
    if state is not None:
        resume.restore(run, state)
    wandb_id = state["run_id"] if state else (r.earlier or {}).get("meta", {}).get("wandb_id") or new_run_id()
    run.meta = run_metadata(run, data, wandb_id, relabelled)
    if config["sharpness_every"] and dist.main:
        run.sharpness_batch = training_batches(data, config, 1, min(config["batch_size"], len(train_loader.labels)),
                                               device=r.runtime.device, channels_last=r.runtime.channels_last)[0]
    if dist.main:
        project(run)  # on the CPU: how long this will take, measured; days on a CPU it fell back to: refused
        run.lock = checkpoint.RunLock(r.run_dir).acquire()
        if resume.stamp(r.run_dir / "last.pt") != r.stamp:
            run.lock.release()
            raise ConfigError(f"{r.run_dir / 'last.pt'} changed while this process started (another process is "
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


# ---- training -----------------------------------------------------------------------------------

def train(run, stopper):
    config, dist = run.config, run.dist
    stopper.training(config["checkpoint_every_min"], dist.control if dist.enabled else None, interrupted=lambda: (
        f"\ninterrupted in epoch {run.epoch + 1}, at step {run.step}; {saved_note(run, stopper.saved_step)}. "
        f"Continue with: python train.py --resume {run.dir}"))  # what a second Ctrl-C says as it ends the process
    stopper.saved_step = run.step if run.step else None  # a resumed run: last.pt holds the step it resumed at
    tracker = start_tracking(run) if dist.main else None
    run.started, first, first_batch = time.perf_counter(), run.epoch, run.batch
    if stopper.poll(after_step=False)[0]:  # a signal while starting: no step taken, nothing new to checkpoint
        return stopped(run, tracker, stopper)
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
            done = epoch + 1 - first - first_batch / len(run.train_loader)  # epochs this process trained
            eta = (time.perf_counter() - run.started) / done * (config["epochs"] - epoch - 1) if done >= 1 else None
            metrics.update(epoch_time_s=time.perf_counter() - epoch_start, train_time_s=train_time)
            if run.runtime.device.type == "cuda":
                metrics["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(run.runtime.device) / 2**30
            tracker.log(metrics, run.step, "epoch")
            print(epoch_line(epoch, config["epochs"], metrics, eta), flush=True)
        save_checkpoint(run, metrics, stopper)
        if epoch + 1 < config["epochs"] and stopper.poll(after_step=False)[0]:  # a signal during evaluation
            return stopped(run, tracker, stopper)
    if dist.enabled:
        digests = replica_digests(run.training.model, dist)
        torch.distributed.destroy_process_group()
        if len(set(digests)) > 1:
            print(f"error: replicas diverged (parameter SHA-256 per rank: {digests})", file=sys.stderr)
            return 1
        if dist.main:
            print(f"replicas identical: {dist.world_size} ranks, parameter SHA-256 {digests[0][:16]}")
    if dist.main:
        finish(run, tracker, wall_time(run))
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
            r = evaluate_loader(forward, loader, run.runtime.autocast, num_classes(run.config), step.mark)
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
    if not finite:
        where = f"at step {run.step}" if mid_epoch else f"after epoch {run.epoch + 1}"
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
        checkpoint.save_atomic(checkpoint.seal({
            "model": model_state, "optimizer": t.optimizer.state_dict(),
            "scaler": t.scaler.state_dict() if t.scaler else None, "rng": checkpoint.rng_state(),
            "epoch": run.epoch, "batch": run.batch, "step": run.step, "partial": partial,
            "sam_steps": run.sam_steps, "best": run.best, "metrics": run.last_metrics, "wall_time": wall_time(run),
            "config": run.config, "run_id": run.meta["wandb_id"], "data_md5": run.meta["dataset_md5"]}),
            run.dir / "last.pt")
    stopper.saved(run.step)
    if run.dist.enabled:
        torch.distributed.barrier()


def wall_time(run):
    return run.wall_time + time.perf_counter() - run.started


def epoch_line(epoch, epochs, m, eta):
    val = f"  val acc {m['val/acc']:.4f}" if "val/acc" in m else ""
    return (f"epoch {epoch + 1:3d}/{epochs}  train loss {m['train/loss']:.4f} acc {m['train/acc']:.4f}  "
            f"test loss {m['test/loss']:.4f} acc {m['test/acc']:.4f}{val}  {m['epoch_time_s']:.1f}s"
            + (f"  ETA {format_duration(eta)}" if eta is not None else ""))


if __name__ == "__main__":
    from engine.stopping import entry
    sys.exit(entry(main))
