"""train.py end to end on tiny synthetic CIFAR data, on the CPU: logging, resume, bad input."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import train
from conftest import REPO, without_wandb_service, write_cifar10
from engine import checkpoint
from engine.config import SETTINGS, build_parser, load_yaml, parse_config
from wandb_records import history_and_config, run_files_in_start_order

TINY = ["--model", "wrn10_1", "--dropout", "0.1", "--batch-size", "32", "--eval-batch-size", "16",
        "--log-every", "2", "--device", "cpu"]


@pytest.fixture
def tiny_data(tmp_path):
    return write_cifar10(tmp_path / "data", per_batch=40)  # 200 training images: 6 steps of 32


def run_cli(args, env_extra=None, timeout=300):
    """train.py as a user runs it; `timeout` only guards against a hang (a loaded machine is slow)."""
    env = {**without_wandb_service(os.environ), "WANDB_SILENT": "true", **(env_extra or {})}
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def start_cli(args, **kwargs):
    env = {**without_wandb_service(os.environ), "WANDB_SILENT": "true"}
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=env, text=True, **kwargs)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def wait_for_step(path, step, proc, timeout=120, log=None):
    """Poll a run's metrics.jsonl until it has logged `step` (the run's own progress)."""
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}:\n{tail}")
        if path.exists():
            steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
            if steps and max(steps) >= step:
                return
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached")


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def main_code(argv):
    try:
        return train.main(argv)
    except SystemExit as e:  # argparse's own errors, and stops inside the loop
        return e.code


def files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- a whole run -----------------------------------------------------------------------------

@pytest.mark.slow
def test_two_epochs_end_to_end_with_offline_wandb(tiny_data, tmp_path):
    out = tmp_path / "runs"
    result = run_cli([*TINY, "--data-dir", str(tiny_data), "--epochs", "2", "--out-dir", str(out),
                      "--name", "e2e", "--wandb-mode", "offline", "--wandb-group", "g1", "--wandb-tags", "a,b"])
    assert result.returncode == 0, result.stderr
    run = out / "e2e"
    records = read_jsonl(run / "metrics.jsonl")
    epochs = [r for r in records if "test/acc" in r]
    steps = [r for r in records if "train/step_loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2] and [r["step"] for r in epochs] == [6, 12]
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12]
    for key in ("train/loss", "train/acc", "train/error", "test/loss", "test/error", "epoch_time_s"):
        assert key in epochs[-1]
    for key in ("lr", "images_per_s", "sam/ascent_grad_norm", "train/step_acc"):
        assert key in steps[0]
    assert steps[0]["lr"] == pytest.approx(0.1 * (1 + torch.cos(torch.tensor(torch.pi * 2 / 12)).item()) / 2)

    results = json.loads((run / "results.json").read_text())
    assert results["final_test_acc"] == epochs[-1]["test/acc"]
    assert results["best_test_acc"] == max(r["test/acc"] for r in epochs)
    assert results["final_test_error"] == pytest.approx(1 - results["final_test_acc"])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"] == "wrn10_1" and saved["meta"]["parameters"] > 0
    assert saved["meta"]["dataset_official"] is False
    assert results["git_commit"] == saved["meta"]["git_commit"]  # the code the run started on, read once
    # what this run did not use (basic augmentation, plain SAM, the device loader, clean labels) is null in
    # every record, never a value it did not train with
    idle = ("cutout_placement", "autoaugment_policy", "eta", "workers", "label_noise_rule")
    assert all(saved[k] is None and results["settings"].get(k, None) is None for k in idle), saved
    assert saved["augment"] == "basic" and saved["padding_mode"] == "reflect"  # what it did use, as it used it

    history, config = history_and_config(run_files_in_start_order(run)[0])
    assert json.loads(config["rho"]) == 0.05 and json.loads(config["model"]) == "wrn10_1"
    assert all(json.loads(config[k]) is None for k in idle)
    assert "git_commit" in json.loads(config["meta"]) and "dataset_md5" in json.loads(config["meta"])
    logged = [h for h in history if "test/acc" in h]
    assert [json.loads(h["test/acc"]) for h in logged] == [r["test/acc"] for r in epochs]
    assert any("sam/ascent_grad_norm" in h for h in history)
    assert "wandb sync" in result.stdout
    # the resolved configuration is printed at the start
    assert "batch_size: 32" in result.stdout and "rho: 0.05" in result.stdout


def test_step_logs_average_over_their_own_steps_when_epochs_do_not_divide_log_every(tiny_data, tmp_path):
    """6 steps an epoch, a log every 4: each log averages the steps since the previous one, and the
    last steps of an epoch are logged too. The per-step run (--log-every 1) is the reference."""
    common = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "2",
              "--wandb-mode", "disabled", "--dropout", "0"]
    assert train.main([*common, "--name", "each", "--log-every", "1"]) == 0
    assert train.main([*common, "--name", "every4", "--log-every", "4"]) == 0
    each = {r["step"]: r for r in read_jsonl(tmp_path / "each" / "metrics.jsonl") if "train/step_loss" in r}
    logs = [r for r in read_jsonl(tmp_path / "every4" / "metrics.jsonl") if "train/step_loss" in r]
    assert [r["step"] for r in logs] == [4, 6, 8, 12]
    for (first, last), logged in zip([(1, 4), (5, 6), (7, 8), (9, 12)], logs):
        window = [each[s] for s in range(first, last + 1)]
        mean_norm = sum(r["sam/ascent_grad_norm"] for r in window) / len(window)
        assert logged["sam/ascent_grad_norm"] == pytest.approx(mean_norm, rel=1e-6)
        assert logged["train/step_loss"] == pytest.approx(sum(r["train/step_loss"] for r in window) / len(window),
                                                          rel=1e-6)


def test_eta_is_the_mean_epoch_time_times_the_epochs_left(tiny_data, tmp_path, monkeypatch):
    seen = []
    original = train.epoch_line
    monkeypatch.setattr(train, "epoch_line", lambda e, n, m, eta: seen.append((m["epoch_time_s"], eta)) or
                        original(e, n, m, eta))
    assert train.main([*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "4",
                       "--wandb-mode", "disabled"]) == 0
    mean = sum(t for t, _ in seen[:3]) / 3
    # after 3 of 4 epochs: about one epoch left (checkpoints add a little); the elapsed time would be 3x
    assert 0.5 * mean < seen[2][1] < 2 * mean and seen[3][1] == 0


@pytest.mark.slow
def test_killed_anywhere_and_resumed_run_ends_bitwise_identical(tiny_data, tmp_path):
    """Two SIGKILLs sent from outside, at times read from the run's own metrics.jsonl (they land
    mid-step, mid-evaluation or mid-checkpoint), then --resume: the same weights, momentum and
    metrics as a run never interrupted."""
    out = tmp_path / "runs"
    common = [*TINY, "--data-dir", str(tiny_data), "--epochs", "6", "--out-dir", str(out), "--log-every", "1",
              "--wandb-mode", "offline"]
    whole = run_cli([*common, "--name", "whole"])
    assert whole.returncode == 0, whole.stderr
    for kill_after in (9, 22):
        log = tmp_path / f"attempt-{kill_after}.log"
        with open(log, "w") as sink:
            proc = start_cli([*common, "--name", "split"] + (["--resume"] if kill_after > 9 else []),
                             stdout=sink, stderr=subprocess.STDOUT)
        wait_for_step(out / "split" / "metrics.jsonl", kill_after, proc, log=log)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -9
        assert torch.load(out / "split" / "last.pt", weights_only=True)["epoch"] < 6
    resumed = run_cli([*common, "--name", "split", "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "after step" in resumed.stdout

    a = torch.load(out / "whole" / "last.pt", weights_only=True)
    b = torch.load(out / "split" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 6 and a["step"] == b["step"] == 36
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    strip = ("images_per_s", "epoch_time_s", "train_time_s")
    rows = [[{k: v for k, v in r.items() if k not in strip} for r in read_jsonl(out / n / "metrics.jsonl")]
            for n in ("whole", "split")]
    assert rows[0] == rows[1]  # no duplicated or missing steps after the resumes
    files = run_files_in_start_order(out / "split")
    assert {f.name for f in files} == {f"run-{b['run_id']}.wandb"}  # all continued one W&B run
    assert not list((out / "split").glob("*.tmp"))


# ---- resume: the same experiment, nothing else -------------------------------------------------

def test_resume_accepts_a_checkpoint_path_or_a_run_folder(tiny_data, tmp_path):
    common = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "r", "--wandb-mode",
              "disabled"]
    assert train.main([*common, "--epochs", "1"]) == 0
    (tmp_path / "r" / "results.json").unlink()  # as if stopped after its last checkpoint
    # by path, without --name and without the settings: the run continues in its own folder with its own
    assert train.main(["--resume", str(tmp_path / "r" / "last.pt")]) == 0
    assert (tmp_path / "r" / "results.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "r"]  # no new run folder
    (tmp_path / "r" / "results.json").unlink()
    assert train.main(["--resume", str(tmp_path / "r")]) == 0 and (tmp_path / "r" / "results.json").is_file()


def test_resume_refuses_settings_that_change_the_experiment(tiny_data, tmp_path, capsys):
    common = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "r", "--wandb-mode",
              "disabled"]
    assert train.main([*common, "--epochs", "1"]) == 0
    before = files(tmp_path / "r")
    capsys.readouterr()
    assert main_code([*common, "--epochs", "1", "--resume", "--rho", "0.1", "--subset", "64"]) == 2
    line = one_line_error(capsys)
    assert "settings that change the experiment: rho 0.05 -> 0.1, subset 0 -> 64" in line
    assert "start a new run" in line
    assert main_code([*common, "--resume", "--epochs", "2"]) == 2
    assert "epochs 1 -> 2" in one_line_error(capsys)
    assert files(tmp_path / "r") == before  # config.yaml, metrics, checkpoint: untouched
    # settings that do not change the experiment are fine
    assert main_code([*common, "--log-every", "3", "--resume"]) == 0


def test_resuming_a_finished_run_changes_nothing(tiny_data, tmp_path, capsys):
    common = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "f", "--wandb-mode",
              "disabled", "--epochs", "1"]
    assert train.main(common) == 0
    before = files(tmp_path / "f")
    capsys.readouterr()
    assert train.main([*common, "--resume"]) == 0
    assert "is finished (1 of 1 epochs); nothing to do" in capsys.readouterr().out
    assert files(tmp_path / "f") == before


@pytest.mark.parametrize("how", ["again", "resume"])
def test_an_attempt_that_died_before_its_first_checkpoint_starts_over_cleanly(tiny_data, tmp_path, capsys, how):
    common = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "d", "--wandb-mode",
              "offline", "--epochs", "1"]
    assert train.main(common) == 0
    for name in ("last.pt", "results.json"):  # as if killed after logging, before the checkpoint
        (tmp_path / "d" / name).unlink()
    wandb_id = yaml.safe_load((tmp_path / "d" / "config.yaml").read_text())["meta"]["wandb_id"]
    capsys.readouterr()
    assert train.main([*common, *(["--resume"] if how == "resume" else [])]) == 0
    assert f"resuming {tmp_path / 'd'} from its start" in capsys.readouterr().out
    steps = [r["step"] for r in read_jsonl(tmp_path / "d" / "metrics.jsonl")]
    assert steps == sorted(steps) and steps.count(6) == 2  # one step log and one epoch log at step 6, once
    # the id is in each run's data file name; folder names get "-1" when two attempts start in the same second
    files = run_files_in_start_order(tmp_path / "d")
    ids = {f.stem[len("run-"):] for f in files}
    assert len(files) == 2 and ids == {wandb_id}  # no orphan W&B run: both attempts log to the same one


def test_a_different_experiment_in_an_unfinished_folder_is_refused(tiny_data, tmp_path, capsys):
    common = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "d", "--wandb-mode",
              "disabled", "--epochs", "1"]
    assert train.main(common) == 0
    (tmp_path / "d" / "last.pt").unlink()
    capsys.readouterr()
    assert main_code([*common, "--rho", "0.2"]) == 2
    assert "different experiment (rho 0.05 -> 0.2)" in one_line_error(capsys)


def test_unreadable_or_foreign_checkpoints_are_one_line_errors(tiny_data, tmp_path, capsys):
    bad = tmp_path / "n.pt"
    bad.write_text("x\n")
    assert main_code([*TINY, "--data-dir", str(tiny_data), "--resume", str(bad)]) == 2
    line = one_line_error(capsys)
    assert str(bad) in line and "not a readable train.py checkpoint" in line and "weights_only" not in line

    common = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--wandb-mode", "disabled",
              "--epochs", "1"]
    assert train.main([*common, "--name", "a"]) == 0
    assert train.main([*common, "--name", "b", "--model", "wrn10_2"]) == 0
    state = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    state["model"] = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]  # weights of another model
    capsys.readouterr()
    (tmp_path / "a" / "results.json").unlink()
    torch.save(checkpoint.seal(state), tmp_path / "a" / "last.pt")
    assert main_code(["--resume", str(tmp_path / "a")]) == 2
    assert "does not fit this run's model" in one_line_error(capsys)


# ---- non-finite values -------------------------------------------------------------------------

def poison(monkeypatch, from_call):
    import engine.step
    monkeypatch.setattr(train, "project", lambda run: None)  # its probe steps would count as calls
    real_call = engine.step.TrainStep.__call__
    calls = {"n": 0}

    def poisoned(self, images, labels, sam=None):
        calls["n"] += 1
        loss, correct, norm = real_call(self, images, labels, sam)
        return (loss * float("nan") if calls["n"] >= from_call else loss), correct, norm

    monkeypatch.setattr(engine.step.TrainStep, "__call__", poisoned)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tiny_data, tmp_path, capsys, monkeypatch):
    common = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "nan",
              "--wandb-mode", "disabled", "--epochs", "3"]
    poison(monkeypatch, 9)
    assert main_code(common) == 1
    err = capsys.readouterr().err
    assert "non-finite at step 9" in err and "last.pt is intact" in err
    assert "--precision fp32" not in err  # the run is fp32 already
    state = torch.load(tmp_path / "nan" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and not list((tmp_path / "nan").glob("*.tmp"))


def test_non_finite_loss_before_any_checkpoint_says_so(tiny_data, tmp_path, capsys, monkeypatch):
    poison(monkeypatch, 2)
    assert main_code([*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "nan",
                      "--wandb-mode", "disabled"]) == 1
    err = capsys.readouterr().err
    assert "no step was checkpointed" in err and "is intact" not in err
    assert not (tmp_path / "nan" / "last.pt").exists()


@pytest.mark.parametrize("what", ["eval_loss", "bn_stats"])
def test_a_non_finite_model_is_never_checkpointed(tiny_data, tmp_path, capsys, monkeypatch, what):
    """The training loss stays finite; evaluation (or a BatchNorm statistic) goes bad in epoch 2."""
    real_evaluate = train.evaluate

    def evaluate(run):
        if run.epoch == 1:  # during the second epoch's evaluation
            if what == "eval_loss":
                return {**real_evaluate(run), "test/loss": float("nan")}
            run.training.model.bn.running_var[0] = float("inf")
        return real_evaluate(run)

    monkeypatch.setattr(train, "evaluate", evaluate)
    assert main_code([*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "x",
                      "--wandb-mode", "disabled", "--epochs", "3"]) == 1
    assert "not finite after epoch 2" in capsys.readouterr().err
    state = torch.load(tmp_path / "x" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and torch.isfinite(state["model"]["bn.running_var"]).all()


# ---- bad input: one line, exit 2, nothing created ----------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "epochs must be in [1, 100000], got 0"),
    (["--lr", "-0.1"], "lr must be in (0, 10]"),
    (["--lr", "inf"], "lr must be in (0, 10], got inf"),
    (["--lr", "nan"], "lr must be in (0, 10], got nan"),
    (["--weight-decay", "1e9"], "weight_decay must be in"),
    (["--batch-size", "0"], "batch_size must be in [1"),
    (["--rho", "-0.05"], "rho must be in [0, 10]"),
    (["--seed", "-1"], "seed must be in [0, 4294967295], got -1"),
    (["--model", "vgg16"], "unknown model 'vgg16'"),
    (["--dataset", "mnist"], "invalid choice"),
    (["--epochs", "ten"], "invalid int value"),
    (["--label-noise", "1.5"], "label_noise must be in [0, 1]"),
    (["--batch-size", "4096"], "larger than the 200 training images"),
    (["--config", "missing.yaml"], "not found"),
    (["--eta", "0.01"], "--eta applies only to ASAM"),
    (["--optimizer", "sgd", "--rho", "0.1"], "--rho applies only to SAM"),
    (["--optimizer", "sgd", "--adaptive"], "--adaptive applies only to SAM"),
    (["--momentum", "0", "--nesterov"], "--nesterov needs momentum > 0"),
    (["--workers", "8"], "--workers applies only to --loader workers"),
    (["--augment", "none", "--padding-mode", "constant"], "--padding-mode applies only"),
    (["--wandb-mode", "disabled", "--wandb-project", "p"], "--wandb-project needs W&B"),
    (["--allow-changes"], "unrecognized arguments: --allow-changes"),
    (["--device", "meta"], "not supported"),
])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(tiny_data, tmp_path, capsys, args, message):
    out = tmp_path / "runs"
    argv = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(out), "--wandb-mode", "disabled", *args]
    assert main_code(argv) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("text, message", [
    ("model: resnet18\nlearning_rate: 0.1\n", "unknown key 'learning_rate'"),
    ("lr: fast\n", "lr in"),
    ("epochs: 1.5\n", "epochs in"),
    ("nesterov: 1\n", "nesterov in"),
    ("augment: mixup\n", "augment in"),
    ("- a list\n", "mapping"),
    ("lr: [0.1\n", "not valid YAML"),
    ("base: nowhere.yaml\n", "nowhere.yaml (the base: of"),
    ("base: bad.yaml\n", "loops back"),
])
def test_bad_config_files(tiny_data, tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code = main_code(["--config", str(path), "--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "runs")])
    assert code == 2 and message in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_missing_data_is_one_line_exit_2(tmp_path, capsys):
    code = main_code([*TINY, "--data-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path / "runs")])
    assert code == 2 and "--download" in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_existing_run_is_never_overwritten(tiny_data, tmp_path, capsys):
    common = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "r", "--epochs", "1",
              "--wandb-mode", "disabled"]
    assert train.main(common) == 0
    before = files(tmp_path / "r")
    capsys.readouterr()
    assert train.main(common) == 0  # the same command again: that run, finished, nothing to do
    assert f"run {tmp_path / 'r'} is finished (1 of 1 epochs); nothing to do" in capsys.readouterr().out
    assert train.main([*common, "--seed", "3"]) == 2  # another experiment under that --name: refused
    assert "holds a finished run of other settings (seed 0 -> 3)" in one_line_error(capsys)
    assert files(tmp_path / "r") == before


def test_resume_without_a_checkpoint_is_exit_2(tiny_data, tmp_path, capsys):
    code = main_code([*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--resume"])
    assert code == 2 and "no checkpoint" in one_line_error(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_dir_is_one_line_exit_2(tiny_data, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main_code([*TINY, "--data-dir", str(tiny_data), "--out-dir", str(locked / "runs")]) == 2
        assert "not a writable folder" in one_line_error(capsys)
    finally:
        locked.chmod(0o755)


def test_out_dir_under_a_file_is_one_line_exit_2(tiny_data, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main_code([*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "file" / "runs")]) == 2
    assert "not a writable folder" in one_line_error(capsys)


def full_disk_at(monkeypatch, write):
    """The disk fills during the `write`-th atomic write of a checkpoint: its bytes are written, then
    the file system refuses them (as fsync reports a full disk)."""
    import engine.checkpoint
    real_fsync, seen = os.fsync, {"n": 0}

    def fsync(fd):
        if re.fullmatch(r"\.last\.pt\..*\.tmp", Path(os.readlink(f"/proc/self/fd/{fd}")).name):  # its temporary file
            seen["n"] += 1
            if seen["n"] == write:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(engine.checkpoint.os, "fsync", fsync)


def test_a_full_disk_leaves_no_partial_file_and_the_last_checkpoint_intact(tiny_data, tmp_path, capsys,
                                                                            monkeypatch):
    common = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "full",
              "--wandb-mode", "disabled", "--epochs", "3"]
    monkeypatch.setattr(train, "project", lambda run: None)
    full_disk_at(monkeypatch, 2)  # the second epoch's checkpoint
    assert main_code(common) == 1
    line = one_line_error(capsys)
    assert re.search(r"No space left on device: the disk holding \S+full has [0-9]+ [KM]iB free, and the write "
                     r"needed [0-9]+ [KM]iB; the last good checkpoint \S+ is intact; free space", line), line
    assert line.endswith(f"then continue with: python train.py --resume {tmp_path / 'full'}")
    assert [p.name for p in (tmp_path / "full").iterdir() if p.name.endswith(".tmp")] == []
    assert torch.load(tmp_path / "full" / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.undo()
    assert train.main(["--resume", str(tmp_path / "full")]) == 0  # space is back: it continues


def test_a_disk_full_before_the_first_checkpoint_says_to_run_the_command_again(tiny_data, tmp_path, capsys,
                                                                               monkeypatch):
    common = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "full",
              "--wandb-mode", "disabled", "--epochs", "2"]
    monkeypatch.setattr(train, "project", lambda run: None)
    full_disk_at(monkeypatch, 1)
    assert main_code(common) == 1
    line = one_line_error(capsys)
    assert "nothing was checkpointed" in line and "--resume" not in line and line.endswith("run the same command again")
    assert not (tmp_path / "full" / "last.pt").exists()
    assert [p.name for p in (tmp_path / "full").iterdir() if p.name.endswith(".tmp")] == []
    monkeypatch.undo()
    assert train.main(common) == 0  # the same command again: it starts over in its folder


def test_a_torn_or_binary_line_in_metrics_does_not_stop_a_resume(tiny_data, tmp_path, monkeypatch):
    common = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "b", "--wandb-mode",
              "disabled"]
    monkeypatch.setattr(train, "project", lambda run: None)
    assert train.main([*common, "--epochs", "1"]) == 0
    (tmp_path / "b" / "results.json").unlink()  # as if stopped after its last checkpoint
    with open(tmp_path / "b" / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 99, "kind": "st\xff\xfe\n\x00\x01{"step"')
    assert train.main([*common, "--epochs", "1", "--resume"]) == 0
    rows = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6, 6]


@pytest.mark.parametrize("where", ["load_cifar", "project"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                                    signal.SIGQUIT, signal.SIGXCPU])
def test_a_stop_signal_while_starting_stops_at_once_in_one_line_and_writes_nothing(tiny_data, tmp_path, capsys,
                                                                                     monkeypatch, where, signum):
    """Before the first step (reading the data, measuring the CPU projection) there is nothing to
    checkpoint: any stop signal ends the start at once (the code after the signal never runs), one line."""
    ran_on = []

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signum)
        ran_on.append(where)
    monkeypatch.setattr(train, where, signalled)
    code = main_code([*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "runs"), "--wandb-mode",
                      "disabled"])
    assert code == (130 if signum == signal.SIGINT else 75)
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"{signal.Signals(signum).name} while starting: stopped before the first step; nothing was written"
    assert ran_on == []
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.5, 2.0, 3.5, 5.0])
def test_sigterm_at_any_moment_of_a_real_start_is_an_answer_never_a_traceback(tiny_data, tmp_path, delay):
    """SIGTERM to a real `python train.py` at some moment of its start (the delay only spreads the moments;
    every outcome below is accepted whenever it lands): killed by the signal's default while Python still
    imports torch (nothing written, exit 143), stopped while starting (exit 75, one line, no checkpoint), or
    stopped after a step (exit 75, that step checkpointed). Never a traceback or an error line."""
    import time
    proc = start_cli([*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "runs"), "--name", "t",
                      "--wandb-mode", "disabled"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert "Traceback" not in err and "error:" not in err and "bug:" not in err, err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    if proc.returncode == -signal.SIGTERM:
        assert not (tmp_path / "runs").exists() and last == ""
    elif last.startswith("SIGTERM while starting"):
        assert proc.returncode == 75 and not (tmp_path / "runs" / "t" / "last.pt").exists()
    elif proc.returncode == 75:
        assert last.startswith("stopped by SIGTERM") and (tmp_path / "runs" / "t" / "last.pt").is_file(), err
    else:
        assert proc.returncode == 0, err  # the whole tiny run ended before the signal came


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_run_resumes(tiny_data, tmp_path):
    out = tmp_path / "runs"
    common = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(out), "--name", "c", "--log-every", "1",
              "--wandb-mode", "disabled", "--epochs", "6"]
    proc = start_cli(common, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(out / "c" / "metrics.jsonl", 8, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "stopped by SIGINT after step" in stderr
    ack = stderr.index("SIGINT: stopping after the step in flight (a step takes about ")
    assert "press Ctrl-C again to stop now" in stderr[ack:] and ack < stderr.index("stopped by SIGINT")
    assert f"python train.py --resume {out / 'c'}" in stderr
    resumed = run_cli(["--resume", str(out / "c")])
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "c" / "results.json").read_text())["epochs"] == 6


@pytest.mark.slow
def test_the_cpu_duration_is_measured_once_per_process(tiny_data, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train, "project", lambda *args: calls.append(args))
    assert train.main([*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "3",
                       "--wandb-mode", "disabled"]) == 0
    assert len(calls) == 1


def test_a_long_cpu_run_says_what_it_would_take_before_its_first_step(tiny_data, tmp_path):
    # resnet18: days at 100000 epochs on any CPU (wrn10_1 can project to hours on a fast, idle one)
    big = ["--model", "resnet18", *TINY[4:]]
    proc = start_cli([*big, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "100000",
                      "--name", "long", "--wandb-mode", "disabled"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "note: on this CPU" in line:
            break
    first_step_logged = (tmp_path / "long" / "metrics.jsonl").exists()
    proc.kill()
    proc.wait()
    note = "".join(lines)
    assert re.search(r"the 100000 epochs to go would take about [0-9.]+ (days|h) \(measured: one pass", note), note
    assert "For a smoke test of the whole pipeline: python train.py --config " \
           "configs/resnet18_sam.yaml --subset 512 --batch-size 64 --epochs 2" in note
    assert not first_step_logged  # the projection comes before the first step


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, --device auto is the GPU")
def test_a_cpu_run_of_days_that_fell_back_to_the_cpu_is_refused(tiny_data, tmp_path, capsys):
    args = ["--model", "resnet18", *[arg for arg in TINY[4:] if arg not in ("--device", "cpu")]]  # days, on any CPU
    assert main_code([*args, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "runs"), "--epochs", "100000",
                      "--wandb-mode", "disabled"]) == 2
    line = one_line_error(capsys)
    assert line.startswith("error: no GPU here, and on this CPU the 100000 epochs to go would take about ")
    assert "python train.py --config configs/resnet18_sam.yaml --subset 512" in line and "--device cpu" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, --device auto is the GPU")
def test_the_papers_run_pasted_on_a_cpu_is_refused_naming_the_smoke_command(tmp_path):
    """`python train.py` (the paper's WRN-28-10, 200 epochs) on full-size CIFAR-10 files: the projection
    is measured, the run refused in one line, and no folder made (no time limit: the order is the test)."""
    data = write_cifar10(tmp_path / "data", per_batch=10000)
    result = run_cli(["--data-dir", str(data), "--out-dir", str(tmp_path / "runs"), "--wandb-mode", "disabled"])
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert re.search(r"the 200 epochs to go would take about [0-9.]+ days", line), line
    assert "python train.py --config configs/resnet18_sam.yaml --subset 512" in line
    assert not (tmp_path / "runs").exists()


# ---- settings ------------------------------------------------------------------------------------

def test_sgd_runs_and_records_no_rho(tiny_data, tmp_path):
    assert train.main([*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "sgd",
                       "--optimizer", "sgd", "--epochs", "1", "--wandb-mode", "disabled"]) == 0
    results = json.loads((tmp_path / "sgd" / "results.json").read_text())
    assert results["optimizer"] == "sgd" and results["rho"] == 0.0
    assert not any("sam/ascent_grad_norm" in r for r in read_jsonl(tmp_path / "sgd" / "metrics.jsonl"))


def test_validation_split_is_evaluated(tiny_data, tmp_path):
    assert train.main([*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "v",
                       "--val-split", "0.2", "--epochs", "1", "--wandb-mode", "disabled"]) == 0
    last = [r for r in read_jsonl(tmp_path / "v" / "metrics.jsonl") if "val/acc" in r]
    assert len(last) == 1 and "best_val_acc" in json.loads((tmp_path / "v" / "results.json").read_text())


def test_config_records_the_data_folder_actually_used(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("SAM_DATA_DIR", str(tiny_data))
    assert train.main([*TINY, "--out-dir", str(tmp_path), "--name", "env", "--epochs", "1",
                       "--wandb-mode", "disabled"]) == 0
    assert yaml.safe_load((tmp_path / "env" / "config.yaml").read_text())["data_dir"] == str(tiny_data)


def test_the_seed_command_line_parses_verbatim():
    config = parse_config("--epochs 200 --lr 0.1 --batch_size 128 --rho 0.05".split()).config
    assert (config["epochs"], config["lr"], config["batch_size"], config["rho"]) == (200, 0.1, 128, 0.05)
    assert (config["model"], config["dataset"], config["optimizer"], config["augment"]) == \
        ("sam_wrn28_10", "cifar10", "sam", "basic")


def test_no_arguments_is_the_papers_headline_run():
    parsed = parse_config([])
    config = parsed.config
    assert config["model"] == "sam_wrn28_10" and config["epochs"] == 200 and config["optimizer"] == "sam"
    assert config["rho"] == 0.05 and config["augment"] == "basic" and parsed.resume is None
    assert (config["lr"], config["batch_size"], config["weight_decay"], config["momentum"]) == (0.1, 256, 5e-4, 0.9)


def test_configs_hold_only_what_differs_from_their_base():
    """Each key of a config changes something: a value equal to what the base file (or the
    SETTINGS default) already gives would be a second home for one value."""
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        if path.parent.name == "sweeps":  # W&B sweep definitions, not train.py configs
            continue
        text = yaml.safe_load(path.read_text()) or {}
        base = load_yaml(path.parent / text["base"]) if "base" in text else {}
        inherited = {k: base.get(k, s.default) for k, s in SETTINGS.items()}
        for key, value in text.items():
            if key != "base":
                assert value != inherited[key], f"{path.name}: {key}: {value!r} repeats what it inherits"
        if path.parent.name != "sharpness":  # the paper's configs train 200 epochs; sharpness/ is a CPU demo
            assert parse_config(["--config", str(path)]).config["epochs"] == 200, path


def test_help_shows_one_line_per_setting_with_the_default_the_plain_run_uses():
    """`python train.py --help` fits on two screens, and the default it prints for each setting is
    the value `python train.py` runs with: one source of defaults, no hidden config file."""
    text = build_parser().format_help()
    lines = text.splitlines()
    assert len(lines) <= 80
    plain = parse_config([]).config
    for name, spec in SETTINGS.items():
        flag = "--" + name.replace("_", "-")
        own = [line for line in lines if line.split()[:1] in ([flag], [f"--[no-]{name.replace('_', '-')}"])]
        assert len(own) == 1, (name, own)
        shown = re.search(r"\(default: (.*)\)$", own[0]).group(1)
        value = plain[name]
        if value is None:
            assert shown.startswith("unset: "), (name, shown)
        else:
            assert shown == (repr(value) if isinstance(value, float) else str(value)), (name, shown, value)
    assert "--resume [RUN]" in text and "--allow-changes" not in text and "--check" in text


def test_docs_settings_page_is_generated_from_the_settings():
    """docs/settings.md is what `python -m engine.config --markdown` writes now (regenerate it when a
    setting changes), and it names every setting with its default and source."""
    from engine.config import settings_markdown
    page = (REPO / "docs" / "settings.md").read_text()
    assert page == settings_markdown(), "docs/settings.md is stale: python -m engine.config --markdown > docs/settings.md"
    assert "| `rho` | `0.05` | SAM neighbourhood size (SAM only) | [0, 10] | yes | Foret et al. 2021 Appendix C.1" in page
    assert all(f"| `{name}` |" in page for name in SETTINGS)


def test_the_paper_run_is_the_defaults_and_its_config_file_changes_nothing():
    plain = parse_config([]).config
    assert plain == parse_config(["--config", str(REPO / "configs" / "wrn28-10_sam.yaml")]).config
    assert plain["m_sharpness"] == 32 and plain["model"] == "sam_wrn28_10"


def test_adaptive_flag_scales_weights_but_not_biases():
    from engine.step import build_training, resolve_runtime
    config = parse_config(["--model", "wrn10_1", "--adaptive", "--rho", "2.0", "--device", "cpu"]).config
    training = build_training(config, 10, resolve_runtime(config), total_steps=10)
    model, opt = training.model, training.optimizer
    by_id = {id(p): n for n, p in model.named_parameters()}
    adaptive = {by_id[id(p)] for g in opt.param_groups if g["adaptive"] for p in g["params"]}
    plain = {by_id[id(p)] for g in opt.param_groups if not g["adaptive"] for p in g["params"]}
    assert "fc.weight" in adaptive and "bn.weight" in adaptive and plain == {"fc.bias", "bn.bias"} | {
        n for n in by_id.values() if n.endswith("bias")}
    assert all(g["rho"] == 2.0 for g in opt.param_groups)


def test_wandb_mode_resolution(monkeypatch, tmp_path):
    from engine.tracker import wandb_mode
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(None) == "offline"          # no credentials: offline, never a prompt
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == "disabled" and wandb_mode("offline") == "offline"
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "y" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode(None) == "online"


def test_online_without_credentials_is_exit_2_not_a_prompt(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    code = train.main([*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "runs"),
                       "--wandb-mode", "online"])
    assert code == 2 and "wandb login" in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_compiled_step_matches_eager(tiny_data, tmp_path):
    """torch.compile (CPU, default mode) through train.py, one SAM step: the same weights as eager
    within 3e-4 (measured: 5e-5 from inductor's reordered float sums; a SAM step differs from an
    SGD step by 3e-3 here, so the test can tell them apart), and BatchNorm statistics updated
    once, by the first pass."""
    common = ["--model", "wrn10_1", "--batch-size", "32", "--subset", "32", "--eval-batch-size", "40",
              "--device", "cpu", "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "1",
              "--wandb-mode", "disabled"]
    assert train.main([*common, "--name", "eager"]) == 0
    assert train.main([*common, "--name", "compiled", "--compile", "default"]) == 0
    a = torch.load(tmp_path / "eager" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "compiled" / "last.pt", weights_only=True)["model"]
    for key in a:
        if key.endswith("num_batches_tracked"):
            assert a[key].item() == b[key].item() == 1, key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=3e-4, msg=key)


def test_a_wandb_setting_under_wandb_disabled_by_the_environment_is_refused(monkeypatch):
    """$WANDB_MODE is a source of the mode like the flag (which wins): a W&B setting it makes idle is refused."""
    from engine.config import ConfigError
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for flags in (["--wandb-project", "p"], ["--wandb-tags", "a,b"], ["--save-artifact"]):
        with pytest.raises(ConfigError, match=r"needs W&B, but \$WANDB_MODE is disabled"):
            parse_config(flags)
    assert parse_config(["--wandb-project", "p", "--wandb-mode", "offline"]).config["wandb_project"] == "p"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert parse_config(["--wandb-project", "p"]).config["wandb_project"] == "p"
