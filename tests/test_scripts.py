"""Sweep scripts (scripts/*.sh through engine/sweep.py), the run queue, torchrun, and the results table."""

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import REPO, write_cifar10
import train
from engine import checkpoint, sweep
from engine.config import default_name, parse_config

sys.path.insert(0, str(REPO / "scripts"))
import summarize  # noqa: E402

TINY = ["--model", "wrn10_1", "--batch-size", "32", "--epochs", "1", "--device", "cpu", "--wandb-mode", "disabled"]


@pytest.fixture(scope="module", autouse=True)
def data_for_the_checks(tmp_path_factory):
    """The scripts check every run before any starts, data files included: $SAM_DATA_DIR holds some,
    300 training images, so that the paper's batch of 256 fits beside a validation split of 0.1."""
    folder = write_cifar10(tmp_path_factory.mktemp("script_data"), per_batch=60)
    os.environ["SAM_DATA_DIR"] = str(folder)
    yield folder
    os.environ.pop("SAM_DATA_DIR", None)


FINISH = ("import pathlib, sys; d = pathlib.Path(sys.argv[1]); (d / 'config.yaml').write_text('meta: {wandb_id: r1}'); "
          "(d / 'results.json').write_text('{\"run_id\": \"r1\"}')")  # what a finished run leaves, as finished() reads

def script_env(**extra):
    """A user's environment: `python` on PATH is this interpreter."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "CUDA_VISIBLE_DEVICES": "", "WANDB_SILENT": "true", **extra}


def script(name, *args, env_extra=None):
    """A script as a user runs it."""
    return subprocess.run(["bash", f"scripts/{name}", *args], cwd=REPO, env=script_env(**(env_extra or {})),
                          capture_output=True, text=True, timeout=600)


def dry(name, *args, env_extra=None):
    """A dry run's lines -> [(train.py arguments, run folder)]; in an empty --out-dir unless one is given (the
    repository's own runs/ holds whatever its user left there)."""
    import tempfile
    at = args.index("--") if "--" in args else len(args)
    out = [] if "--out-dir" in args[:at] else ["--out-dir", tempfile.mkdtemp(prefix="dry-")]
    result = script(name, *args[:at], *out, "--dry-run", *args[at:], env_extra=env_extra)
    assert result.returncode == 0, result.stderr
    runs = []
    for line in result.stdout.strip().splitlines():
        command, folder = line.split("  # ")
        words = shlex.split(command)
        assert words[:2] == [sys.executable, "train.py"]
        runs.append((words[2:], folder))
    return runs


def value(words, flag):
    return words[words.index(flag) + 1]


def folder_of(words):
    """Where train.py itself puts a command's run (the independent reference for the sweep's names)."""
    config = parse_config([w for w in words if w != "--resume"]).config
    return str(Path(config["out_dir"]) / default_name(config))


def test_the_rho_sweep_is_the_papers_grid_on_a_validation_split():
    runs = dry("sweep_rho.sh", "configs/wrn28-10_sam.yaml", "--", "--epochs", "3")
    assert [value(w, "--rho") for w, _ in runs] == ["0.01", "0.02", "0.05", "0.1", "0.2", "0.5"]
    for words, folder in runs:
        assert value(words, "--val-split") == "0.1" and value(words, "--wandb-group") == "rho-wrn28-10_sam"
        assert folder == folder_of(words) and "+epochs=3" in folder and "+val_split=0.1" in folder
    assert Path(folder).name == "sam_wrn28_10-cifar10-basic-sam-rho0.5-seed0+epochs=3+val_split=0.1"


def test_the_m_sweep_is_m_by_rho_and_its_variables_set_the_lists():
    runs = dry("sweep_m.sh", "configs/wrn28-10_sam.yaml")
    assert [(value(w, "--m-sharpness"), value(w, "--rho")) for w, _ in runs] == \
        [(m, rho) for m in ("16", "32", "64", "128", "256") for rho in ("0.01", "0.02", "0.05", "0.1", "0.2", "0.5")]
    short = dry("sweep_m.sh", "configs/wrn28-10_sam.yaml", env_extra={"MS": "8 64", "RHOS": "0.1", "SEED": "3"})
    assert [(value(w, "--m-sharpness"), value(w, "--seed")) for w, _ in short] == [("8", "3"), ("64", "3")]


def test_sgd_vs_sam_trains_sgd_at_both_lengths_sam_and_late_sam():
    runs = dry("sgd_vs_sam.sh", "configs/wrn28-10_sam.yaml",
               env_extra={"SEEDS": "0 1", "AUGMENT": "cutout", "LATE_SAM": "150"})
    assert [(value(w, "--optimizer"), value(w, "--epochs")) for w, _ in runs] == \
        [("sgd", "200"), ("sam", "200"), ("sgd", "400"), ("sam", "200")] * 2
    assert all(value(w, "--augment") == "cutout" and value(w, "--wandb-group") == "table1-wrn28-10-cutout"
               for w, _ in runs)
    assert value(runs[3][0], "--sam-start-epoch") == "150" and len({f for _, f in runs}) == 8
    short = dry("sgd_vs_sam.sh", "configs/wrn28-10_sam.yaml", env_extra={"SEEDS": "0", "EPOCHS": "3",
                                                                         "DOUBLE_SGD": "yes"})
    assert [value(w, "--epochs") for w, _ in short] == ["3", "3", "6"]
    assert len(dry("sgd_vs_sam.sh", "configs/wrn28-10_sam.yaml", env_extra={"SEEDS": "0", "DOUBLE_SGD": "no"})) == 2


def test_table4s_bootstrap_runs_learn_from_the_folders_of_its_own_stage_1_runs():
    runs = dry("table4.sh", "--", "--epochs", "2", env_extra={"SEEDS": "0", "LEVELS": "0.2 0.8", "ALPHAS": "8"})
    folders = [f for _, f in runs]
    stage2 = [(w, f) for w, f in runs if "--relabel-from" in w]
    assert len(runs) == 10 and len(stage2) == 4 and len(set(folders)) == 10
    for words, folder in stage2:
        source = value(words, "--relabel-from")
        assert source in folders and source != folder  # a stage-1 run of this very sweep
        stage1 = next(w for w, f in runs if f == source)
        assert [w for w in words if w not in ("--relabel-from", source)] == stage1
    assert value(next(w for w, _ in runs if value(w, "--label-noise") == "0.8" and "sam_80" in value(w, "--config")),
                 "--seed") == "0"


FLAG_SPELLINGS = {"--batch-size": "--batch_size"}


@settings(max_examples=40, deadline=None)
@given(st.permutations([("--batch-size", "64"), ("--subset", "256"), ("--lr", "0.2"), ("--epochs", "1"),
                        ("--label-smoothing", "0.1"), ("--device", "cpu")]),
       st.lists(st.booleans(), min_size=6, max_size=6), st.integers(0, 6), st.sampled_from(["0", "7"]))
def test_the_same_experiment_always_finds_the_same_folder(flags, forms, cut, seed):
    """Flags in any order and spelling, split anywhere between the script's line and the flags after
    --, name the folder train.py itself would use for the command."""
    words = []
    for (name, val), joined in zip(flags, forms):
        name = FLAG_SPELLINGS.get(name, name) if joined else name
        words.append([f"{name}={val}"] if joined else [name, val])
    line = shlex.join(["--config", "configs/resnet18_sam.yaml", "--seed", seed, *sum(words[:cut], [])])
    options, extra = sweep.parse(["--out-dir", "somewhere", "--", *sum(words[cut:], [])])
    (run,) = sweep.resolve([line], extra, options)
    assert str(run.dir) == folder_of([*shlex.split(line), *extra, "--out-dir", "somewhere"])
    assert run.name == f"resnet18-cifar10-basic-sam-rho0.05-seed{seed}+epochs=1+batch_size=64+lr=0.2+m_sharpness=0" \
                       "+label_smoothing=0.1+subset=256"  # settings order, whatever the flags' order


def test_a_script_and_a_plain_command_of_one_experiment_share_a_folder():
    ((args, folder),) = dry("seeds.sh", "configs/resnet18_sam.yaml", "--", "--batch_size=64", "--subset", "256",
                            env_extra={"SEEDS": "0"})
    out = ["--out-dir", str(Path(folder).parent)]
    assert folder == folder_of(args) == folder_of(["--subset=256", "--seed", "0", "--config",
                                                   "configs/resnet18_sam.yaml", "--batch-size", "64", *out])


@pytest.mark.parametrize("name, args, env, message", [
    ("seeds.sh", [], {}, "give a config file first"),
    ("seeds.sh", ["configs/nope.yaml"], {}, "give a config file first"),
    ("seeds.sh", ["configs/resnet18_sam.yaml", "--bogus"], {}, "unrecognized arguments: --bogus"),
    ("seeds.sh", ["configs/resnet18_sam.yaml"], {"SEEDS": " "}, "no runs"),
    ("seeds.sh", ["configs/resnet18_sam.yaml"], {"SEEDS": "abc"}, "run 1 (--config configs/resnet18_sam.yaml --seed abc)"),
    ("seeds.sh", ["configs/resnet18_sam.yaml"], {"SEEDS": "99999999999999999999"}, "seed must be in [0, 4294967295]"),
    ("seeds.sh", ["configs/resnet18_sam.yaml"], {"SEEDS": "1 1"}, "are the same experiment"),
    ("seeds.sh", ["configs/resnet18_sam.yaml", "--gpus", "0,,1"], {}, "--gpus must name distinct GPUs"),
    ("seeds.sh", ["configs/resnet18_sam.yaml", "--gpus", "0,0"], {}, "--gpus must name distinct GPUs"),
    ("seeds.sh", ["configs/resnet18_sam.yaml", "--out-dir"], {}, "argument --out-dir: expected one argument"),
    ("seeds.sh", ["configs/resnet18_sam.yaml", "--", "--seed", "3"], {}, "--seed after -- is set by this script"),
    ("seeds.sh", ["configs/resnet18_sam.yaml", "--", "--seed=3"], {}, "--seed after -- is set by this script"),
    ("seeds.sh", ["configs/resnet18_sam.yaml", "--", "--name", "x"], {}, "--name after -- is not for train.py here"),
    ("seeds.sh", ["configs/resnet18_sam.yaml", "--", "--out-dir", "x"], {}, "give the sweep's own --out-dir"),
    ("seeds.sh", ["configs/resnet18_sam.yaml", "--", "--resume"], {}, "resumes interrupted runs itself"),
    ("seeds.sh", ["configs/resnet18_sam.yaml", "--", "--lr", "abc"], {}, "argument --lr: invalid float value"),
    ("sgd_vs_sam.sh", ["configs/resnet18_sam.yaml"], {"AUGMENT": "mixup"}, "argument --augment: invalid choice"),
    ("sgd_vs_sam.sh", ["configs/resnet18_sam.yaml"], {"DOUBLE_SGD": "maybe"}, "DOUBLE_SGD is yes or no"),
    ("sgd_vs_sam.sh", ["configs/resnet18_sam.yaml"], {"EPOCHS": "2x"}, "argument --epochs: invalid int value"),
    ("sgd_vs_sam.sh", ["configs/resnet18_sam.yaml", "--", "--epochs", "3"], {}, "--epochs after -- is set by"),
    ("sweep_rho.sh", ["configs/resnet18_sam.yaml"], {"RHOS": "0.05 big"}, "argument --rho: invalid float value"),
    ("sweep_rho.sh", ["configs/resnet18_sam.yaml"], {"VAL_SPLIT": "1.5"}, "val_split must be in [0, 1)"),
    ("sweep_m.sh", ["configs/resnet18_sam.yaml"], {"MS": "7"}, "m_sharpness 7 must divide"),
    ("table4.sh", ["--", "--relabel-from", "x"], {"SEEDS": "0"}, "--relabel-from after -- is set by this script"),
    ("table4.sh", [], {"LEVELS": "1.5"}, "label_noise must be in [0, 1], got 1.5"),
])
def test_bad_script_input_is_one_line_and_creates_nothing(tmp_path, name, args, env, message):
    out = tmp_path / "runs"
    result = script(name, *args[:1], "--out-dir", str(out), *args[1:], env_extra=env) if args[:1] != ["--"] and \
        args and not args[0].startswith("configs/nope") else script(name, *args, env_extra=env)
    assert result.returncode == 2 and result.stdout == "", (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert not out.exists()


def test_a_run_that_waits_for_its_source_starts_once_the_source_has_finished(tmp_path, monkeypatch):
    """The local queue: two slots, and a Bootstrap run queued first whose source is queued second."""
    order = tmp_path / "order"

    def command(run):
        return ["sh", "-c", f"sleep 1; echo {run.name} $CUDA_VISIBLE_DEVICES >> {order}; "
                            f"{shlex.quote(sys.executable)} -c {shlex.quote(FINISH)} {run.dir}"]
    monkeypatch.setattr(sweep.Run, "command", command)
    source = sweep.Run([], tmp_path / "source", {"relabel_from": None})
    runs = [sweep.Run([], tmp_path / "bootstrap", {"relabel_from": str(source.dir)}),
            sweep.Run([], tmp_path / "other", {"relabel_from": None}), source]
    assert sweep.run_local(runs, ["0", "1"]) == 0
    lines = order.read_text().split()
    assert lines[::2].index("bootstrap") > lines[::2].index("source") and set(lines[1::2]) <= {"0", "1"}
    assert sweep.run_local(runs, ["0"]) == 0  # all finished: skipped
    assert order.read_text().count("\n") == 3


def test_a_run_whose_source_is_neither_finished_nor_in_the_sweep_waits_and_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep.Run, "command", lambda run: [sys.executable, "-c", FINISH, str(run.dir)])
    runs = [sweep.Run([], tmp_path / "bootstrap", {"relabel_from": str(tmp_path / "elsewhere")}),
            sweep.Run([], tmp_path / "plain", {"relabel_from": None})]
    assert sweep.run_local(runs, ["cpu"]) == 0
    out = capsys.readouterr().out
    assert "waiting: bootstrap" in out and "finished: 1 run(s)" in out and not (tmp_path / "bootstrap").exists()


@pytest.mark.parametrize("gpus, expected", [("0,1", {"0", "1"}), ("3", {"3"}), ("", {""})])
def test_the_queue_spreads_runs_over_the_listed_gpus(tmp_path, monkeypatch, gpus, expected):
    devices = tmp_path / "devices"
    monkeypatch.setattr(sweep.Run, "command", lambda run: ["sh", "-c", f"echo \"[$CUDA_VISIBLE_DEVICES]\" >> "
                                                                         f"{devices}; sleep 1"])
    options, _ = sweep.parse(["--gpus", gpus] if gpus else [])
    assert sweep.run_local([sweep.Run([], tmp_path / str(i), {"relabel_from": None}) for i in range(4)], options.slots) == 0
    assert {line.strip("[]") for line in devices.read_text().split()} == expected


@pytest.mark.slow
def test_queue_checks_every_run_first_reports_failures_skips_finished_and_resumes(tmp_path):
    data = write_cifar10(tmp_path / "data", per_batch=20)
    out = tmp_path / "runs"
    args = ["configs/resnet18_sam.yaml", "--out-dir", str(out), "--", *TINY, "--data-dir", str(data)]
    seed0, seed1 = (Path(folder_of(["--config", "configs/resnet18_sam.yaml", "--seed", str(s), *TINY,
                                    "--out-dir", str(out)])).name for s in (0, 1))
    (out / seed1).mkdir(parents=True)
    (out / seed1 / "last.pt").write_bytes(b"not a checkpoint")  # an interrupted run, broken
    first = script("seeds.sh", *args, env_extra={"SEEDS": "0 1"})  # the check finds it before any run starts
    assert first.returncode == 2 and first.stdout == ""
    assert first.stderr.startswith(f"error: {seed1}: --resume: ") and "not a readable train.py checkpoint" in first.stderr
    assert [p.name for p in out.iterdir()] == [seed1] and [p.name for p in (out / seed1).iterdir()] == ["last.pt"]
    # a failure only a run can meet: once every run is checked, another process takes seed 1's folder
    (out / seed1 / "last.pt").unlink()
    proc = subprocess.Popen(["bash", "scripts/seeds.sh", *args], cwd=REPO, env=script_env(SEEDS="0 1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith(f"[cpu] start {seed0}")  # checked, seed 1 not started yet
    lock = checkpoint.RunLock(out / seed1).acquire()
    stdout, _ = proc.communicate(timeout=600)
    lock.release()
    assert proc.returncode == 1
    assert "finished: 1 run(s), skipped (already finished): 0, failed: 1" in stdout
    assert f"failed: {seed1}" in stdout and (out / seed0 / "results.json").is_file()
    assert f"\n    error: run folder {out / seed1} is in use by process {os.getpid()}" in stdout  # what it said
    (out / seed1 / ".lock").unlink()
    third = script("seeds.sh", *args, env_extra={"SEEDS": "0 1"})
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"skip {seed0} (finished)" in third.stdout
    assert "finished: 1 run(s), skipped (already finished): 1, failed: 0" in third.stdout
    assert (out / seed1 / "results.json").is_file()
    log = (out / seed1 / "stdout.log").read_text()  # the retry kept the failed attempt's log
    assert log.count("=== ") == 2 and "is in use by process" in log
    # a plain train.py command of the same experiment finds the sweep's folder, finished
    plain = subprocess.run([sys.executable, "train.py", "--seed", "0", *TINY, "--config", "configs/resnet18_sam.yaml",
                            "--out-dir", str(out), "--data-dir", str(data), "--resume"], cwd=REPO, capture_output=True,
                           text=True)
    assert plain.returncode == 0 and f"run {out / seed0} is finished" in plain.stdout


@pytest.mark.slow
def test_queue_resumes_an_interrupted_run(tmp_path):
    data = write_cifar10(tmp_path / "data", per_batch=20)
    out = tmp_path / "runs"
    extra = [*TINY[:5], "2", *TINY[6:]]  # TINY with 2 epochs
    env = {**os.environ, "WANDB_SILENT": "true"}
    one = subprocess.run([sys.executable, "train.py", "--config", "configs/resnet18_sam.yaml", *extra, "--data-dir",
                          str(data), "--out-dir", str(out), "--seed", "0"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    (name,) = [p.name for p in out.iterdir()]
    state = torch.load(out / name / "last.pt", weights_only=True)
    (out / name / "results.json").unlink()  # as if killed after the last checkpoint: no results yet
    ((words, folder),) = dry("seeds.sh", "configs/resnet18_sam.yaml", "--out-dir", str(out), "--", *extra,
                             env_extra={"SEEDS": "0"})
    assert words[-1] == "--resume" and folder == str(out / name)
    run = script("seeds.sh", "configs/resnet18_sam.yaml", "--out-dir", str(out), "--", *extra, "--data-dir", str(data),
                 env_extra={"SEEDS": "0"})
    assert run.returncode == 0, run.stdout
    assert json.loads((out / name / "results.json").read_text())["epochs"] == 2
    assert torch.equal(torch.load(out / name / "last.pt", weights_only=True)["model"]["fc.weight"],
                       state["model"]["fc.weight"])  # nothing was trained again


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
    state = torch.load(tmp_path / "runs" / "ddp" / "last.pt", weights_only=True)
    (tmp_path / "runs" / "ddp" / "results.json").unlink()  # as if stopped after its last checkpoint
    resumed = subprocess.run([*base, "--epochs", "1", "--resume"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "replicas identical: 2 ranks" in resumed.stdout and state["step"] == 200 // 32


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


def test_finished_runs_anywhere_in_the_queue_are_skipped_and_the_rest_run(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep.Run, "command", lambda run: [sys.executable, "-c", FINISH, str(run.dir)])
    runs = [sweep.Run([], tmp_path / str(i), {"relabel_from": None}) for i in range(5)]
    for i in (0, 2, 3):
        runs[i].dir.mkdir()
        subprocess.run([sys.executable, "-c", FINISH, str(runs[i].dir)], check=True)
    assert sum(run.finished() for run in runs) == 3
    assert sweep.run_local(runs, ["cpu"]) == 0
    assert all(run.finished() for run in runs)


def test_a_results_json_of_another_run_does_not_make_a_run_finished(tmp_path):
    """A sweep skips a run only when its folder's results.json names the folder's own run."""
    run = sweep.Run([], tmp_path / "r", {"relabel_from": None})
    run.dir.mkdir()
    subprocess.run([sys.executable, "-c", FINISH, str(run.dir)], check=True)
    assert run.finished()
    (run.dir / "config.yaml").write_text("meta: {wandb_id: r2}")
    assert not run.finished()


SCRIPTS = ["seeds.sh", "sgd_vs_sam.sh", "sweep_m.sh", "sweep_rho.sh", "table4.sh"]


def reads(name):
    """The variables a script's own text reads (${NAME...}): the independent reference for --reads."""
    import re
    return set(re.findall(r"\$\{([A-Z_]+)[-:}]", (REPO / "scripts" / name).read_text())) - {"PATH"}


def test_the_sweeps_list_of_variables_is_what_the_scripts_read_and_each_declares_its_own():
    assert set(sweep.VARIABLES) == set().union(*map(reads, SCRIPTS))
    for name in SCRIPTS:
        import re
        declared = re.search(r'--reads "?([A-Z_ ]+)"?', (REPO / "scripts" / name).read_text()).group(1).split()
        assert set(declared) == reads(name), name


@settings(max_examples=8, deadline=None)
@given(st.sampled_from([(name, var) for name in SCRIPTS for var in sweep.VARIABLES if var not in reads(name)]),
       st.sampled_from(["0", "cutout", "", "1 2"]))
def test_another_scripts_variable_is_refused_as_doing_nothing(tmp_path_factory, case, text):
    """AUGMENT set for seeds.sh (which has no augmentation list), RHOS for sgd_vs_sam.sh, ...: one line
    naming the variable, exit 2, nothing created."""
    name, var = case
    out = tmp_path_factory.mktemp("unread") / "runs"
    args = [] if name == "table4.sh" else ["configs/resnet18_sam.yaml"]
    result = script(name, *args, "--out-dir", str(out), "--dry-run", env_extra={var: text})
    assert result.returncode == 2 and result.stdout == "", (result.stdout, result.stderr)
    assert result.stderr.startswith(f"error: ${var} is set, but this script does not read it") and \
        result.stderr.count("\n") == 1, result.stderr
    assert not out.exists()


def test_a_run_started_by_hand_without_w_and_b_is_resumed_by_a_sweep_without_its_group(tmp_path):
    """A sweep's W&B group goes only to runs that log to W&B: a run of the same experiment started by hand with
    --wandb-mode disabled (and stopped) is resumed as it is, not refused for a group it cannot use."""
    data = write_cifar10(tmp_path / "data", per_batch=40)
    flags = ["--model", "wrn10_1", "--batch-size", "32", "--epochs", "1", "--device", "cpu", "--data-dir", str(data)]
    out = tmp_path / "runs"
    assert train.main(["--config", "configs/resnet18_sam.yaml", "--seed", "0", *flags, "--out-dir", str(out),
                       "--wandb-mode", "disabled"]) == 0
    (folder,) = out.iterdir()
    (folder / "results.json").unlink()  # as if stopped after its last checkpoint
    ((args, where),) = dry("seeds.sh", "configs/resnet18_sam.yaml", "--out-dir", str(out), "--", *flags,
                           env_extra={"SEEDS": "0"})
    assert where == str(folder) and "--wandb-group" not in args and args[-1] == "--resume"
