"""What a new user meets first: run names that never collide, the tools after a run (evaluate.py,
scripts/plot.py, summarize.py's honest rows), and W&B's conventions."""

import json
import math
import sys

import pytest
import torch

import evaluate
import train
from conftest import REPO, write_cifar10
from engine.config import EXPERIMENT, default_name, loader_kind, parse_config, recorded
from test_train import TINY, read_jsonl

sys.path.insert(0, str(REPO / "scripts"))
import plot  # noqa: E402
import summarize  # noqa: E402


@pytest.fixture
def tiny_data(tmp_path):
    return write_cifar10(tmp_path / "data", per_batch=40)


@pytest.fixture(autouse=True)
def no_projection(monkeypatch):
    monkeypatch.setattr(train, "project", lambda run: None)


def test_different_experiments_never_share_a_folder_and_the_same_command_finds_its_own(tiny_data, tmp_path, capsys):
    common = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--wandb-mode", "disabled"]
    assert train.main([*common, "--epochs", "1", "--subset", "64"]) == 0  # a smoke run
    assert " on 40 test images, best " in capsys.readouterr().out  # all the data's 40 (--subset: the first 64)
    assert train.main([*common, "--epochs", "1"]) == 0                    # then the full one: its own folder
    assert train.main([*common, "--epochs", "2"]) == 0                    # a longer one: its own too
    assert train.main([*common, "--epochs", "1", "--subset", "32", "--out-dir", str(tmp_path / "s")]) == 0
    assert " on 32 test images, best " in capsys.readouterr().out       # the first 32 of them
    names = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("data", "s"))
    assert names == ["wrn10_1-cifar10-basic-sam-rho0.05-seed0+dropout=0.1+epochs=1+batch_size=32",
                     "wrn10_1-cifar10-basic-sam-rho0.05-seed0+dropout=0.1+epochs=1+batch_size=32+subset=64",
                     "wrn10_1-cifar10-basic-sam-rho0.05-seed0+dropout=0.1+epochs=2+batch_size=32"]
    capsys.readouterr()
    assert train.main([*common, "--epochs", "1", "--subset", "64", "--resume"]) == 0  # the same command + --resume
    assert f"{tmp_path / names[1]} is finished" in capsys.readouterr().out
    assert train.main([*common, "--epochs", "1", "--subset", "64"]) == 0  # ...or without: it finds its folder
    assert f"{tmp_path / names[1]} is finished" in capsys.readouterr().out


@pytest.mark.parametrize("a, b", [
    (["--seed", "1"], ["--seed", "2"]), (["--lr", "0.1"], ["--lr", "0.10000001"]), (["--label-noise", "0.2"], []),
    (["--optimizer", "sgd"], ["--optimizer", "sgd", "--epochs", "400"]), (["--adaptive"], ["--no-adaptive"]),
    (["--config", "configs/wrn28-10_asam.yaml"], ["--config", "configs/wrn28-10_asam.yaml", "--eta", "0.02"]),
    (["--config", "configs/resnet18_sam.yaml"], ["--model", "resnet18"]),  # m 0 against the default m 32
    (["--relabel-from", "runs/a/b"], ["--relabel-from", "runs/a_b"]),
])
def test_names_of_different_experiments_differ(a, b):
    x, y = parse_config(a).config, parse_config(b).config
    assert default_name(x) != default_name(y)
    assert default_name(x) == default_name(parse_config(a).config)  # and a command's name is its own


def test_a_name_past_200_bytes_keeps_its_settings_in_a_digest():
    long = parse_config(["--relabel-from", "/".join(["x" * 100] * 3)]).config  # a path of 302 bytes
    name = default_name(long)
    assert len(name.encode()) < 100 and name.startswith("sam_wrn28_10-cifar10-basic-sam-rho0.05-seed0+")
    assert name != default_name(parse_config(["--relabel-from", "/".join(["y" * 100] * 3)]).config)


def test_evaluate_reproduces_the_runs_own_final_test_accuracy(tiny_data, tmp_path, capsys):
    assert train.main([*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "r", "--epochs",
                       "2", "--val-split", "0.2", "--wandb-mode", "disabled"]) == 0
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    capsys.readouterr()
    assert evaluate.main([str(tmp_path / "r"), "--json", str(tmp_path / "test.json")]) == 0
    out = capsys.readouterr().out
    test = json.loads((tmp_path / "test.json").read_text())["sets"]["test"]
    assert test["acc"] == results["final_test_acc"]  # exactly: the same weights, images and arithmetic
    assert "results.json final_test_acc" in out and "the same" in out
    assert test["images"] == 40 and len(test["per_class_acc"]) == 10 and 0 <= test["ece"] <= 1
    # per-class accuracies and the ECE against a float64 computation from the logits
    model = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert model["epoch"] == 2
    assert evaluate.main([str(tmp_path / "r" / "last.pt"), "--split", "val", "--json", str(tmp_path / "v.json")]) == 0
    val = json.loads((tmp_path / "v.json").read_text())["sets"]["val"]
    assert val["acc"] == results["final_val_acc"] and val["images"] == 40


def test_ece_and_per_class_accuracy_against_a_hand_computation():
    from engine.evaluation import ECE_BINS, evaluate_loader

    class Loader:
        def __init__(self, x, y):
            self.x, self.labels = x, y

        def __iter__(self):
            yield self.x[:7], self.labels[:7]
            yield self.x[7:], self.labels[7:]

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(20, 4, generator=g) * 3, torch.randint(0, 4, (20,), generator=g)
    r = evaluate_loader(lambda x: x, Loader(logits, labels), torch.autocast("cpu", enabled=False).__class__ and
                        (lambda: torch.autocast("cpu", enabled=False)), 4)
    p = logits.double().softmax(1)
    conf, pred = p.max(1)
    hit = (pred == labels).double()
    ece = 0.0
    for k in range(ECE_BINS):
        inside = (conf > k / ECE_BINS) & (conf <= (k + 1) / ECE_BINS)
        if inside.any():
            ece += inside.double().mean() * abs(conf[inside].mean() - hit[inside].mean())
    assert r["ece"] == pytest.approx(float(ece), abs=1e-6)
    for c in range(4):
        assert r["per_class_acc"][c] == pytest.approx(float(hit[labels == c].mean()) if (labels == c).any() else 0.0)
    assert r["acc"] == pytest.approx(float(hit.mean())) and r["images"] == 20
    assert r["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits.double(), labels)), rel=1e-6)


def test_evaluate_reads_cifar10_1_and_cifar10_c_folders(tiny_data, tmp_path, capsys):
    import numpy as np
    assert train.main([*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--name", "r", "--epochs",
                       "1", "--wandb-mode", "disabled"]) == 0
    rng = np.random.default_rng(0)
    c101, c10c = tmp_path / "c101", tmp_path / "c10c"
    c101.mkdir(), c10c.mkdir()
    np.save(c101 / "cifar10.1_v6_data.npy", rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8))
    np.save(c101 / "cifar10.1_v6_labels.npy", rng.integers(0, 10, 30))
    np.save(c10c / "labels.npy", rng.integers(0, 10, 20000))
    np.save(c10c / "fog.npy", rng.integers(0, 256, (20000, 32, 32, 3), dtype=np.uint8))
    assert evaluate.main([str(tmp_path / "r"), "--data-dir", str(c101), "--json", str(tmp_path / "a.json")]) == 0
    assert set(json.loads((tmp_path / "a.json").read_text())["sets"]) == {"cifar10.1_v6"}
    assert evaluate.main([str(tmp_path / "r"), "--data-dir", str(c10c), "--json", str(tmp_path / "b.json")]) == 0
    sets = json.loads((tmp_path / "b.json").read_text())["sets"]
    assert set(sets) == {"fog/1", "fog/2"} and sets["fog/2"]["images"] == 10000


def test_plot_draws_an_sgd_sam_pair_with_seed_bands(tiny_data, tmp_path):
    common = [*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "runs"), "--epochs", "2",
              "--wandb-mode", "disabled"]
    for optimizer in ("sgd", "sam"):
        for seed in (0, 1):
            assert train.main([*common, "--optimizer", optimizer, "--seed", str(seed),
                               "--name", f"{optimizer}-seed{seed}"]) == 0
    assert plot.main([str(tmp_path / "runs"), "--out", str(tmp_path / "curves.png")]) == 0
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000
    groups = {plot.experiment(f) for f in plot.run_folders([tmp_path / "runs"])}
    assert groups == {"sgd", "sam"}  # the seeds of each drawn as one curve and a band


def test_summarize_rows_say_how_they_differ_from_the_paper_and_skip_bad_records(tmp_path, capsys):
    def write(name, **fields):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(fields))

    def recorded_settings(*flags):  # what results.json states of the paper's runs (its idle settings null)
        config = parse_config(["--config", *flags]).config
        return {**{k: recorded(config)[k] for k in EXPERIMENT}, "precision": "bf16", "loader": loader_kind(config)}

    paper = recorded_settings("configs/wrn28-10_sam.yaml")
    sgd = recorded_settings("configs/wrn28-10_sgd.yaml", "--epochs", "400")
    assert paper["cutout_placement"] is None and sgd["sam_prob"] is None  # nulls: not differences from the paper
    for seed in (0, 1):
        write(f"sam{seed}", final_test_error=0.027, seed=seed, settings=paper, dataset_official=True, passes_per_step=2.0)
        write(f"sgd{seed}", final_test_error=0.035, seed=seed, dataset_official=True, passes_per_step=1.0, settings=sgd)
    write("smoke", final_test_error=0.5, seed=0, dataset_official=False, passes_per_step=1.5,
          settings={**paper, "epochs": 2, "subset": 256, "precision": "fp32", "sam_start_epoch": 1})
    write("nan", final_test_error=math.nan, seed=0, settings=paper)
    write("text", final_test_error="0.03", seed=0, settings=paper)
    write("nokeys", seed=0)
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "results.json").write_bytes(b'{"final_test_error": 0.0\xff')
    assert summarize.main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "| cifar10 | sam_wrn28_10 | basic | SAM | 0.05 | - | official | 2 | 2.00 | 2.70 ± 0.00 | 2.7 ± 0.1 |" in out
    assert "| cifar10 | sam_wrn28_10 | basic | SGD | - | epochs=400 | official | 2 | 1.00 | 3.50 ± 0.00 | 3.5 ± 0.1 |" in out
    assert ("| cifar10 | sam_wrn28_10 | basic | SAM | 0.05 | epochs=2, sam_start_epoch=1, subset=256, precision=fp32 | "
            "NOT official | 1 | 1.50 | 50.00 | - |") in out
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 4 and all("skipped" in w for w in warnings)
    for name, why in (("nan", "not an error rate"), ("text", "not a number"), ("nokeys", "not a number"),
                      ("torn", "unreadable")):
        assert any(f"{tmp_path / name / 'results.json'}" in w and why in w for w in warnings), (name, warnings)


def test_metrics_rows_say_what_they_are_and_wandb_honours_wandb_dir(tiny_data, tmp_path, monkeypatch):
    from wandb_records import history_and_config
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    (tmp_path / "wandb_home").mkdir()
    assert train.main([*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "runs"), "--name", "w",
                       "--epochs", "1", "--wandb-mode", "offline"]) == 0
    assert not (tmp_path / "runs" / "w" / "wandb").exists()
    (file,) = (tmp_path / "wandb_home").glob("wandb/offline-run-*/run-*.wandb")
    history, _ = history_and_config(file)
    rows = read_jsonl(tmp_path / "runs" / "w" / "metrics.jsonl")
    assert [r["kind"] for r in rows] == ["step"] * 3 + ["epoch"]
    by_step = {}  # W&B merges what is logged at one step (the last step row and the epoch row) into one row
    for row in rows:
        by_step.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k not in ("step", "kind")})
    logged = {json.loads(h["_step"]): {k: json.loads(v) for k, v in h.items() if not k.startswith("_")}
              for h in history if "_step" in h}
    assert logged == by_step  # the same keys and values
