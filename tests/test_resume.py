"""Stopping and resuming, against runs never interrupted: a signal that lands mid-epoch or at an
epoch's last step, time-based checkpoints, a resume that would change the experiment (refused), the
data a run trained on, and one live process per run folder."""

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

import train
from conftest import REPO, without_wandb_service, write_cifar10
from engine.stopping import STOP_SIGNALS
from test_train import TINY, read_jsonl, run_cli, start_cli, wait_for_step

TIMING = ("images_per_s", "epoch_time_s", "train_time_s")


@pytest.fixture
def tiny_data(tmp_path):
    return write_cifar10(tmp_path / "data", per_batch=40)  # 200 training images: 6 steps of 32


@pytest.fixture(autouse=True)
def no_projection(monkeypatch):
    monkeypatch.setattr(train, "project", lambda run: None)  # its probe steps are not the run's


def common(tiny_data, out, *extra):
    return [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(out), "--wandb-mode", "disabled", *extra]


def signal_at(monkeypatch, steps, signum=signal.SIGTERM):
    """Deliver `signum` to this process as this process's step number n starts, steps[n] times
    (steps: a set of step numbers, or {n: times})."""
    import engine.step
    real, calls = engine.step.TrainStep.__call__, {"n": 0}
    times = steps if isinstance(steps, dict) else dict.fromkeys(steps, 1)

    def step(self, images, labels, sam=None):
        calls["n"] += 1
        for _ in range(times.get(calls["n"], 0)):
            os.kill(os.getpid(), signum)
        return real(self, images, labels, sam)

    monkeypatch.setattr(engine.step.TrainStep, "__call__", step)
    return calls


def assert_same_run(a_dir, b_dir):
    a = torch.load(a_dir / "last.pt", weights_only=True)
    b = torch.load(b_dir / "last.pt", weights_only=True)
    assert (a["epoch"], a["step"], a["batch"]) == (b["epoch"], b["step"], b["batch"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    rows = [[{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(d / "metrics.jsonl")]
            for d in (a_dir, b_dir)]
    assert rows[0] == rows[1]  # the same steps and epochs logged, once each, with the same values
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a_dir, b_dir))
    own = ("wall_time_s", "run_id")  # each run its own
    assert {k: v for k, v in ra.items() if k not in own} == {k: v for k, v in rb.items() if k not in own}


# ---- a signal: finish the step, checkpoint it, exit; resume that step ----------------------------

@pytest.mark.parametrize("stop_at, where", [(9, "epoch 2, batch 3 of 6"), (6, "epoch 1, batch 6 of 6")])
def test_a_signal_checkpoints_the_step_in_flight_and_the_resumed_run_is_bitwise_the_same(
        tiny_data, tmp_path, monkeypatch, capsys, stop_at, where):
    """Step 9 is mid-epoch with a log window half full (--log-every 4); step 6 is an epoch's last step,
    before its evaluation. Both resume to the weights, momentum, metrics and results of a run never
    stopped."""
    args = common(tiny_data, tmp_path, "--epochs", "3", "--log-every", "4")
    assert train.main([*args, "--name", "whole"]) == 0
    signal_at(monkeypatch, {stop_at})
    capsys.readouterr()
    assert train.main([*args, "--name", "split"]) == 75
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert line == (f"stopped by SIGTERM after step {stop_at} ({where}); {tmp_path / 'split' / 'last.pt'} holds that "
                    f"step. Continue with: python train.py --resume {tmp_path / 'split'}")
    state = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert state["step"] == stop_at and state["batch"] == (stop_at - 1) % 6 + 1
    monkeypatch.undo()
    monkeypatch.setattr(train, "project", lambda run: None)
    assert train.main(["--resume", str(tmp_path / "split")]) == 0
    out = capsys.readouterr().out
    assert f"after step {stop_at} ({where})" in out  # as the stop line said it
    assert "days" not in out  # no ETA from the sliver of an epoch trained after a resume (it said 5000 days)
    assert_same_run(tmp_path / "whole", tmp_path / "split")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(STOP_SIGNALS), st.integers(1, 11))
@example(signal.SIGQUIT, 4)
@example(signal.SIGXCPU, 9)
@example(signal.SIGRTMIN + 3, 6)
def test_any_stop_signal_checkpoints_the_step_in_flight_and_the_run_resumes_bitwise(tiny_data, tmp_path_factory,
                                                                                    signum, stop_at):
    """Whichever signal of those another process may send (Ctrl-\\, a CPU-time limit, a real-time signal,
    ...), at whichever step: that step is checkpointed, the exit code is the documented one, and the
    resumed run ends as the run never stopped."""
    from engine.stopping import exit_code
    out = tmp_path_factory.mktemp("signal")
    args = common(tiny_data, out, "--epochs", "2", "--log-every", "4")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "project", lambda run: None)
        assert train.main([*args, "--name", "whole"]) == 0
        signal_at(mp, {stop_at}, signum)
        assert train.main([*args, "--name", "split"]) == exit_code(signum)
    assert torch.load(out / "split" / "last.pt", weights_only=True)["step"] == stop_at
    assert train.main(["--resume", str(out / "split")]) == 0
    assert_same_run(out / "whole", out / "split")


def test_ctrl_c_checkpoints_too(tiny_data, tmp_path, monkeypatch):
    args = common(tiny_data, tmp_path, "--epochs", "3", "--name", "c")
    signal_at(monkeypatch, {4}, signal.SIGINT)
    assert train.main(args) == 130
    assert torch.load(tmp_path / "c" / "last.pt", weights_only=True)["step"] == 4


LONG_STEP = """
import os, sys, threading, time, torch, engine.step, train
real, calls = engine.step.TrainStep.__call__, [0]
def step(self, images, labels, sam=None):
    calls[0] += 1
    if calls[0] == 8:  # a step of epoch 2 that is one long call into torch, as a WRN's backward on a CPU:
        done = torch.futures.Future()  # its wait() lets no Python signal handler run until it returns
        def release():  # the call returns when the test says so (or after two minutes: a hang guard)
            time.sleep(1)  # the main thread is in the call by now
            print("long call", file=sys.stderr, flush=True)
            for _ in range(600):
                if os.path.exists(os.environ["RELEASE"]):
                    break
                time.sleep(0.2)
            print("released by " + ("the test" if os.path.exists(os.environ["RELEASE"]) else "the guard"),
                  file=sys.stderr, flush=True)
            done.set_result(None)
        threading.Thread(target=release, daemon=True).start()
        done.wait()
        print("long call returned", file=sys.stderr, flush=True)
    return real(self, images, labels, sam)
engine.step.TrainStep.__call__ = step
train.project = lambda run: None
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_is_answered_at_once_inside_a_long_call_and_a_second_one_stops_now(tiny_data, tmp_path, presses):
    """Python runs a signal handler only between bytecodes; the answer to Ctrl-C comes while a long call
    into torch has not returned (it returns only once the test has read the answer: no clock). One press:
    the step ends and is checkpointed; a second: the process ends now, epoch 1's checkpoint intact, and
    the run resumes."""
    run, release = tmp_path / "c", tmp_path / "release"
    proc = subprocess.Popen([sys.executable, "-c", LONG_STEP, *common(tiny_data, tmp_path, "--epochs", "2",
                            "--name", "c")], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**without_wandb_service(os.environ), "WANDB_SILENT": "true", "RELEASE": str(release)})
    lines = []  # tqdm's bar ends in a carriage return, not a line: the markers may follow it
    while not lines or not lines[-1].endswith("long call"):
        lines.append(proc.stderr.readline().rstrip("\n"))
        assert lines[-1] or proc.poll() is None, lines
    for press in range(presses):
        proc.send_signal(signal.SIGINT)
        while not lines[-1].startswith("SIGINT: stopping after the step in flight" if press == 0 else "interrupted"):
            lines.append(proc.stderr.readline().rstrip("\n"))
            assert not lines[-1].endswith("long call returned"), lines  # the answer came only after the call
            assert lines[-1] or proc.poll() is None, lines
    release.touch()  # the long call may return now
    lines += proc.stderr.read().splitlines()
    assert proc.wait(timeout=300) == 130 and not any("Traceback" in line for line in lines), lines
    assert "(no step has ended yet)" not in lines[-2] or presses == 2  # a step of epoch 2: its pace is known
    if presses == 1:
        assert "released by the test" in lines and any(line.endswith("long call returned") for line in lines), lines
        assert lines[-1].startswith("stopped by SIGINT after step 8"), lines
        assert torch.load(run / "last.pt", weights_only=True)["step"] == 8
    else:
        assert not any(line.endswith("long call returned") for line in lines), lines
        assert lines[-1] == (f"interrupted in epoch 2, at step 7; the last good checkpoint {run / 'last.pt'} is "
                             f"intact and holds step 6 (step 7 is lost). Continue with: python train.py --resume "
                             f"{run}"), lines
        assert torch.load(run / "last.pt", weights_only=True)["step"] == 6  # epoch 1's, whole
    assert train.main(["--resume", str(run)]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signals_from_outside_land_anywhere_and_the_run_resumes_bitwise(tiny_data, tmp_path, signum):
    """As a cluster sends them: from another process, at times read from the run's own log, twice."""
    out = tmp_path / "runs"
    args = [*TINY, "--data-dir", str(tiny_data), "--epochs", "4", "--out-dir", str(out), "--log-every", "1",
            "--wandb-mode", "offline"]
    assert run_cli([*args, "--name", "whole"]).returncode == 0
    for after in (5, 14):
        log = tmp_path / f"attempt-{after}.log"
        with open(log, "w") as sink:
            proc = start_cli([*args, "--name", "split"] + (["--resume"] if after > 5 else []), stdout=sink,
                             stderr=subprocess.STDOUT)
        wait_for_step(out / "split" / "metrics.jsonl", after, proc, log=log)
        proc.send_signal(signum)
        assert proc.wait(timeout=120) == 75, log.read_text()[-2000:]
        stopped = [line for line in log.read_text().splitlines() if line.startswith("stopped by")]
        assert len(stopped) == 1 and signal.Signals(signum).name in stopped[0]
    assert run_cli([*args, "--name", "split", "--resume"]).returncode == 0
    assert_same_run(out / "whole", out / "split")


@pytest.mark.slow
def test_under_torchrun_every_rank_stops_at_the_same_step_and_the_run_resumes(tiny_data, tmp_path):
    """SIGUSR1 to rank 1 only: rank 0 learns of it through the per-step agreement, both stop after the
    same step, rank 0 checkpoints it (the replicas' BatchNorm statistics averaged), and the resumed
    run ends with the weights of an uninterrupted one, bitwise (gloo sums in a fixed order)."""
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
            *TINY, "--m-sharpness", "16", "--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "runs"),
            "--wandb-mode", "disabled", "--epochs", "3", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run([*base, "--name", "whole"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    log = tmp_path / "split.log"
    with open(log, "w") as sink:
        agent = subprocess.Popen([*base, "--name", "split"], cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    wait_for_step(tmp_path / "runs" / "split" / "metrics.jsonl", 8, agent, log=log)
    workers = [int(p) for p in open(f"/proc/{agent.pid}/task/{agent.pid}/children").read().split()]
    rank1 = next(p for p in workers if b"RANK=1" in open(f"/proc/{p}/environ", "rb").read().split(b"\0"))
    os.kill(rank1, signal.SIGUSR1)
    agent.wait(timeout=120)
    text = log.read_text()
    assert text.count("stopped by SIGUSR1 after step") == 1, text[-3000:]  # rank 0 says it, once
    state = torch.load(tmp_path / "runs" / "split" / "last.pt", weights_only=True)
    assert 8 <= state["step"] < 18 and state["batch"] > 0
    resumed = subprocess.run([*base, "--name", "split", "--resume"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "runs" / "whole" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "runs" / "split" / "last.pt", weights_only=True)
    for key in a["model"]:
        if "running" in key:  # averaged once more at the stop: equal up to rounding
            torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a["model"][key], b["model"][key]), key


# ---- time-based checkpoints ---------------------------------------------------------------------

def test_time_based_checkpoints_write_mid_epoch_and_change_nothing(tiny_data, tmp_path, monkeypatch):
    """--checkpoint-every-min that is due at every step: a checkpoint after each step, atomically,
    and the run is bitwise the one without them. A kill after one of them resumes from its step."""
    args = common(tiny_data, tmp_path, "--epochs", "2", "--log-every", "4")
    assert train.main([*args, "--name", "plain", "--checkpoint-every-min", "0"]) == 0
    saves = []
    real_save = train.checkpoint.save_atomic
    monkeypatch.setattr(train.checkpoint, "save_atomic", lambda state, path: saves.append(
        (state["step"], state["batch"])) or real_save(state, path))
    assert train.main([*args, "--name", "often", "--checkpoint-every-min", "1e-9"]) == 0
    assert saves == [(s, (s - 1) % 6 + 1) for s in range(1, 7)] + [(6, 0)] + \
        [(s, (s - 1) % 6 + 1) for s in range(7, 13)] + [(12, 0)]
    assert_same_run(tmp_path / "plain", tmp_path / "often")


# ---- a resumed run is the same experiment -------------------------------------------------------

def test_a_resume_that_would_change_the_experiment_is_refused_naming_the_setting(tiny_data, tmp_path, capsys):
    """Every experiment setting, changed on resume, is one error line naming it; nothing is written."""
    from engine.config import EXPERIMENT
    args = common(tiny_data, tmp_path, "--epochs", "1", "--name", "r")
    assert train.main(args) == 0
    (tmp_path / "r" / "results.json").unlink()  # as if stopped after its last checkpoint
    before = folder_hashes(tmp_path / "r")
    for flags in (["--epochs", "2"], ["--lr", "0.05"], ["--rho", "0.2"], ["--weight-decay", "0.002"],
                  ["--grad-clip", "0.5"], ["--label-smoothing", "0.1"], ["--seed", "3"], ["--batch-size", "64"],
                  ["--optimizer", "sgd"], ["--momentum", "0.5"], ["--m-sharpness", "8"], ["--augment", "cutout"]):
        capsys.readouterr()
        assert train.main(["--resume", str(tmp_path / "r"), *flags]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        setting = flags[0][2:].replace("-", "_")
        assert setting in EXPERIMENT and len(err) == 1, err
        assert f"settings that change the experiment: {setting} " in err[0], err
    assert folder_hashes(tmp_path / "r") == before
    assert train.main(["--resume", str(tmp_path / "r"), "--log-every", "1"]) == 0  # how it runs may change


def test_a_copied_or_damaged_checkpoint_is_refused(tiny_data, tmp_path, capsys):
    """A checkpoint proves it is whole (its digest) and is this folder's (its run id is config.yaml's)."""
    assert train.main(common(tiny_data, tmp_path, "--epochs", "1", "--name", "a")) == 0
    assert train.main(common(tiny_data, tmp_path, "--epochs", "1", "--name", "b", "--seed", "1")) == 0
    for name in ("a", "b"):
        (tmp_path / name / "results.json").unlink()
    shutil.copy(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    before = folder_hashes(tmp_path / "b")
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path / "b")]) == 2
    assert "is the checkpoint of run" in capsys.readouterr().err and folder_hashes(tmp_path / "b") == before
    data = bytearray((tmp_path / "a" / "last.pt").read_bytes())
    state = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    weight = state["model"]["fc.weight"].numpy().tobytes()
    at = bytes(data).index(weight[:64])  # a byte inside the stored weights, not the archive's structure
    data[at + 3] ^= 0x10
    (tmp_path / "a" / "last.pt").write_bytes(bytes(data))
    assert train.main(["--resume", str(tmp_path / "a")]) == 2
    assert "is damaged" in capsys.readouterr().err


def test_wall_time_adds_up_over_resumes(tiny_data, tmp_path, monkeypatch):
    signal_at(monkeypatch, {8})
    args = common(tiny_data, tmp_path, "--epochs", "2", "--name", "w")
    assert train.main(args) == 75  # stopped in epoch 2
    first = torch.load(tmp_path / "w" / "last.pt", weights_only=True)["wall_time"]
    monkeypatch.undo()
    monkeypatch.setattr(train, "project", lambda run: None)
    assert train.main(["--resume", str(tmp_path / "w")]) == 0
    second_epoch = read_jsonl(tmp_path / "w" / "metrics.jsonl")[-1]["train_time_s"]
    results = json.loads((tmp_path / "w" / "results.json").read_text())
    assert results["wall_time_s"] >= first + second_epoch > first


# ---- the data a run trained on -------------------------------------------------------------------

def relabelled_copy(src, dst):
    shutil.copytree(src, dst)
    path = dst / "cifar-10-batches-py" / "data_batch_1"
    entry = pickle.load(open(path, "rb"), encoding="latin1")
    entry["labels"][0] = (entry["labels"][0] + 1) % 10
    pickle.dump(entry, open(path, "wb"), protocol=2)
    return dst


def test_resuming_on_other_data_is_refused_and_writes_nothing(tiny_data, tmp_path, monkeypatch, capsys):
    other = relabelled_copy(tiny_data, tmp_path / "other")
    signal_at(monkeypatch, {8})
    assert train.main(common(tiny_data, tmp_path, "--epochs", "2", "--name", "r")) == 75  # stopped at step 8
    before = folder_hashes(tmp_path / "r")
    monkeypatch.undo()
    monkeypatch.setattr(train, "project", lambda run: None)
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path / "r"), "--data-dir", str(other)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "(data_batch_1 differ" in err[0] and "point --data-dir at the run's data" in err[0]
    assert folder_hashes(tmp_path / "r") == before  # nothing written
    shutil.copytree(tiny_data, tmp_path / "copy")  # the same files in another folder are the same data
    assert train.main(["--resume", str(tmp_path / "r"), "--data-dir", str(tmp_path / "copy")]) == 0


# ---- one live process per run folder --------------------------------------------------------------

def folder_hashes(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_second_process_on_a_live_run_stops_at_once_naming_the_holder(tiny_data, tmp_path):
    args = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "live", "--epochs", "1000",
            "--log-every", "1", "--wandb-mode", "disabled"]
    log = tmp_path / "first.log"
    with open(log, "w") as sink:
        first = start_cli(args, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for_step(tmp_path / "live" / "metrics.jsonl", 7, first, log=log)  # past its first checkpoint
        start = time.monotonic()
        second = run_cli([*args, "--resume"])
        assert second.returncode == 2 and time.monotonic() - start < 30
        (line,) = second.stderr.strip().splitlines()[-1:]
        assert line.startswith(f"error: run folder {tmp_path / 'live'} is in use by process {first.pid} on ")
        assert run_cli([*args, "--resume", "--check"]).returncode == 2  # --check sees it too
    finally:
        first.kill()  # SIGKILL: no clean-up at all
        first.wait()
    done = torch.load(tmp_path / "live" / "last.pt", weights_only=True)["epoch"]
    again = [*args, "--resume"]
    assert run_cli([*again, "--check"]).returncode == 0  # no stale lock after a kill -9
    steps = torch.load(tmp_path / "live" / "last.pt", weights_only=True)["step"]
    logged = max(r["step"] for r in read_jsonl(tmp_path / "live" / "metrics.jsonl"))  # the killed one's too
    with open(log, "a") as sink:
        resumed = start_cli(again, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for_step(tmp_path / "live" / "metrics.jsonl", logged + 2, resumed, log=log)  # it trains the folder
        resumed.send_signal(signal.SIGTERM)
        assert resumed.wait(timeout=120) == 75
    finally:
        resumed.kill()
    assert done >= 1 and torch.load(tmp_path / "live" / "last.pt", weights_only=True)["step"] > steps


def test_a_run_whose_wandb_mode_came_from_the_environment_resumes_and_is_read(tiny_data, tmp_path, monkeypatch):
    """No --wandb-mode, W&B's own $WANDB_MODE instead: the checkpoint holds wandb_mode null (unset), which
    every reader takes as the setting's own unset value."""
    import evaluate
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = [a for a in common(tiny_data, tmp_path, "--epochs", "1", "--name", "env") if a not in ("--wandb-mode",
                                                                                                    "disabled")]
    assert train.main(args) == 0
    assert torch.load(tmp_path / "env" / "last.pt", weights_only=True)["config"]["wandb_mode"] is None
    assert evaluate.main([str(tmp_path / "env"), "--device", "cpu"]) == 0
    assert train.main(["--resume", str(tmp_path / "env")]) == 0  # finished: nothing to do
