"""The SLURM launcher of the sweep scripts, through submitit's local executor (the same code path
minus sbatch): jobs run, finished runs are skipped, and a preempted job is requeued and resumes to
the weights of a run never interrupted."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_cifar10
from engine import slurm
from test_resume import assert_same_run
from test_scripts import data_for_the_checks, folder_of, script, script_env  # noqa: F401 (the autouse fixture: data for the checks)
from conftest import REPO
from test_train import run_cli, wait_for_step

FLAGS = ["--model", "wrn10_1", "--batch-size", "32", "--epochs", "1", "--device", "cpu", "--wandb-mode", "disabled"]


@pytest.mark.slow
def test_seeds_through_slurm_local_run_and_a_second_call_skips_them(tmp_path):
    out = tmp_path / "runs"
    args = ["configs/resnet18_sam.yaml", "--out-dir", str(out), "--launcher", "slurm-local", "--", *FLAGS]
    first = script("seeds.sh", *args, env_extra={"SEEDS": "0 1"})
    assert first.returncode == 0, first.stdout + first.stderr
    assert "finished: 2 run(s), skipped (already finished): 0, failed: 0" in first.stdout
    names = [Path(folder_of(["--config", "configs/resnet18_sam.yaml", "--seed", str(s), *FLAGS, "--out-dir",
                             str(out)])).name for s in (0, 1)]
    for name in names:
        assert (out / name / "results.json").is_file()
        assert list((out / name / "slurm").glob("*_log.out"))  # the job's log, in the run folder
    second = script("seeds.sh", *args, env_extra={"SEEDS": "0 1"})
    assert second.returncode == 0 and "finished: 0 run(s), skipped (already finished): 2, failed: 0" in second.stdout
    assert all(f"skip {name} (finished)" in second.stdout for name in names)


@pytest.mark.slow
def test_a_signalled_local_job_stops_at_its_checkpoint_and_the_same_command_resumes_it_bitwise(tmp_path):
    """Outside SLURM nothing requeues a job: a signal to it stops the run at the checkpoint of the step in
    flight, the sweep reports it, and the same command finishes it with the weights of a run never
    stopped. (Requeues by SLURM itself: tests/test_slurm_cluster.py, against a real scheduler.)"""
    data = write_cifar10(tmp_path / "data", per_batch=40)
    out, ref = tmp_path / "runs", tmp_path / "ref"
    flags = ["--model", "wrn10_1", "--batch-size", "32", "--epochs", "4", "--log-every", "1", "--device", "cpu",
             "--wandb-mode", "disabled", "--data-dir", str(data)]
    assert run_cli(["--config", "configs/resnet18_sam.yaml", "--seed", "0", *flags, "--out-dir", str(ref)]).returncode == 0
    args = ["configs/resnet18_sam.yaml", "--out-dir", str(out), "--launcher", "slurm-local", "--", *flags]
    first = subprocess.Popen(["bash", "scripts/seeds.sh", *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                             env={**script_env(), "SEEDS": "0"})
    folder = Path(folder_of(["--config", "configs/resnet18_sam.yaml", "--seed", "0", *flags, "--out-dir", str(out)]))
    wait_for_step(folder / "metrics.jsonl", 9, first, timeout=180)
    (job,) = [p for p in psutil_children(first.pid) if "submitit.core._submit" in open(f"/proc/{p}/cmdline").read()]
    os.kill(job, signal.SIGUSR2)  # what a cluster sends a job before its end
    report = first.communicate(timeout=180)[0]
    assert first.returncode == 1 and f"FAIL  {folder.name}" in report, report
    log = "".join(p.read_text() for p in sorted((folder / "slurm").glob("*_log.*")))
    assert "stopped by SIGTERM after step" in log and "not under SLURM" in log, log
    assert (folder / "last.pt").is_file() and not (folder / "results.json").exists()
    second = script("seeds.sh", *args, env_extra={"SEEDS": "0"})
    assert second.returncode == 0 and "finished: 1 run(s)" in second.stdout, second.stdout + second.stderr
    assert_same_run(ref / folder.name, folder)


def psutil_children(pid):
    """Every descendant of a process, from /proc."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in os.listdir(f"/proc/{p}/task"):
            try:
                kids = [int(k) for k in open(f"/proc/{p}/task/{task}/children").read().split()]
            except OSError:
                kids = []
            found += kids
            todo += kids
    return found


@pytest.mark.parametrize("facts, progressed, decision", [
    ({}, True, "final"),                                                      # not under SLURM
    ({"state": "COMPLETING", "restarts": 1, "restarts_at_start": 0, "seconds_left": None}, True, "requeued"),
    ({"state": "COMPLETING", "restarts": 3, "restarts_at_start": 2, "seconds_left": 5000}, False, "requeued"),
    ({"state": "COMPLETING", "restarts": 0, "restarts_at_start": 0, "seconds_left": 0}, True, "final"),  # scancel
    ({"state": "RUNNING", "restarts": 0, "restarts_at_start": 0, "seconds_left": 85}, True, "requeue"),  # time limit
    ({"state": "RUNNING", "restarts": 2, "restarts_at_start": 2, "seconds_left": 85}, False, "final"),  # no progress
    ({"state": "RUNNING", "restarts": 0, "restarts_at_start": 0, "seconds_left": 3000}, True, "final"),  # scancel -s
])
def test_who_requeues_a_stopped_job(facts, progressed, decision):
    """SLURM requeued it (its restart count moved): nobody else; the time limit: the job, once per
    attempt that made progress; anything else is a person's cancel, final."""
    assert slurm.after_stop({**facts, "signal": "SIGTERM"}, progressed)[0] == decision


def test_the_slurm_dry_run_prints_each_jobs_submitit_parameters_and_creates_nothing(tmp_path):
    out, flags = tmp_path / "runs", [f for f in FLAGS if f not in ("--device", "cpu")]  # runs for GPUs
    result = script("seeds.sh", "configs/resnet18_sam.yaml", "--out-dir", str(out), "--launcher",
                    "slurm", "--partition", "gpu", "--gpus-per-run", "4", "--time", "240", "--account", "lab",
                    "--constraint", "h100", "--slurm-arg", "qos=high", "--dry-run", "--", *flags,
                    env_extra={"SEEDS": "0 1"})
    assert result.returncode == 0, result.stderr
    jobs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [j["run"] for j in jobs] == [Path(folder_of(["--config", "configs/resnet18_sam.yaml", "--seed", str(s),
                                                        *flags])).name for s in (0, 1)]
    assert jobs[0]["submitit"] == {"name": jobs[0]["run"], "timeout_min": 240, "gpus_per_node": 4, "nodes": 1,
                                   "tasks_per_node": 1, "slurm_partition": "gpu", "slurm_account": "lab",
                                   "slurm_signal_delay_s": 90, "slurm_constraint": "h100",
                                   "slurm_additional_parameters": {"qos": "high"}}
    assert jobs[0]["command"][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert not out.exists()


def test_a_cpu_runs_job_asks_for_no_gpu(tmp_path):
    """A CPU partition has no GPUs to give: the job of a --device cpu run asks for none."""
    result = script("seeds.sh", "configs/resnet18_sam.yaml", "--out-dir", str(tmp_path / "runs"), "--launcher",
                    "slurm", "--partition", "cpu", "--cpus-per-run", "8", "--dry-run", "--", *FLAGS,
                    env_extra={"SEEDS": "0"})
    assert result.returncode == 0, result.stderr
    (job,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert "gpus_per_node" not in job["submitit"] and job["submitit"]["cpus_per_task"] == 8
    assert job["command"][1] == "train.py"


@pytest.mark.parametrize("args, message", [
    (["--partition", "gpu"], "--partition is a SLURM option: add --launcher slurm"),
    (["--launcher", "slurm", "--gpus", "0,1"], "--gpus chooses this machine's GPUs for the local queue"),
    (["--launcher", "pbs"], "argument --launcher: invalid choice: 'pbs'"),
    (["--launcher", "slurm", "--time", "0"], "--time 0 is too short"),
    (["--launcher", "slurm", "--time", "1"], "--time 1 is too short: SLURM warns a job 90 s before its limit"),
    (["--launcher", "slurm", "--gpus-per-run", "0"], "--gpus-per-run takes a whole number >= 1"),
    (["--launcher", "slurm", "--slurm-arg", "gpus-per-node=0"], "--slurm-arg gpus-per-node=0: the GPUs a job asks"),
    (["--launcher", "slurm", "--slurm-arg=--gres=gpu:2"], "--slurm-arg --gres=gpu:2: the GPUs a job asks"),
    (["--launcher", "slurm", "--slurm-arg", "time=60"], "--slurm-arg time=60: use --time"),
    (["--launcher", "slurm", "--slurm-arg", "signal=TERM@60"], "--slurm-arg signal=TERM@60: the launcher sets it"),
    (["--launcher", "slurm", "--slurm-arg", "qos=a", "--slurm-arg", "qos=b"], "--slurm-arg qos is given twice"),
    (["--launcher", "slurm-local", "--gpus-per-run", "2"], "--gpus-per-run would do nothing for a run with --device cpu"),
    (["--launcher", "slurm", "--gpus-per-run", "two"], "argument --gpus-per-run: invalid int value: 'two'"),
    (["--launcher", "slurm", "--slurm-arg", "qos"], "--slurm-arg takes KEY=VALUE"),
])
def test_bad_launcher_options_are_one_line_errors_and_create_nothing(tmp_path, args, message):
    out = tmp_path / "runs"
    result = script("seeds.sh", "configs/resnet18_sam.yaml", "--out-dir", str(out), *args, "--", *FLAGS,
                    env_extra={"SEEDS": "0"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1, result.stderr
    assert not out.exists()


def test_without_sbatch_the_slurm_launcher_says_so(tmp_path):
    """Whatever this machine has installed: a PATH with python and no sbatch."""
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("bash", "dirname", "basename"):
        (bare / tool).symlink_to(shutil.which(tool))
    (bare / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (bare / "python").chmod(0o755)
    result = script("seeds.sh", "configs/resnet18_sam.yaml", "--out-dir", str(tmp_path / "runs"), "--launcher",
                    "slurm", "--", *FLAGS, env_extra={"SEEDS": "0", "PATH": str(bare)})
    assert result.returncode == 2 and result.stderr.startswith("error: no sbatch here"), result.stderr
