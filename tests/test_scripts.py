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
TINY_SUFFIX = "+model=wrn10_1+batch-size=32+epochs=1"  # what TINY adds to a run's name


@pytest.fixture(scope="module", autouse=True)
def data_for_the_checks(tmp_path_factory):
    """The scripts check every run before any starts, data files included: $SAM_DATA_DIR holds some."""
    folder = write_cifar10(tmp_path_factory.mktemp("script_data"), per_batch=20)
    os.environ["SAM_DATA_DIR"] = str(folder)
    yield folder
    os.environ.pop("SAM_DATA_DIR", None)


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
        f"{sys.executable} train.py --epochs 3 --config configs/wrn28-10_sam.yaml --optimizer sam --rho {rho} "
        f"--val-split 0.1 --seed 0 --out-dir runs --name wrn28-10_sam-rho{rho}-val0.1-seed0+epochs=3 "
        f"--wandb-group rho-wrn28-10_sam+epochs=3"
        for rho in ("0.01", "0.02", "0.05", "0.1", "0.2", "0.5")]


def test_dry_run_of_the_m_sweep_lists_m_by_rho():
    lines = script("sweep_m.sh", "configs/wrn28-10_sam.yaml", "--dry-run").stdout.strip().splitlines()
    pairs = [(line.split("--m-sharpness ")[1].split()[0], line.split("--rho ")[1].split()[0]) for line in lines]
    assert pairs == [(m, rho) for m in ("16", "32", "64", "128", "256")
                     for rho in ("0.01", "0.02", "0.05", "0.1", "0.2", "0.5")]
    assert all("--wandb-group m-wrn28-10_sam" in line and "--optimizer sam" in line for line in lines)
    assert script("sweep_m.sh", "configs/wrn28-10_sam.yaml", "--m", "0", "--dry-run").returncode == 2


def test_run_names_carry_the_experiment_flags_given_after_the_double_dash():
    lines = script("seeds.sh", "configs/resnet18_sam.yaml", "--seeds", "1", "--dry-run", "--", "--model", "wrn16_8",
                   "--data-dir", os.environ["SAM_DATA_DIR"], "--lr=0.2", "--adaptive", "--wandb-mode",
                   "offline").stdout.split()
    assert lines[lines.index("--name") + 1] == "resnet18_sam-seed0+model=wrn16_8+lr=0.2+adaptive"
    assert lines[lines.index("--wandb-group") + 1] == "seeds-resnet18_sam+model=wrn16_8+lr=0.2+adaptive"


def test_the_scripts_operational_flags_are_the_settings_that_do_not_change_a_run():
    from engine.config import SETTINGS
    text = (REPO / "scripts" / "lib.sh").read_text()
    listed = set(text.split('OPERATIONAL_FLAGS="')[1].split('"')[0].replace("\\", " ").split())
    expected = set()
    for name, spec in SETTINGS.items():
        if not spec.experiment:
            flag = "--" + name.replace("_", "-")
            expected |= {flag, "--no-" + flag[2:]} if spec.type is bool else {flag}
    assert listed == expected


@pytest.mark.slow
def test_dry_run_of_seeds_and_sgd_vs_sam():
    seeds = script("seeds.sh", "configs/resnet18_sam.yaml", "--dry-run").stdout.strip().splitlines()
    assert len(seeds) == 5 and all("--wandb-group seeds-resnet18_sam" in line for line in seeds)
    assert [line.split("--seed ")[1].split()[0] for line in seeds] == ["0", "1", "2", "3", "4"]
    table = script("sgd_vs_sam.sh", "configs/wrn28-10_sam.yaml", "--augment", "cutout", "--seeds", "2",
                   "--dry-run").stdout.strip().splitlines()
    assert [line.split("--optimizer ")[1].split()[0] for line in table] == ["sgd", "sam", "sgd"] * 2
    assert all("--augment cutout" in line and "--wandb-group table1-wrn28-10-cutout" in line for line in table)
    assert table[0].split("--name ")[1].split()[0] == "wrn28-10-cutout-sgd-seed0"
    # Section 3.1: SGD also at twice the epochs, the config's length with the flags after -- applied
    assert table[2].split("--name ")[1].split()[0] == "wrn28-10-cutout-sgd2x-seed0" and "--epochs 400" in table[2]
    short = script("sgd_vs_sam.sh", "configs/wrn28-10_sam.yaml", "--seeds", "1", "--dry-run", "--", "--epochs",
                   "3").stdout.strip().splitlines()
    words = short[2].split()
    assert words[words.index("--epochs", 3):][:2] == ["--epochs", "6"]  # after the user's --epochs 3: it wins
    once = script("sgd_vs_sam.sh", "configs/wrn28-10_sam.yaml", "--seeds", "1", "--double-sgd", "no", "--dry-run")
    assert len(once.stdout.strip().splitlines()) == 2


def test_scripts_explain_themselves_and_reject_bad_input():
    assert script("table4.sh", "--help").stdout.startswith("usage:")
    assert "takes no CONFIG" in script("table4.sh", "configs/resnet18_sam.yaml").stderr
    assert "unknown option" in script("table4.sh", "--bogus").stderr
    for name in ("sweep_rho.sh", "seeds.sh", "sgd_vs_sam.sh", "sweep_m.sh"):
        assert script(name, "--help").stdout.startswith("usage:")
        missing = script(name)
        assert missing.returncode == 2 and missing.stderr.startswith("error: missing CONFIG")
        assert script(name, "configs/nope.yaml").returncode == 2
        assert "unknown option" in script(name, "configs/resnet18_sam.yaml", "--bogus").stderr


@pytest.mark.parametrize("name, args, message", [
    ("seeds.sh", ["--seeds", "abc"], "--seeds takes a whole number >= 1, got 'abc'"),
    ("seeds.sh", ["--seeds", "0"], "--seeds takes a whole number >= 1"),
    ("seeds.sh", ["--gpus", "0,,1"], "--gpus takes GPU indices"),
    ("seeds.sh", ["--out-dir"], "option --out-dir needs a value"),
    ("seeds.sh", ["--seeds"], "option --seeds needs a value"),
    ("sgd_vs_sam.sh", ["--augment", "mixup"], "--augment must be one of: basic cutout autoaugment"),
    ("sweep_rho.sh", ["--grid", " "], "--grid needs at least one value"),
    ("sweep_rho.sh", ["--grid", "0.05 big"], "--grid value takes a non-negative number, got 'big'"),
    ("sweep_rho.sh", ["--val-split", "-1"], "--val-split takes a non-negative number"),
    ("sweep_rho.sh", ["--seed", "x"], "--seed takes a whole number"),
])
def test_script_options_are_checked(name, args, message):
    result = script(name, "configs/resnet18_sam.yaml", "--dry-run", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1


@pytest.mark.slow
def test_queue_checks_every_run_first_reports_failures_skips_finished_and_resumes(tmp_path):
    data = write_cifar10(tmp_path / "data", per_batch=20)
    out = tmp_path / "runs"
    seed0, seed1 = (f"resnet18_sam-seed{s}{TINY_SUFFIX}" for s in (0, 1))
    (out / seed1).mkdir(parents=True)
    (out / seed1 / "last.pt").write_bytes(b"not a checkpoint")  # an interrupted run, broken
    args = ["configs/resnet18_sam.yaml", "--seeds", "2", "--out-dir", str(out), "--", *TINY,
            "--data-dir", str(data)]
    first = script("seeds.sh", *args)  # the check finds it before any run starts
    assert first.returncode == 2 and first.stdout == ""
    assert first.stderr.startswith(f"error: {seed1}: --resume: ") and "not a readable train.py checkpoint" in first.stderr
    assert [p.name for p in out.iterdir()] == [seed1] and [p.name for p in (out / seed1).iterdir()] == ["last.pt"]
    # a failure only a run can meet: its metrics file cannot be written (a folder in its place)
    (out / seed1 / "last.pt").unlink()
    (out / seed1 / "metrics.jsonl").mkdir()
    second = script("seeds.sh", *args)
    assert second.returncode == 1
    assert "finished: 1 run(s), skipped (already finished): 0, failed: 1" in second.stdout
    assert f"failed: {seed1}" in second.stdout and (out / seed0 / "results.json").is_file()
    (out / seed1 / "metrics.jsonl").rmdir()
    third = script("seeds.sh", *args)
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"skip {seed0} (finished)" in third.stdout
    assert "finished: 1 run(s), skipped (already finished): 1, failed: 0" in third.stdout
    assert (out / seed1 / "results.json").is_file()
    log = (out / seed1 / "stdout.log").read_text()  # the retry kept the failed attempt's log
    assert log.count("=== ") == 2 and "metrics.jsonl" in log


@pytest.mark.slow
def test_queue_resumes_an_interrupted_run(tmp_path):
    data = write_cifar10(tmp_path / "data", per_batch=20)
    out = tmp_path / "runs"
    extra = [*TINY[:5], "2", *TINY[6:]]  # TINY with 2 epochs
    name = "resnet18_sam-seed0+model=wrn10_1+batch-size=32+epochs=2"
    env = {**os.environ, "WANDB_SILENT": "true"}
    one = subprocess.run([sys.executable, "train.py", "--config", "configs/resnet18_sam.yaml", *extra, "--data-dir",
                          str(data), "--out-dir", str(out), "--name", name, "--seed", "0"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    state = torch.load(out / name / "last.pt", weights_only=True)
    (out / name / "results.json").unlink()  # as if killed after the last checkpoint: no results yet
    dry = script("seeds.sh", "configs/resnet18_sam.yaml", "--seeds", "1", "--out-dir", str(out), "--dry-run", "--",
                 *extra)
    assert "--resume" in dry.stdout.split()
    run = script("seeds.sh", "configs/resnet18_sam.yaml", "--seeds", "1", "--out-dir", str(out), "--", *extra,
                 "--data-dir", str(data))
    assert run.returncode == 0, run.stdout
    assert json.loads((out / name / "results.json").read_text())["epochs"] == 2
    assert torch.equal(torch.load(out / name / "last.pt", weights_only=True)["model"]["fc.weight"],
                       state["model"]["fc.weight"])  # nothing was trained again


@pytest.mark.slow
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


@pytest.mark.slow
def test_torchrun_two_processes_identical_replicas_and_resume(tmp_path):
    data = write_cifar10(tmp_path / "data", per_batch=40)
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "train.py", "--model", "wrn10_1", "--batch-size", "32", "--m-sharpness", "8", "--device", "cpu",
            "--wandb-mode", "disabled",
            "--data-dir", str(data), "--out-dir", str(tmp_path / "runs"), "--name", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*base, "--epochs", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "replicas identical: 2 ranks" in first.stdout
    resumed = subprocess.run([*base, "--epochs", "2", "--resume", "--allow-changes"], cwd=REPO, env=env, capture_output=True,
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
    assert "| cifar10 | wrn28_10 | basic | SGD | - | - | ? | 3 | - | 4.00 ± 2.48 | - |" in out
    # SAM: mean 2.50, s = 0.5774, t(3) = 3.182: 3.182 * 0.5774 / 2 = 0.92
    assert "| cifar10 | wrn28_10 | basic | SAM | 0.05 | - | ? | 4 | - | 2.50 ± 0.92 | - |" in out
    # Welch: se^2 = 1/3 + 1/12 = 0.4167, df = 0.4167^2 / ((1/3)^2/2 + (1/12)^2/3) = 2.9 -> t(2)
    se = math.sqrt(1 / 3 + 1 / 12)
    assert f"| cifar10 | wrn28_10 | basic | 0.05 | - | None (of None) | 4.00 ± 2.48 | 1.50 ± {4.303 * se:.2f} |" in out
    assert out.index("| SGD |") < out.index("| SAM |")


def test_summarize_takes_the_better_sgd_length_as_the_baseline(tmp_path, capsys):
    """Section 3.1: SGD at 200 and at 400 epochs, the better reported; here 400 wins."""
    base = dict(dataset="cifar10", model="wrn28_10", augment="basic")
    for seed in range(2):
        for optimizer, epochs, err in (("sgd", 200, 0.040 + seed / 1000), ("sgd", 400, 0.036 + seed / 1000),
                                       ("sam", 200, 0.030 + seed / 1000)):
            rho = 0.05 if optimizer == "sam" else 0.0
            settings = {**base, "optimizer": optimizer, "rho": rho, "epochs": epochs}
            write_results(tmp_path, f"{optimizer}{epochs}-{seed}", **settings, seed=seed, final_test_error=err,
                          settings=settings)
    assert summarize.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # SGD 400: 3.6, 3.7; SAM: 3.0, 3.1; Welch: se = sqrt(0.005/2 * 2) = 0.0707, df 2, t 4.303: 0.30
    assert "| cifar10 | wrn28_10 | basic | 0.05 | - | 400 (of 200/400) | 3.65 ± 0.64 | 0.60 ± 0.30 |" in out


def test_summarize_never_pools_different_experiments_and_counts_each_seed_once(tmp_path, capsys):
    """A 2-epoch run and two 1-epoch runs (seed 0 twice) are two experiments: one run with one
    seed, and one with one unique seed; the 1-epoch group mixes commits, which is said."""
    settings = dict(dataset="cifar10", model="wrn28_10", augment="basic", optimizer="sam", rho=0.05)
    write_results(tmp_path, "long", **settings, seed=0, final_test_error=0.03, git_commit="a",
                  settings={**settings, "epochs": 2, "label_noise": 0.0})
    for name, commit in (("short", "a"), ("short-again", "b")):
        write_results(tmp_path, name, **settings, seed=0, final_test_error=0.05, git_commit=commit,
                      settings={**settings, "epochs": 1, "label_noise": 0.0})
    assert summarize.main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "| cifar10 | wrn28_10 | basic | SAM | 0.05 | epochs=1 | ? | 1 | - | 5.00 | - |" in captured.out
    assert "| cifar10 | wrn28_10 | basic | SAM | 0.05 | epochs=2 | ? | 1 | - | 3.00 | - |" in captured.out
    assert "seed 0 appears twice" in captured.err and "counted once" in captured.err
    assert "mix code versions (git commits)" not in captured.err  # the duplicate was dropped before the check


def test_summarize_warns_when_an_experiment_mixes_commits_or_data(tmp_path, capsys):
    settings = dict(dataset="cifar10", model="wrn28_10", augment="basic", optimizer="sam", rho=0.05)
    for seed, (commit, md5) in enumerate([("a", {"f": "1"}), ("b", {"f": "1"}), ("a", {"f": "2"})]):
        write_results(tmp_path, f"s{seed}", **settings, seed=seed, final_test_error=0.03, git_commit=commit,
                      dataset_md5=md5, settings=settings)
    assert summarize.main([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "mix code versions (git commits)" in err and "mix data sets (file checksums)" in err


def test_summarize_without_results_is_exit_2(tmp_path, capsys):
    assert summarize.main([str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err
