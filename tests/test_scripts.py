"""Sweep scripts, the run queue, torchrun, and the results table."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, write_cifar10

sys.path.insert(0, str(REPO / "scripts"))
import summarize  # noqa: E402

TINY = ["--model", "wrn10_1", "--batch-size", "32", "--epochs", "1", "--device", "cpu", "--wandb-mode", "disabled"]


def script(name, *args, env_extra=None):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "WANDB_SILENT": "true",
           **(env_extra or {})}
    return subprocess.run(["bash", f"scripts/{name}", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_dry_run_of_the_rho_sweep_prints_the_papers_grid():
    result = script("sweep_rho.sh", "configs/wrn28-10_sam.yaml", "--dry-run", "--", "--epochs", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines == [
        f"{sys.executable} train.py --config configs/wrn28-10_sam.yaml --optimizer sam --rho {rho} --val-split 0.1 "
        f"--seed 0 --out-dir runs --name wrn28-10_sam-rho{rho}-val0.1-seed0 --wandb-group rho-wrn28-10_sam --epochs 3"
        for rho in ("0.01", "0.02", "0.05", "0.1", "0.2", "0.5")]


def test_dry_run_of_seeds_and_sgd_vs_sam():
    seeds = script("seeds.sh", "configs/resnet18_sam.yaml", "--dry-run").stdout.strip().splitlines()
    assert len(seeds) == 5 and all("--wandb-group seeds-resnet18_sam" in line for line in seeds)
    assert [line.split("--seed ")[1].split()[0] for line in seeds] == ["0", "1", "2", "3", "4"]
    table = script("sgd_vs_sam.sh", "configs/wrn28-10_sam.yaml", "--augment", "cutout", "--seeds", "2",
                   "--dry-run").stdout.strip().splitlines()
    assert [line.split("--optimizer ")[1].split()[0] for line in table] == ["sgd", "sam", "sgd", "sam"]
    assert all("--augment cutout" in line and "--wandb-group table1-wrn28-10-cutout" in line for line in table)
    assert table[0].split("--name ")[1].split()[0] == "wrn28-10-cutout-sgd-seed0"


def test_scripts_explain_themselves_and_reject_bad_input():
    for name in ("sweep_rho.sh", "seeds.sh", "sgd_vs_sam.sh"):
        assert script(name, "--help").stdout.startswith("usage:")
        missing = script(name)
        assert missing.returncode == 2 and missing.stderr.startswith("error: missing CONFIG")
        assert script(name, "configs/nope.yaml").returncode == 2
        assert "unknown option" in script(name, "configs/resnet18_sam.yaml", "--bogus").stderr


def test_queue_runs_reports_failures_skips_finished_and_resumes(tmp_path):
    data = write_cifar10(tmp_path / "data", per_batch=20)
    out = tmp_path / "runs"
    (out / "resnet18_sam-seed1").mkdir(parents=True)
    (out / "resnet18_sam-seed1" / "last.pt").write_bytes(b"not a checkpoint")  # an interrupted run, broken
    args = ["configs/resnet18_sam.yaml", "--seeds", "2", "--out-dir", str(out), "--", *TINY,
            "--data-dir", str(data)]
    first = script("seeds.sh", *args)
    assert first.returncode == 1
    assert "finished: 1 run(s), skipped (already finished): 0, failed: 1" in first.stdout
    assert "failed: resnet18_sam-seed1" in first.stdout
    assert (out / "resnet18_sam-seed0" / "results.json").is_file()
    # fix the broken run: the re-run skips the finished one and starts this one afresh
    (out / "resnet18_sam-seed1" / "last.pt").unlink()
    second = script("seeds.sh", *args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "skip resnet18_sam-seed0 (finished)" in second.stdout
    assert "finished: 1 run(s), skipped (already finished): 1, failed: 0" in second.stdout
    assert (out / "resnet18_sam-seed1" / "results.json").is_file()


def test_queue_resumes_an_interrupted_run(tmp_path):
    data = write_cifar10(tmp_path / "data", per_batch=20)
    out = tmp_path / "runs"
    common = ["--config", "configs/resnet18_sam.yaml", *TINY, "--data-dir", str(data), "--out-dir", str(out)]
    env = {**os.environ, "WANDB_SILENT": "true"}
    one = subprocess.run([sys.executable, "train.py", *common, "--name", "resnet18_sam-seed0", "--seed", "0"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    (out / "resnet18_sam-seed0" / "results.json").unlink()  # as if killed after its checkpoint
    dry = script("seeds.sh", "configs/resnet18_sam.yaml", "--seeds", "1", "--out-dir", str(out), "--dry-run")
    assert dry.stdout.strip().endswith("--resume")
    run = script("seeds.sh", "configs/resnet18_sam.yaml", "--seeds", "1", "--out-dir", str(out), "--", *TINY,
                 "--data-dir", str(data), "--epochs", "2")
    assert run.returncode == 0, run.stdout
    assert json.loads((out / "resnet18_sam-seed0" / "results.json").read_text())["epochs"] == 2


@pytest.mark.parametrize("gpus, expected", [("0,1", {"0", "1"}), ("3", {"3"})])
def test_queue_spreads_runs_over_the_listed_gpus(tmp_path, gpus, expected):
    """A fake python records which CUDA_VISIBLE_DEVICES each run got."""
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!/bin/sh\necho \"$CUDA_VISIBLE_DEVICES\" >> {tmp_path}/devices\nsleep 1\n")
    fake.chmod(0o755)
    result = script("seeds.sh", "configs/resnet18_sam.yaml", "--seeds", "4", "--gpus", gpus, "--out-dir",
                    str(tmp_path / "runs"), env_extra={"PYTHON": str(fake)})
    assert result.returncode == 0 and "finished: 4 run(s)" in result.stdout
    assert set((tmp_path / "devices").read_text().split()) == expected


def test_torchrun_two_processes_identical_replicas_and_resume(tmp_path):
    data = write_cifar10(tmp_path / "data", per_batch=40)
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "train.py", "--model", "wrn10_1", "--batch-size", "32", "--device", "cpu", "--wandb-mode", "disabled",
            "--data-dir", str(data), "--out-dir", str(tmp_path / "runs"), "--name", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*base, "--epochs", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "replicas identical: 2 ranks" in first.stdout
    resumed = subprocess.run([*base, "--epochs", "2", "--resume"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "replicas identical: 2 ranks" in resumed.stdout
    state = torch.load(tmp_path / "runs" / "ddp" / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 2 * (200 // 32)


def write_results(folder, name, **fields):
    (folder / name).mkdir(parents=True)
    (folder / name / "results.json").write_text(json.dumps(fields))


def test_summarize_means_and_intervals(tmp_path, capsys):
    base = dict(dataset="cifar10", model="wrn28_10", augment="basic")
    for seed, err in enumerate([0.03, 0.04, 0.05]):
        write_results(tmp_path, f"sgd{seed}", **base, optimizer="sgd", rho=0.0, seed=seed, final_test_error=err)
    for seed, err in enumerate([0.02, 0.02, 0.03, 0.03]):
        write_results(tmp_path, f"sam{seed}", **base, optimizer="sam", rho=0.05, seed=seed, final_test_error=err)
    assert summarize.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # SGD: mean 4.00, s = 1.00, t(2) = 4.303: 4.303 / sqrt(3) = 2.48
    assert "| cifar10 | wrn28_10 | basic | SGD | - | 3 | 4.00 ± 2.48 |" in out
    # SAM: mean 2.50, s = 0.5774, t(3) = 3.182: 3.182 * 0.5774 / 2 = 0.92
    assert "| cifar10 | wrn28_10 | basic | SAM | 0.05 | 4 | 2.50 ± 0.92 |" in out
    # Welch: se^2 = 1/3 + 1/12 = 0.4167, df = 0.4167^2 / ((1/3)^2/2 + (1/12)^2/3) = 2.9 -> t(2)
    se = math.sqrt(1 / 3 + 1 / 12)
    assert f"| cifar10 | wrn28_10 | basic | 0.05 | 1.50 ± {4.303 * se:.2f} |" in out
    assert out.index("| SGD |") < out.index("| SAM |")


def test_summarize_without_results_is_exit_2(tmp_path, capsys):
    assert summarize.main([str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err
