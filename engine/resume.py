"""A run's folder, and what --resume continues from. A resumed run is the same experiment: its own
settings, its own data files, its own checkpoint; a command that would change any of them is refused
in one line, naming what differs."""

import os
from pathlib import Path

import yaml

from data import load_cifar
from data.cifar import DATA_DIR_ENV, RELEASES, resolve_data_dir

from engine import checkpoint
from engine.config import EXPERIMENT, SETTINGS, ConfigError, check_path, default_name, defaults, flag, read, validate


def stamp(path):
    """(mtime, size) of a file, or None: a second process must not slip in between reading and locking."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


def read_run_config(run_dir):
    """The config.yaml a run folder holds (written when the run started) -> {config, meta}, or None."""
    try:
        saved = yaml.safe_load(read(run_dir / "config.yaml").decode())
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError, ValueError):  # ValueError: a 5000-digit int
        return None
    if not isinstance(saved, dict):
        return None
    meta = saved.pop("meta", {})
    return {"config": known(saved), "meta": meta if isinstance(meta, dict) else {}}


def known(saved):
    """Saved settings without their nulls (a setting the run did not use), so the default completes them."""
    return {k: v for k, v in saved.items() if not (v is None and k in SETTINGS and SETTINGS[k].default is not None)}


def experiment_changes(saved, config):
    return {k: (saved.get(k, SETTINGS[k].default), config[k]) for k in EXPERIMENT
            if saved.get(k, SETTINGS[k].default) != config[k]}


def describe(changes):
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def run_folder(parsed):
    """-> (config, run folder, checkpoint or None, config.yaml found there or None, last.pt's stamp).
    On --resume the config is the run's own, completed by what this command gave that does not change
    the experiment (a device, a W&B mode, ...)."""
    config = parsed.config
    if parsed.resume in (None, "auto"):
        run_dir = Path(config["out_dir"]) / (config["name"] or default_name(config))
        path = run_dir / "last.pt"
    else:
        path = checkpoint.find(parsed.resume)
        run_dir = path.parent
    inside = checkpoint.enclosing_run(run_dir.parent)
    if inside is not None:  # runs nested in a run: its records and every tool reading run folders would mix them up
        raise ConfigError(f"{run_dir.parent} is inside run folder {inside}; give an --out-dir that is no run's folder")
    for name in (*checkpoint.RUN_FILES, *checkpoint.RUN_FOLDERS):  # where a run writes: its own, never a link
        kept, folder = run_dir / name, name in checkpoint.RUN_FOLDERS
        if kept.is_symlink() or (kept.exists() and not (kept.is_dir() if folder else kept.is_file())):
            what = "a link" if kept.is_symlink() else "not a folder" if folder else "not a regular file"
            raise ConfigError(f"{kept} is {what}, so it cannot be this run's {name} (a run writes only into its own "
                              f"folder); move it away and run again")
    earlier = read_run_config(run_dir)
    resume = parsed.resume
    if resume is None and path.exists() and checkpoint.finished(run_dir):
        changes = experiment_changes(earlier["config"], config) if earlier else None
        if changes or earlier is None:
            what = f"of other settings ({describe(changes)})" if changes else "without a readable config.yaml"
            raise ConfigError(f"run folder {run_dir} holds a finished run {what}; give --name for another run")
        resume = "auto"  # this very run, finished: nothing to do, as with --resume
    if resume is None:
        if path.exists():
            raise ConfigError(f"run folder {run_dir} already holds a run; pass --resume to continue it "
                              f"or --name for a new run")
        if earlier and experiment_changes(earlier["config"], config):
            raise ConfigError(f"run folder {run_dir} holds an unfinished attempt of a different experiment "
                              f"({describe(experiment_changes(earlier['config'], config))}); use another --name")
        return config, run_dir, None, earlier, stamp(path)

    if path.is_file():
        try:
            state = checkpoint.load(path, in_its_folder=False)  # check_belongs says it for --resume
        except ValueError as e:
            raise ConfigError(f"--resume: {e}; pass the last.pt of a run folder") from None
        checkpoint.check_belongs(state, earlier, run_dir)
        saved = state["config"]
        edited = experiment_changes(known(saved), {**defaults(), **earlier["config"]})
        if edited:  # config.yaml changed by hand: what it says is not what the checkpoint trained
            said = ", ".join(f"{k} {new!r} there, {old!r} in last.pt" for k, (old, new) in edited.items())
            raise ConfigError(f"{run_dir / 'config.yaml'} does not state the settings this run trained with ({said}): "
                              f"it was edited; a run's settings do not change: put them back, or start a new run "
                              f"with the new ones (another --name)")
    elif earlier is not None:  # stopped before its first checkpoint: start it over with its settings
        state, saved = None, earlier["config"]
    else:
        raise ConfigError(f"--resume: no checkpoint at {path}; check --out-dir/--name or pass the run folder "
                          f"(its name changes with the settings: see python train.py --check)")
    named = saved.get("name") or default_name({**defaults(), **known(saved)})
    if named != run_dir.name:  # a copy's W&B id and records would be another folder's
        raise ConfigError(f"{run_dir} holds the run {named!r} (so its {'last.pt' if state else 'config.yaml'} says): "
                          f"the folder was copied or renamed, or its config.yaml edited; a run continues only in a "
                          f"folder of its own name: rename it back, or start a new run")
    if resume != "auto":  # --resume PATH names the folder: a --name or --out-dir that says otherwise is refused
        for key, named in (("name", run_dir.name), ("out_dir", str(run_dir.parent))):
            same = config[key] == named if key == "name" else Path(config[key]).resolve() == run_dir.parent.resolve()
            if key in parsed.given and not same:
                raise ConfigError(f"--resume {parsed.resume} is the run {run_dir.name!r} in {run_dir.parent}, but "
                                  f"{flag(key)} {config[key]} says otherwise; drop {flag(key)}")
    config = {**defaults(), **{k: v for k, v in saved.items() if k in SETTINGS},
              **parsed.given, "out_dir": str(run_dir.parent), "name": run_dir.name}
    validate(config, parsed.flags)
    changes = experiment_changes(saved, config)
    if changes:
        raise ConfigError(f"resuming {run_dir} with settings that change the experiment: {describe(changes)}; a "
                          f"resumed run continues the same experiment: drop them, or start a new run with them")
    return config, run_dir, state, earlier, stamp(path)


def check_data(state, fingerprint, folder, how="point --data-dir at"):
    """A resumed (or measured) run uses the data files it trained on (the checksums its checkpoint holds)."""
    recorded = state["data_md5"] if state else None
    if recorded is not None and recorded != fingerprint["md5"]:
        differ = sorted(f for f in {*recorded, *fingerprint["md5"]} if recorded.get(f) != fingerprint["md5"].get(f))
        raise ConfigError(f"the data in {folder} is not what this run trained on ({', '.join(differ)} differ from "
                          f"the checksums in its checkpoint); {how} the run's data")


def run_data(config, state, folder=None, how="set $SAM_DATA_DIR to"):
    """The data set a run trained on, for a tool that reads the run (evaluate.py, sharpness.py): from
    `folder` when given, else from the folder the run recorded, else (it moved) from $SAM_DATA_DIR; the
    files the checkpoint's checksums name. ConfigError saying `how` to point at them otherwise."""
    base = RELEASES[config["dataset"]][0].base_folder
    if folder is not None:
        check_path(folder, "--data-dir")
    if folder is None:
        recorded = resolve_data_dir(config["data_dir"])
        folder = recorded if (recorded / base).is_dir() or DATA_DIR_ENV not in os.environ else resolve_data_dir()
    if not (resolve_data_dir(folder) / base).is_dir():
        where = "" if resolve_data_dir(folder) == resolve_data_dir(config["data_dir"]) else \
            f" (this run trained on the data in {config['data_dir']})"
        raise ConfigError(f"{config['dataset']} is not in {resolve_data_dir(folder)}{where}; if the run's data moved, "
                          f"{how} the folder that holds {base}/ now")
    data = load_cifar(config["dataset"], str(folder))
    check_data(state, data.fingerprint, folder, how)
    return data


def restore(run, state):
    """Load a checkpoint into the run: weights, momentum, the step (and so the learning rate), the
    random state, and the position in the epoch. The settings are the run's own (run_folder)."""
    t = run.training
    settings = [{k: v for k, v in group.items() if k != "params"} for group in t.optimizer.param_groups]
    try:
        t.model.load_state_dict(state["model"])
        t.optimizer.load_state_dict(state["optimizer"])  # momentum buffers, and the groups' settings...
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:160]
        raise ConfigError(f"--resume: the checkpoint does not fit this run's model/optimizer "
                          f"({state['config'].get('model')} saved, {run.config['model']} built): {first}") from None
    for group, values in zip(t.optimizer.param_groups, settings):
        group.update(values)  # ...which are the run's own, from its config, as when it was built
    t.schedule.seek(state["step"])
    if t.scaler and state["scaler"]:
        t.scaler.load_state_dict(state["scaler"])
    checkpoint.set_rng_state(state["rng"])
    run.epoch, run.batch, run.step, run.sam_steps = state["epoch"], state["batch"], state["step"], state["sam_steps"]
    run.best, run.last_metrics, run.wall_time = state["best"], state["metrics"], state["wall_time"]
    if state["partial"]:  # stopped mid-epoch: the epoch's sums so far (global: rank 0 carries them)
        run.partial = {**state["partial"], "sums": state["partial"]["sums"].to(run.runtime.device)}
        run.window.load_state_dict(state["partial"]["window"])
        if not run.dist.main:
            run.partial["sums"].zero_()
            run.window.sums.zero_()
