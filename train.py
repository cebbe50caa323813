"""Reproduce Sharpness-Aware Minimization (Foret et al., ICLR 2021) on CIFAR-10/100.

    python train.py                                   # the paper's WRN-28-10 SAM run
    python train.py --config configs/resnet18_sgd.yaml --seed 1
    python train.py --epochs 200 --lr 0.1 --batch_size 128 --rho 0.05
    torchrun --nproc_per_node=8 train.py ...          # data parallel, per-GPU ascent

Settings: configs/*.yaml, overridden by flags (python train.py --help). Outputs go to
<out-dir>/<name>/: config.yaml, metrics.jsonl, last.pt, results.json; and to W&B.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from data import DataError, build_loaders, load_cifar
from engine import builders, checkpoint
from engine.config import ConfigError, default_name, parse_config
from engine.distributed import all_reduce_sum, init_distributed, replica_checksums
from engine.step import TrainStep, evaluate
from engine.tracker import Tracker, has_wandb_credentials, wandb_mode

REPO = Path(__file__).resolve().parent


def main(argv=None):
    try:
        config, run = parse_config(argv)
        setup = prepare(config, run)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return train(config, **setup)


def prepare(config, run):
    """Everything that can fail on bad input, before anything is written."""
    device_type = "cuda" if config["device"] != "cpu" and torch.cuda.is_available() else "cpu"
    dist_info = init_distributed(device_type)
    device = builders.resolve_device(config["device"], dist_info.local_rank)
    precision = builders.resolve_precision(config["precision"], device)
    if config["batch_size"] % dist_info.world_size:
        raise ConfigError(f"batch size {config['batch_size']} does not split evenly over "
                          f"{dist_info.world_size} processes; use a multiple of {dist_info.world_size}")
    run_dir = Path(config["out_dir"]) / (config["name"] or default_name(config))
    resume_from = resume_path(run["resume"], run_dir)
    if resume_from is not None:
        run_dir = resume_from.parent  # a resumed run writes on in its own folder
    if resume_from is None and (run_dir / "last.pt").exists():
        raise ConfigError(f"run folder {run_dir} already holds a run; pass --resume to continue it "
                          f"or --name for a new run")
    if dist_info.main and wandb_mode(config["wandb_mode"]) == "online" and not has_wandb_credentials():
        raise ConfigError("W&B online mode needs credentials and we never prompt: run `wandb login` or set "
                          "WANDB_API_KEY, or use --wandb-mode offline")
    data = load_cifar(config["dataset"], config["data_dir"], config["download"])
    channels_last = device.type == "cuda" if config["channels_last"] is None else config["channels_last"]
    try:
        train_loader, eval_loaders = make_loaders(config, data, device, channels_last, dist_info)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return dict(run_dir=run_dir, resume_from=resume_from, data=data, device=device, precision=precision,
                channels_last=channels_last, dist_info=dist_info, train_loader=train_loader,
                eval_loaders=eval_loaders)


def resume_path(resume, run_dir):
    if resume is None:
        return None
    path = run_dir / "last.pt" if resume == "auto" else Path(resume)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}; check --out-dir/--name or pass the checkpoint path")
    return path


def make_loaders(config, data, device, channels_last, dist_info):
    return build_loaders(
        data, augment=config["augment"], batch_size=config["batch_size"], device=device, seed=config["seed"],
        loader=config["loader"], workers=config["workers"], padding_mode=config["padding_mode"],
        val_split=config["val_split"], label_noise=config["label_noise"], subset=config["subset"],
        eval_batch_size=config["eval_batch_size"], rank=dist_info.rank, world_size=dist_info.world_size,
        channels_last=channels_last)


def train(config, *, run_dir, resume_from, data, device, precision, channels_last, dist_info,
          train_loader, eval_loaders):
    torch.manual_seed(config["seed"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model, net, forward = builders.build_network(config, data.num_classes, device, channels_last, dist_info)
    optimizer = builders.build_optimizer(config, model, device)
    steps_per_epoch = len(train_loader)
    schedule = builders.build_schedule(optimizer, config["epochs"] * steps_per_epoch)
    scaler = builders.grad_scaler(precision, device)
    autocast = builders.autocast_factory(precision, device)
    cudagraphs = config["compile"] == "reduce-overhead" and device.type == "cuda"
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
    step_fn = TrainStep(forward, net, optimizer, criterion, sam=config["optimizer"] == "sam",
                        autocast=autocast, scaler=scaler, cudagraphs=cudagraphs)

    start_epoch, step, best, run_id = 0, 0, {}, None
    if resume_from is not None:
        state = checkpoint.load(resume_from)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        start_epoch, step, best, run_id = state["epoch"], state["step"], state["best"], state["wandb_id"]
        warn_config_changes(state["config"], config)

    tracker = None
    if dist_info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        meta = run_metadata(config, model, data, device, precision, dist_info)
        print(yaml.safe_dump({"config": config, **meta}, sort_keys=False).rstrip())
        (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "meta": meta}, sort_keys=False))
        tracker = Tracker(run_dir, {**config, "meta": meta}, mode=wandb_mode(config["wandb_mode"]),
                          project=config["wandb_project"], entity=config["wandb_entity"],
                          group=config["wandb_group"],
                          tags=config["wandb_tags"].split(",") if config["wandb_tags"] else None,
                          run_id=run_id, resumed_step=step if resume_from else None)
        run_id = tracker.run_id

    kill_at = int(os.environ.get("SAM_TEST_KILL_AT_STEP", "0"))  # test hook: simulate a crash
    wall_start = time.perf_counter()
    for epoch in range(start_epoch, config["epochs"]):
        epoch_start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train_loader.set_epoch(epoch)
        # Metrics accumulate on the device; image counts are known on the host.
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss * n, correct over the epoch
        window = torch.zeros(3, dtype=torch.float64, device=device)  # same + grad norm since the last log
        count, window_count = 0, 0
        first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        window_start = time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config['epochs']}", leave=False,
                   disable=not dist_info.main, dynamic_ncols=True)
        for images, labels in bar:
            loss, correct, grad_norm = step_fn(images, labels)
            schedule.step()
            step += 1
            n = len(labels)
            batch_stats = torch.stack([loss.double() * n, correct.double()])
            sums += batch_stats
            window[:2] += batch_stats
            if grad_norm is not None:
                window[2] += grad_norm.double()
            count, window_count = count + n, window_count + n
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if step % config["log_every"] == 0:
                stats = all_reduce_sum(window.clone(), dist_info).tolist()  # the loop's one host sync
                check_finite(first_bad, dist_info, tracker, run_dir)
                images = window_count * dist_info.world_size
                metrics = {"train/step_loss": stats[0] / images, "train/step_acc": stats[1] / images,
                           "lr": schedule.get_last_lr()[0],
                           "images_per_s": images / (time.perf_counter() - window_start), "epoch": epoch + 1}
                if config["optimizer"] == "sam":
                    metrics["sam/ascent_grad_norm"] = stats[2] / (config["log_every"] * dist_info.world_size)
                bar.set_postfix(loss=f"{metrics['train/step_loss']:.3f}", acc=f"{metrics['train/step_acc']:.3f}",
                                lr=f"{metrics['lr']:.4f}", img_s=f"{metrics['images_per_s']:.0f}")
                if tracker:
                    tracker.log(metrics, step)
                window.zero_()
                window_count, window_start = 0, time.perf_counter()
        bar.close()
        check_finite(first_bad, dist_info, tracker, run_dir)
        loss_sum, correct_sum = all_reduce_sum(sums, dist_info).tolist()
        count *= dist_info.world_size
        train_time = time.perf_counter() - epoch_start

        if dist_info.main:
            metrics = {"epoch": epoch + 1, "train/loss": loss_sum / count, "train/acc": correct_sum / count,
                       "train/error": 1 - correct_sum / count}
            eval_forward = forward if not dist_info.enabled else model  # DDP forward would sync
            for name, loader in eval_loaders.items():
                result = evaluate(eval_forward, model, loader, autocast, cudagraphs and not dist_info.enabled)
                metrics.update({f"{name}/loss": result["loss"], f"{name}/acc": result["acc"],
                                f"{name}/error": 1 - result["acc"]})
                if result["acc"] > best.get(f"best_{name}_acc", -1):
                    best[f"best_{name}_acc"] = result["acc"]
            metrics["epoch_time_s"] = time.perf_counter() - epoch_start
            metrics["train_time_s"] = train_time
            if device.type == "cuda":
                metrics["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            tracker.log(metrics, step)
            print(f"epoch {epoch + 1:3d}/{config['epochs']}  train loss {metrics['train/loss']:.4f} "
                  f"acc {metrics['train/acc']:.4f}  test loss {metrics['test/loss']:.4f} "
                  f"acc {metrics['test/acc']:.4f}" + (f"  val acc {metrics['val/acc']:.4f}" if "val/acc" in metrics
                                                       else "") + f"  {metrics['epoch_time_s']:.1f}s", flush=True)
            checkpoint.save_atomic({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "rng": checkpoint.rng_state(), "epoch": epoch + 1, "step": step, "best": best,
                "wandb_id": run_id, "config": config}, run_dir / "last.pt")
        if dist_info.enabled:
            torch.distributed.barrier()

    if dist_info.enabled:
        checksums = replica_checksums(model, dist_info)
        torch.distributed.destroy_process_group()
        if len(set(checksums)) > 1:
            print(f"error: replicas diverged (parameter checksums {checksums})", file=sys.stderr)
            return 1
        if dist_info.main:
            print(f"replicas identical: {dist_info.world_size} ranks, parameter checksum {checksums[0]}")
    if dist_info.main:
        finish(tracker, run_dir, metrics_from_log(run_dir), best, time.perf_counter() - wall_start, config)
    return 0


def check_finite(first_bad, dist_info, tracker, run_dir):
    bad = first_bad.clone()
    if dist_info.enabled:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    bad = int(bad)
    if bad >= 0:
        message = (f"error: the training loss became non-finite at step {bad}; stopping. The last good "
                   f"checkpoint {run_dir / 'last.pt'} is intact: lower --lr or --rho, or use --precision fp32")
        print(message, file=sys.stderr)
        if tracker:
            tracker.finish(exit_code=1)
        sys.exit(1)


def metrics_from_log(run_dir):
    """The last epoch record of metrics.jsonl (also right after a resume of a finished run)."""
    last = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "test/acc" in record:
            last = record
    return last


def finish(tracker, run_dir, last, best, wall_time, config):
    results = {"final_test_acc": last.get("test/acc"), "final_test_error": 1 - last["test/acc"] if last else None,
               "best_test_acc": best.get("best_test_acc"),
               "best_test_error": 1 - best["best_test_acc"] if "best_test_acc" in best else None,
               "epochs": last.get("epoch"), "wall_time_s": wall_time,
               "model": config["model"], "dataset": config["dataset"], "augment": config["augment"],
               "optimizer": config["optimizer"], "rho": config["rho"], "seed": config["seed"]}
    if "val/acc" in last:
        results.update(final_val_acc=last["val/acc"], best_val_acc=best.get("best_val_acc"))
    text = json.dumps(results, indent=2) + "\n"
    checkpoint.atomic_write(run_dir / "results.json", lambda f: f.write(text.encode()))
    tracker.summary(results)
    if config["save_artifact"]:
        tracker.log_artifact(run_dir / "last.pt", f"{run_dir.name}-checkpoint")
    tracker.finish()
    print(f"done: final test accuracy {results['final_test_acc']:.4f}, best {results['best_test_acc']:.4f}, "
          f"{wall_time / 60:.1f} min; results in {run_dir}")


def run_metadata(config, model, data, device, precision, dist_info):
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {
        "command": " ".join([sys.executable, *sys.argv]),
        "git_commit": git("rev-parse", "HEAD") or None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "torch": str(torch.__version__), "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision, "world_size": dist_info.world_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dataset_official": data.fingerprint["official"], "dataset_md5": data.fingerprint["md5"],
    }


def warn_config_changes(saved, config):
    ignored = {"wandb_mode", "workers", "log_every", "device", "data_dir", "download", "epochs"}
    changed = [k for k in config if k not in ignored and saved.get(k) != config[k]]
    if changed:
        print(f"warning: resuming with settings that differ from the checkpoint's: "
              f"{', '.join(f'{k} {saved.get(k)!r} -> {config[k]!r}' for k in changed)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
