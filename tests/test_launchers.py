"""The SLURM launcher of the sweep scripts, through submitit's local executor (the same code path
minus sbatch): jobs run, finished runs are skipped, and a preempted job is requeued and resumes to
the weights of a run never interrupted."""

import argparse
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from conftest import write_cifar10
from engine import slurm
from test_resume import assert_same_run
from test_scripts import data_for_the_checks, folder_of, script  # noqa: F401 (the autouse fixture: data for the checks)
from test_train import TINY, run_cli, wait_for_step

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
def test_a_preempted_job_is_requeued_and_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    """submitit's preemption signal (SIGUSR2) to the job's process: the job asks train.py to stop,
    train.py checkpoints the step in flight, submitit requeues the job, and the next attempt resumes."""
    data = write_cifar10(tmp_path / "data", per_batch=40)
    out = tmp_path / "runs"
    args = [*TINY, "--data-dir", str(data), "--epochs", "4", "--log-every", "1", "--wandb-mode", "disabled",
            "--out-dir", str(out)]
    assert run_cli([*args, "--name", "whole"]).returncode == 0
    options = argparse.Namespace(launcher="slurm-local", out_dir=str(out), partition=None, account=None,
                                 constraint=None, gpus_per_run=1, cpus_per_run=None, time=60, slurm_arg=[],
                                 dry_run=False)
    ((name, job),) = slurm.submit([("job", [*args, "--name", "job"])], options)
    controller = job._process
    wait_for_step(out / "job" / "metrics.jsonl", 9, controller, timeout=180)
    (task,) = [int(p) for p in open(f"/proc/{controller.pid}/task/{controller.pid}/children").read().split()]
    os.kill(task, signal.SIGUSR2)  # what SLURM sends a job before it is preempted or timed out
    assert job.result() == "job: finished"
    log = "".join(p.read_text() for p in sorted((out / "job" / "slurm").glob("*_log.*")))
    assert "Requeued job" in log and "stopped by SIGTERM after step" in log and log.count("=== ") == 2
    assert_same_run(out / "whole", out / "job")


def test_the_slurm_dry_run_prints_each_jobs_submitit_parameters_and_creates_nothing(tmp_path):
    out = tmp_path / "runs"
    result = script("seeds.sh", "configs/resnet18_sam.yaml", "--out-dir", str(out), "--launcher",
                    "slurm", "--partition", "gpu", "--gpus-per-run", "4", "--time", "240", "--account", "lab",
                    "--constraint", "h100", "--slurm-arg", "qos=high", "--dry-run", "--", *FLAGS,
                    env_extra={"SEEDS": "0 1"})
    assert result.returncode == 0, result.stderr
    jobs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [j["run"] for j in jobs] == [Path(folder_of(["--config", "configs/resnet18_sam.yaml", "--seed", str(s),
                                                        *FLAGS])).name for s in (0, 1)]
    assert jobs[0]["submitit"] == {"name": jobs[0]["run"], "timeout_min": 240, "gpus_per_node": 4, "nodes": 1,
                                   "tasks_per_node": 1, "slurm_partition": "gpu", "slurm_account": "lab",
                                   "slurm_constraint": "h100", "slurm_additional_parameters": {"qos": "high"}}
    assert jobs[0]["command"][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--partition", "gpu"], "--partition is a SLURM option: add --launcher slurm"),
    (["--launcher", "slurm", "--gpus", "0,1"], "--gpus chooses this machine's GPUs for the local queue"),
    (["--launcher", "pbs"], "argument --launcher: invalid choice: 'pbs'"),
    (["--launcher", "slurm", "--time", "0"], "--gpus-per-run and --time take whole numbers >= 1"),
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
