"""Late-phase SAM (--sam-start-epoch) and randomized SAM (--sam-prob), against plain SGD and SAM runs:
their boundary values are those runs, a mid-run switch is an SGD run continued as SAM, and a run
stopped anywhere resumes to the same weights."""

import json

import numpy as np
import pytest
import torch
import yaml

import train
from conftest import write_cifar10
from engine.config import parse_config, recorded
from engine.step import takes_sam_step
from test_resume import assert_same_run, common, signal_at
from test_train import read_jsonl


@pytest.fixture
def tiny_data(tmp_path):
    return write_cifar10(tmp_path / "data", per_batch=40)  # 200 training images: 6 steps of 32


@pytest.fixture(autouse=True)
def no_projection(monkeypatch):
    monkeypatch.setattr(train, "project", lambda run: None)


def weights(folder):
    return torch.load(folder / "last.pt", weights_only=True)["model"]


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("m", ["32", "16"])  # 32: the batch, one group; 16: two of 16, each its own BatchNorm
def test_the_boundary_values_are_plain_sam_and_plain_sgd(tiny_data, tmp_path, m):
    args = common(tiny_data, tmp_path, "--epochs", "2", "--m-sharpness", m,
                  *(["--m-sharpness-impl", "loop"] if m == "16" else []))
    runs = {"sam": [], "sgd": ["--optimizer", "sgd"], "start0": ["--sam-start-epoch", "0"],
            "prob1": ["--sam-prob", "1"]}
    for name, flags in runs.items():
        assert train.main([*args, "--name", name, *flags]) == 0
    w = {name: weights(tmp_path / name) for name in runs}
    assert same_weights(w["start0"], w["sam"]) and same_weights(w["prob1"], w["sam"])
    assert not same_weights(w["sam"], w["sgd"])
    for name, passes in (("sam", 2.0), ("sgd", 1.0)):
        assert json.loads((tmp_path / name / "results.json").read_text())["passes_per_step"] == passes


@pytest.mark.parametrize("flags, says", [(["--sam-start-epoch", "2"], "--sam-start-epoch 2 (= --epochs) leaves no SAM"),
                                         (["--sam-prob", "0"], "--sam-prob 0 draws no SAM step"),
                                         (["--rho", "0"], "--rho 0 makes no ascent")])
def test_a_sam_run_that_would_take_no_sam_step_is_refused(tiny_data, tmp_path, capsys, flags, says):
    """Its SAM settings would do nothing (it is an SGD run at SAM's name): the fix is --optimizer sgd."""
    capsys.readouterr()
    assert train.main([*common(tiny_data, tmp_path, "--epochs", "2"), "--name", "idle", *flags]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and says in err[0] and "--optimizer sgd" in err[0] and not (tmp_path / "idle").exists()


def test_a_switch_is_an_sgd_run_continued_as_sam(tiny_data, tmp_path, monkeypatch):
    """--sam-start-epoch 1 of 2 against a stitched run: an SGD run (--optimizer sgd) stopped after
    its first epoch, whose checkpoint is then resumed as the SAM run: the same weights, bitwise. The
    late run logs one SGD epoch and one SAM epoch."""
    from engine import checkpoint
    args = common(tiny_data, tmp_path, "--epochs", "2", "--log-every", "3")
    assert train.main([*args, "--name", "late", "--sam-start-epoch", "1"]) == 0
    signal_at(monkeypatch, {6})
    assert train.main([*args, "--name", "stitched", "--optimizer", "sgd"]) == 75  # SGD, stopped after epoch 1
    monkeypatch.undo()
    monkeypatch.setattr(train, "project", lambda run: None)
    state = torch.load(tmp_path / "stitched" / "last.pt", weights_only=True)
    late = torch.load(tmp_path / "late" / "last.pt", weights_only=True)
    assert state["step"] == 6 and state["sam_steps"] == 0
    state["config"] = {**late["config"], "name": "stitched"}  # from here on, the late run's settings
    checkpoint.save_atomic(checkpoint.seal(state), tmp_path / "stitched" / "last.pt")
    saved = yaml.safe_load((tmp_path / "stitched" / "config.yaml").read_text())  # and its config.yaml says so
    (tmp_path / "stitched" / "config.yaml").write_text(yaml.safe_dump(
        {**recorded(state["config"]), "meta": saved["meta"]}, sort_keys=False))
    assert train.main(["--resume", str(tmp_path / "stitched")]) == 0
    assert same_weights(weights(tmp_path / "late"), weights(tmp_path / "stitched"))
    rows = read_jsonl(tmp_path / "late" / "metrics.jsonl")
    assert [r["train/sam_share"] for r in rows if r["kind"] == "epoch"] == [0.0, 1.0]
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["sam/share"] for r in steps] == [0.0, 0.0, 1.0, 1.0]
    assert "sam/ascent_grad_norm" not in steps[0] and "sam/ascent_grad_norm" in steps[2]
    results = json.loads((tmp_path / "late" / "results.json").read_text())
    assert results["sam_steps"] == 6 and results["passes_per_step"] == 1.5


@pytest.mark.parametrize("flags, stop_at", [(["--sam-start-epoch", "1"], 5), (["--sam-start-epoch", "1"], 7),
                                             (["--sam-prob", "0.5"], 8)])
def test_stopped_across_the_switch_or_mid_draws_the_run_resumes_bitwise(tiny_data, tmp_path, monkeypatch, flags,
                                                                         stop_at):
    args = common(tiny_data, tmp_path, "--epochs", "3", "--log-every", "4", *flags)
    assert train.main([*args, "--name", "whole"]) == 0
    signal_at(monkeypatch, {stop_at})
    assert train.main([*args, "--name", "split"]) == 75
    monkeypatch.undo()
    monkeypatch.setattr(train, "project", lambda run: None)
    assert train.main(["--resume", str(tmp_path / "split")]) == 0
    assert_same_run(tmp_path / "whole", tmp_path / "split")


def test_randomized_sam_draws_depend_on_seed_and_step_only_and_have_the_asked_share():
    config = parse_config(["--sam-prob", "0.3", "--seed", "4"]).config
    draws = [takes_sam_step(config, 0, step) for step in range(4000)]
    assert abs(np.mean(draws) - 0.3) < 0.03  # binomial sd 0.007
    assert draws == [takes_sam_step(config, 7, step) for step in range(4000)]  # not the epoch, not a state
    other = parse_config(["--sam-prob", "0.3", "--seed", "5"]).config
    assert draws != [takes_sam_step(other, 0, step) for step in range(4000)]
    late = parse_config(["--sam-start-epoch", "3", "--epochs", "5"]).config
    assert [takes_sam_step(late, epoch, 0) for epoch in range(5)] == [False] * 3 + [True] * 2
    sgd = parse_config(["--optimizer", "sgd"]).config
    assert not any(takes_sam_step(sgd, epoch, step) for epoch in range(3) for step in range(5))


@pytest.mark.parametrize("args, message", [
    (["--sam-start-epoch", "-1"], "sam_start_epoch must be in [0, 100000], got -1"),
    (["--sam-start-epoch", "3", "--epochs", "2"], "--sam-start-epoch 3 is after the last epoch (2)"),
    (["--sam-prob", "1.5"], "sam_prob must be in [0, 1], got 1.5"),
    (["--sam-prob", "-0.1"], "sam_prob must be in [0, 1]"),
    (["--sam-prob", "nan"], "sam_prob must be in [0, 1], got nan"),
    (["--optimizer", "sgd", "--sam-start-epoch", "1"], "--sam-start-epoch applies only to SAM"),
    (["--optimizer", "sgd", "--sam-prob", "0.5"], "--sam-prob applies only to SAM"),
])
def test_bad_values_are_one_line_errors(tiny_data, tmp_path, capsys, args, message):
    assert train.main(common(tiny_data, tmp_path / "runs", *args)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists()
