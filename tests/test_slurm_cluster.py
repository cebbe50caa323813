"""The SLURM launcher against a real scheduler: slurmctld and slurmd on this machine (.ci/slurm.sh
starts a one-node cluster with two partitions, the second of higher priority, so that its jobs
preempt the first's). Skipped, saying so, where no SLURM answers.

What a cluster user does, and what must follow: a sweep of CPU runs completes and a second call
submits nothing; `scancel` ends a run for good; `scontrol requeue` and a preemption each resume the
run, which finishes bitwise equal to one never interrupted; a second call while a job is pending
submits nothing; sbatch's refusal is one line and leaves nothing behind."""

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import write_cifar10
from test_resume import assert_same_run
from test_scripts import data_for_the_checks, folder_of, script  # noqa: F401 (the autouse fixture: data for the checks)
from test_train import run_cli


def _cluster():
    """-> (low partition, high partition or None, CPUs of the node), or None when no SLURM answers."""
    if not shutil.which("sbatch"):
        return None
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20).stdout
        parts = subprocess.run(["scontrol", "show", "partition", "-o"], capture_output=True, text=True,
                               timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    if "UP" not in ping:
        return None
    tiers = sorted((int(re.search(r"PriorityTier=(\d+)", line).group(1)), re.search(r"PartitionName=(\S+)", line)
                    .group(1), int(re.search(r"TotalCPUs=(\d+)", line).group(1))) for line in parts.splitlines())
    if not tiers:
        return None
    return tiers[0][1], (tiers[-1][1] if tiers[-1][0] > tiers[0][0] else None), tiers[0][2]


CLUSTER = _cluster()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CLUSTER is None, reason="no SLURM cluster answers here "
                                                   "(scontrol ping); .ci/slurm.sh starts a one-node one")]
CONFIG = "configs/resnet18_sam.yaml"


def flags(data, epochs):
    return ["--model", "wrn10_1", "--batch-size", "32", "--eval-batch-size", "16", "--epochs", str(epochs),
            "--log-every", "1", "--device", "cpu", "--wandb-mode", "disabled", "--data-dir", str(data)]


def sweep(out, seeds, data, epochs, *options):
    return script("seeds.sh", CONFIG, "--out-dir", str(out), "--launcher", "slurm", "--partition", CLUSTER[0],
                  "--time", "30", *options, "--", *flags(data, epochs), env_extra={"SEEDS": seeds})


def run_dir(out, seed, data, epochs):
    return Path(folder_of(["--config", CONFIG, "--seed", str(seed), *flags(data, epochs), "--out-dir", str(out)]))


def job_of(folder):
    (job,) = {p.name.split("_")[0] for p in (folder / "slurm").glob("*_submitted.pkl")}
    return job


def job(job_id):
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def queued(job_id):
    return job_id in subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()


def wait_until(condition, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout} s")


def wait_for_step_of(folder, step, job_id, timeout=180):
    metrics = folder / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and any(f'"step": {step},' in line for line in metrics.read_text()
                                                 .splitlines()) or not queued(job_id), timeout, f"step {step}")
    assert queued(job_id), f"the job ended before step {step}:\n{logs(folder)}"


def start_when_pending(job_id):
    """A requeued job waits about 121 s before it may start again: once it is pending, start it now."""
    wait_until(lambda: job(job_id).get("JobState") == "PENDING", 180, "the requeued job pending")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


def logs(folder):
    return "".join(p.read_text() for p in sorted((folder / "slurm").glob("*_log.*")))


def test_a_sweep_of_cpu_runs_completes_and_a_second_call_submits_nothing(tmp_path):
    data, out = write_cifar10(tmp_path / "data", per_batch=20), tmp_path / "runs"
    first = sweep(out, "0 1", data, 1)
    assert first.returncode == 0 and first.stdout.count("submitted ") == 2, first.stdout + first.stderr
    folders = [run_dir(out, seed, data, 1) for seed in (0, 1)]
    for folder in folders:
        wait_until(lambda: not queued(job_of(folder)), 300, "the job done")
        assert (folder / "results.json").is_file(), logs(folder)
        assert job(job_of(folder))["ExitCode"] == "0:0"
        assert "--gpus" not in (folder / "slurm" / f"{job_of(folder)}_submission.sh").read_text()  # no GPU asked
    second = sweep(out, "0 1", data, 1)
    assert second.returncode == 0 and "submitted" not in second.stdout, second.stdout
    assert all(f"skip {folder.name} (finished)" in second.stdout for folder in folders)


def test_scancel_ends_a_run_for_good(tmp_path):
    data, out = write_cifar10(tmp_path / "data", per_batch=40), tmp_path / "runs"
    assert sweep(out, "0", data, 40).returncode == 0
    folder = run_dir(out, 0, data, 40)
    job_id = job_of(folder)
    wait_for_step_of(folder, 3, job_id)
    subprocess.run(["scancel", job_id], check=True)
    wait_until(lambda: not queued(job_id), 90, "the cancelled job gone from the queue")
    state = job(job_id)
    assert state["JobState"] == "CANCELLED" and state["Restarts"] == "0", state
    text = logs(folder)
    assert "stopped by SIGTERM after step" in text and "cancelled (SIGTERM" in text, text  # checkpointed, final
    assert (folder / "last.pt").is_file() and not (folder / "results.json").exists()
    assert "Traceback" not in text, text


@pytest.mark.parametrize("interruption, says", [
    ("scontrol requeue", "SLURM requeued the job"), ("preemption", "SLURM requeued the job"),
    ("time limit", "its time limit is near; requeued")])
def test_a_requeued_preempted_or_timed_out_run_resumes_to_the_weights_of_an_uninterrupted_run(
        tmp_path, interruption, says):
    if interruption == "preemption" and CLUSTER[1] is None:
        pytest.skip("this cluster has one partition priority tier, so nothing preempts")
    data, out, ref = write_cifar10(tmp_path / "data", per_batch=40), tmp_path / "runs", tmp_path / "ref"
    # the warning is due 30 s into the run and SLURM sends it up to a minute late: that run lasts longer
    epochs = 200 if interruption == "time limit" else 6
    assert run_cli(["--config", CONFIG, "--seed", "0", *flags(data, epochs), "--out-dir", str(ref)],
                   timeout=1800).returncode == 0
    # the run takes the whole node, so a job of the higher-priority partition must preempt it
    assert sweep(out, "0", data, epochs, "--cpus-per-run", str(CLUSTER[2])).returncode == 0
    folder = run_dir(out, 0, data, epochs)
    job_id = job_of(folder)
    wait_for_step_of(folder, 5, job_id)
    if interruption == "scontrol requeue":
        subprocess.run(["scontrol", "requeue", job_id], check=True)
    elif interruption == "time limit":  # 2 minutes: SLURM's warning (90 s before) is due now
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=2"], check=True)
    else:
        subprocess.run(["sbatch", "-p", CLUSTER[1], "-c", str(CLUSTER[2]), "-o", str(tmp_path / "urgent.out"),
                        "--wrap", "sleep 1"], check=True, capture_output=True)
    start_when_pending(job_id)
    if interruption == "time limit":
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=30"], check=True)
    wait_until(lambda: (folder / "results.json").is_file() or not queued(job_id), 1800, "the resumed run done")
    wait_until(lambda: not queued(job_id), 60, "the job gone from the queue")
    state, text = job(job_id), logs(folder)
    assert (folder / "results.json").is_file(), text
    assert state["Restarts"] == "1" and state["ExitCode"] == "0:0", state  # requeued once, and nothing failed
    assert says in text and "Traceback" not in text, text
    assert_same_run(ref / folder.name, folder)


def test_a_second_call_while_a_job_is_pending_submits_nothing(tmp_path):
    data, out = write_cifar10(tmp_path / "data", per_batch=20), tmp_path / "runs"
    later = ("--slurm-arg", "begin=now+3600")  # pending for an hour
    assert sweep(out, "0", data, 1, *later).returncode == 0
    folder = run_dir(out, 0, data, 1)
    job_id = job_of(folder)
    try:
        assert job(job_id)["JobState"] == "PENDING"
        second = sweep(out, "0", data, 1, *later)
        assert second.returncode == 0 and f"skip {folder.name} (job {job_id} is PENDING)" in second.stdout, second
        assert "submitted" not in second.stdout and job_of(folder) == job_id
    finally:
        subprocess.run(["scancel", job_id])


def test_sbatch_refusing_a_job_is_one_line_and_leaves_nothing_behind(tmp_path):
    data, out = write_cifar10(tmp_path / "data", per_batch=20), tmp_path / "runs"
    result = script("seeds.sh", CONFIG, "--out-dir", str(out), "--launcher", "slurm", "--partition", "nosuch",
                    "--", *flags(data, 1), env_extra={"SEEDS": "0 1"})
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert result.stderr.startswith("error: sbatch refused the job of ") and result.stderr.count("\n") == 1, \
        result.stderr
    assert "partition" in result.stderr.lower() and not out.exists()
