"""train.py end to end on tiny synthetic CIFAR data, on the CPU."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import train
from conftest import REPO, write_cifar10
from engine.config import SETTINGS, build_parser, parse_config
from wandb_records import history_and_config

TINY = ["--model", "wrn10_1", "--dropout", "0.1", "--batch-size", "32", "--eval-batch-size", "16",
        "--log-every", "2", "--device", "cpu"]


@pytest.fixture
def tiny_data(tmp_path):
    return write_cifar10(tmp_path / "data", per_batch=40)  # 200 training images: 6 steps of 32


def run_cli(args, env_extra=None):
    env = {**os.environ, "WANDB_SILENT": "true", **(env_extra or {})}
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


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

    history, config = history_and_config(glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))[0])
    assert json.loads(config["rho"]) == 0.05 and json.loads(config["model"]) == "wrn10_1"
    assert "git_commit" in json.loads(config["meta"]) and "dataset_md5" in json.loads(config["meta"])
    logged = [h for h in history if "test/acc" in h]
    assert [json.loads(h["test/acc"]) for h in logged] == [r["test/acc"] for r in epochs]
    assert any("sam/ascent_grad_norm" in h for h in history)
    assert "wandb sync" in result.stdout
    # the resolved configuration is printed at the start
    assert "batch_size: 32" in result.stdout and "rho: 0.05" in result.stdout


def test_killed_and_resumed_run_ends_bitwise_identical(tiny_data, tmp_path):
    common = [*TINY, "--data-dir", str(tiny_data), "--epochs", "3", "--out-dir", str(tmp_path / "runs"),
              "--wandb-mode", "offline", "--momentum", "0.9"]
    whole = run_cli([*common, "--name", "whole"])
    assert whole.returncode == 0, whole.stderr
    killed = run_cli([*common, "--name", "split"], {"SAM_TEST_KILL_AT_STEP": "9"})  # mid epoch 2
    assert killed.returncode == -9
    assert torch.load(tmp_path / "runs/split/last.pt", weights_only=True)["epoch"] == 1
    resumed = run_cli([*common, "--name", "split", "--resume"])
    assert resumed.returncode == 0, resumed.stderr

    a = torch.load(tmp_path / "runs/whole/last.pt", weights_only=True)
    b = torch.load(tmp_path / "runs/split/last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"] == 18
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    strip = ("images_per_s", "epoch_time_s", "train_time_s")
    rows = [[{k: v for k, v in r.items() if k not in strip} for r in read_jsonl(tmp_path / f"runs/{n}/metrics.jsonl")]
            for n in ("whole", "split")]
    assert rows[0] == rows[1]  # no duplicated or missing steps after the resume
    ids = {p.rsplit("-", 1)[-1] for p in glob.glob(str(tmp_path / "runs/split/wandb/offline-run-*"))}
    assert ids == {b["wandb_id"]}  # the resumed process continued the same W&B run


def test_resume_accepts_a_checkpoint_path(tiny_data, tmp_path):
    common = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "r", "--wandb-mode",
              "disabled"]
    assert train.main([*common, "--epochs", "1"]) == 0
    # by path, without --name: the run continues in its own folder
    others = [a for a in common if a not in ("--name", "r")]
    assert train.main([*others, "--epochs", "2", "--resume", str(tmp_path / "r" / "last.pt")]) == 0
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "r"]  # no new run folder
    assert train.main([*others, "--epochs", "3", "--resume", str(tmp_path / "r")]) == 0
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["epoch"] == 3


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def yaml_file(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "epochs must be > 0"),
    (["--lr", "-0.1"], "lr must be > 0"),
    (["--batch-size", "0"], "batch_size must be > 0"),
    (["--rho", "-0.05"], "rho must be >= 0"),
    (["--model", "vgg16"], "unknown model 'vgg16'"),
    (["--dataset", "mnist"], "invalid choice"),
    (["--epochs", "ten"], "invalid int value"),
    (["--label-noise", "1.5"], "label_noise must be in"),
    (["--batch-size", "4096"], "larger than the 200 training images"),
    (["--config", "missing.yaml"], "not found"),
])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(tiny_data, tmp_path, capsys, args, message):
    out = tmp_path / "runs"
    argv = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(out), "--wandb-mode", "disabled", *args]
    try:
        code = train.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
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
])
def test_bad_config_files(tiny_data, tmp_path, capsys, text, message):
    code = train.main(["--config", yaml_file(tmp_path, text), "--data-dir", str(tiny_data),
                       "--out-dir", str(tmp_path / "runs")])
    assert code == 2 and message in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_missing_data_is_one_line_exit_2(tmp_path, capsys):
    code = train.main([*TINY, "--data-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path / "runs")])
    assert code == 2 and "--download" in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_existing_run_is_never_overwritten(tiny_data, tmp_path, capsys):
    common = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "r", "--epochs", "1",
              "--wandb-mode", "disabled"]
    assert train.main(common) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}
    capsys.readouterr()
    assert train.main(common) == 2
    assert "--resume" in one_line_error(capsys)
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == before


def test_resume_without_a_checkpoint_is_exit_2(tiny_data, tmp_path, capsys):
    code = train.main([*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--resume"])
    assert code == 2 and "no checkpoint" in one_line_error(capsys)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tiny_data, tmp_path, capsys, monkeypatch):
    common = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "nan",
              "--wandb-mode", "disabled", "--epochs", "3"]
    real_call = train.TrainStep.__call__
    calls = {"n": 0}

    def poisoned(self, images, labels):
        calls["n"] += 1
        loss, correct, norm = real_call(self, images, labels)
        return (loss * float("nan") if calls["n"] >= 9 else loss), correct, norm

    monkeypatch.setattr(train.TrainStep, "__call__", poisoned)
    with pytest.raises(SystemExit) as e:
        train.main(common)
    assert e.value.code == 1
    assert "non-finite at step 9" in capsys.readouterr().err
    state = torch.load(tmp_path / "nan" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and not (tmp_path / "nan" / "last.pt.tmp").exists()


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


def test_the_seed_command_line_parses_verbatim():
    config, _ = parse_config("--epochs 200 --lr 0.1 --batch_size 128 --rho 0.05".split())
    assert (config["epochs"], config["lr"], config["batch_size"], config["rho"]) == (200, 0.1, 128, 0.05)
    assert (config["model"], config["dataset"], config["optimizer"], config["augment"]) == \
        ("wrn28_10", "cifar10", "sam", "basic")


def test_no_arguments_is_the_papers_headline_run():
    config, run = parse_config([])
    assert config["model"] == "wrn28_10" and config["epochs"] == 200 and config["optimizer"] == "sam"
    assert config["rho"] == 0.05 and config["augment"] == "basic" and run["resume"] is None


def test_every_config_file_is_valid():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        config, _ = parse_config(["--config", str(path)])
        assert config["epochs"] == 200, path


def test_help_documents_every_flag_with_its_default():
    text = build_parser().format_help()
    for name in SETTINGS:
        assert "--" + name.replace("_", "-") in text
    assert "--batch_size" in text and "--resume" in text and "(default: 0.05)" in text


def test_adaptive_flag_scales_weights_but_not_biases():
    from engine.builders import build_optimizer
    from models import build_model
    config, _ = parse_config(["--model", "wrn10_1", "--adaptive", "--rho", "2.0"])
    model = build_model("wrn10_1")
    opt = build_optimizer(config, model, torch.device("cpu"))
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
