"""Everything about a command that can be refused before anything is written: its settings against
the resolved device and process count, its environment, its run folder, its data files. train.py
runs these first; `train.py --check` and the sweeps (engine/sweep.py) run them alone."""

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from data.splits import make_splits, sizes
from data.cifar import RELEASES, check_files, is_data_folder, load_cifar, resolve_data_dir
from engine import checkpoint
from engine.config import ConfigError, idle_sam_prob, m_sharpness_error, path_problem
from engine.projection import refuse_if_too_long
from engine.resume import check_data, run_folder
from engine.step import Runtime, group_count, resolve_runtime
from engine.tracker import has_wandb_credentials, wandb_mode


@dataclass
class Resolved:
    """A command resolved without its data or model: what --check reports and train.py builds on."""
    config: dict
    run_dir: Path
    state: dict            # the checkpoint on --resume, else None
    earlier: dict          # config.yaml of an earlier attempt, else None
    runtime: Runtime
    world_size: int
    finished: bool
    stamp: tuple           # last.pt's (mtime, size) when read


def torchrun_environment():
    """(world size, rank, local rank) from torchrun's variables; a plain `python train.py` is (1, 0, 0)."""
    values = {}
    for key, default in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        text = os.environ.get(key, default)
        if not re.fullmatch(r"\s*[0-9]+\s*", text):
            raise ConfigError(f"${key} is {text!r}, not a whole number; unset it, or start the processes with torchrun")
        values[key] = int(text)
    world, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    if world < 1 or rank >= world or local >= world:
        raise ConfigError(f"$WORLD_SIZE={world}, $RANK={rank}, $LOCAL_RANK={local} do not describe a world of "
                          f"processes (need WORLD_SIZE >= 1 and ranks below it); unset them, or use torchrun")
    port = os.environ.get("MASTER_PORT", "")
    if world > 1 and (not os.environ.get("MASTER_ADDR", "").strip() or not re.fullmatch(r"[0-9]{1,5}", port)
                      or not 0 < int(port) < 65536):
        raise ConfigError(f"$WORLD_SIZE={world} without a $MASTER_ADDR and a $MASTER_PORT (1-65535) to meet at; "
                          f"start the processes with torchrun, which sets them, or unset WORLD_SIZE")
    return world, rank, local


def resolve(parsed):
    config, run_dir, state, earlier, stamp = run_folder(parsed)
    world_size, rank, local_rank = torchrun_environment()
    runtime = resolve_runtime(config, local_rank)
    if config["batch_size"] % world_size:
        raise ConfigError(f"batch size {config['batch_size']} does not split evenly over {world_size} "
                          f"processes; use a multiple of {world_size}")
    check_combinations(config, runtime, world_size)
    meta = (earlier or {}).get("meta") or {}
    if state is not None and meta.get("precision") not in (None, runtime.precision):  # --precision auto elsewhere
        raise ConfigError(f"{run_dir} trained in {meta['precision']} (--precision {config['precision']} on "
                          f"{meta.get('device')}), and here it would continue in {runtime.precision}: a run keeps its "
                          f"arithmetic; resume it with a --device on which it resolves to {meta['precision']}")
    if rank == 0 and wandb_mode(config["wandb_mode"]) == "online" and not has_wandb_credentials():
        raise ConfigError("W&B online mode needs credentials and we never prompt: run `wandb login` or set "
                          "WANDB_API_KEY, or use --wandb-mode offline")
    finished = state is not None and state["epoch"] >= config["epochs"] and checkpoint.finished(run_dir)
    if not finished:
        check_writable(run_dir)
        if rank == 0 and checkpoint.holder(run_dir):
            raise ConfigError(checkpoint.in_use(run_dir))
        if config["relabel_from"]:
            relabel_source(config)
    return Resolved(config, run_dir, state, earlier, runtime, world_size, finished, stamp)


def check(parsed, measure=True):
    """--check: the command's settings, run folder, device and data files, without training -> a line.
    `measure`: also the duration on a CPU that --device auto fell back to (engine/projection.py)."""
    r = resolve(parsed)
    if r.finished:
        return f"{r.run_dir} is finished; nothing to do"
    check_files(r.config["dataset"], r.config["data_dir"], r.config["download"])
    folder = resolve_data_dir(r.config["data_dir"])
    if (folder / RELEASES[r.config["dataset"]][0].base_folder).is_dir():  # else --download fetches it
        data = read_data(r.config["dataset"], str(folder))  # every file read and validated
        check_data(r.state, data.fingerprint, folder)
        c = r.config
        try:  # the splits training would build, from the same arithmetic
            train, held = sizes(len(data.train_labels), c["subset"], c["val_split"], c["batch_size"], c["label_noise"])
            make_splits(data, c["subset"], c["val_split"], c["label_noise"], c["seed"], c["label_noise_rule"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
        idle = idle_sam_prob(c, train // c["batch_size"])
        if idle:
            raise ConfigError(idle)
        if measure:  # as train.py measures before its first step, from where it would start
            test = min(c["subset"] or len(data.test_labels), len(data.test_labels))
            at = (r.state["epoch"], r.state["batch"]) if r.state else (0, 0)
            refuse_if_too_long(c, r.runtime, train // c["batch_size"], held + test, *at)
    return f"{r.run_dir} ({'resumes at step ' + str(r.state['step']) if r.state else 'a new run'})"


@functools.lru_cache(maxsize=4)
def read_data(dataset, folder):
    """The data set read once per process (a sweep checks many runs on the same files)."""
    return load_cifar(dataset, folder)


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
    if path_problem(run_dir / ("x" * 64)):  # the longest name a run writes in it: W&B's, a temporary file's
        raise ConfigError(f"the run folder {str(run_dir)[:80]}... is too long a path for the files a run writes in it "
                          f"({path_problem(run_dir / ('x' * 64))}); choose a shorter --out-dir or --name")
    for path in (run_dir, *run_dir.parents):
        if path.is_symlink() and not path.exists():
            raise ConfigError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; create "
                              f"it or choose another --out-dir")
        if path.exists():
            break
    real = Path(os.path.realpath(run_dir))
    data = next((f for f in (real, *real.parents) if is_data_folder(f)), None)
    if data is not None:
        raise ConfigError(f"the run folder {run_dir} would be {'inside ' if data != real else ''}data folder {data}, "
                          f"which no tool writes into; choose another --out-dir")
    other = checkpoint.enclosing_run(real.parent)
    if other is not None:
        raise ConfigError(f"the run folder {run_dir} would be inside run folder {other}, which holds its own run's "
                          f"records only; choose another --out-dir")
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise ConfigError(f"cannot create or write the run folder {run_dir}: {existing} is not a writable folder; "
                          f"choose another --out-dir")


def relabel_source(config):
    """--relabel-from names a finished run's checkpoint on the same data set (read, not loaded)."""
    path = checkpoint.find(config["relabel_from"])
    try:
        state = checkpoint.load(path)
    except ValueError as e:
        raise ConfigError(f"--relabel-from: {e}; pass a finished run's folder or its last.pt") from None
    source = state["config"]
    if state["epoch"] < source.get("epochs", 0) or not checkpoint.finished(path.parent):
        raise ConfigError(f"--relabel-from {config['relabel_from']}: that run has not finished (epoch {state['epoch']} "
                          f"of {source.get('epochs')}); finish it first (python train.py --resume {path.parent})")
    if source.get("dataset") != config["dataset"]:
        raise ConfigError(f"--relabel-from {config['relabel_from']}: that model was trained on {source.get('dataset')}"
                          f", this run is on {config['dataset']}; pass a run on the same data set")
