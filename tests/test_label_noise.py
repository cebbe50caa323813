"""Table 4's pieces: ResNet-32s, the noise rule, mixup, bootstrapping, the table4.sh queue and its summary."""

import json
import math
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import train
from conftest import REPO, write_cifar10
from data import build_loaders, load_cifar
from data.augment import mixup_weight
from data.loaders import derived_seed
from data.splits import noisy_labels
from engine.config import parse_config
from models import build_model


def test_resnet32_is_he_et_al_s():
    """3 stages of 5 basic blocks, 16/32/64 channels, parameter-free shortcuts: 464,154 parameters."""
    model = build_model("resnet32")
    assert sum(p.numel() for p in model.parameters()) == 464_154
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())


def test_resnet32_jiang_is_the_wide_one_of_their_released_code():
    """mentormix resnet_model.py with 5 units a stage: a 64-channel stem, then 128/256/512 channels,
    zero-padded average-pool shortcuts, BatchNorm epsilon 1e-3, leaky ReLU 0.1."""
    model = build_model("resnet32_jiang")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 * 5 * 2 and {m.out_channels for m in convs} == {64, 128, 256, 512}
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # convolutions: stem 3*64*9 = 1,728; stage 1: 64*128*9 + 9 * 128*128*9 = 1,400,832; stage 2:
    # 128*256*9 + 9 * 256*256*9 = 5,603,328; stage 3: 256*512*9 + 9 * 512*512*9 = 22,413,312.
    # BatchNorm (weight, bias): 2 * (192 + 4*256 + 384 + 4*512 + 768 + 4*1024 + 512) = 18,048. Head: 5,130.
    assert sum(p.numel() for p in model.parameters()) == 1_728 + 1_400_832 + 5_603_328 + 22_413_312 + 18_048 + 5_130
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("p", [0.2, 0.4, 0.6, 0.8])
def test_uniform_noise_redraws_each_label_over_all_ten_classes(p):
    """Jiang et al.'s rule on CIFAR-10's 50,000 training labels: a label is redrawn with probability
    p over all 10 classes, so 9p/10 end up wrong, and a wrong label is uniform over the 9 others."""
    labels = np.repeat(np.arange(10), 5000)
    noisy = noisy_labels(labels, p, 10, seed=0)
    wrong = (noisy != labels).mean()
    expected = 0.9 * p
    assert abs(wrong - expected) < 4 * math.sqrt(expected * (1 - expected) / 50_000)
    offsets = np.bincount(((noisy - labels) % 10)[noisy != labels], minlength=10)[1:]
    chi2 = (((offsets - offsets.mean()) ** 2) / offsets.mean()).sum()
    assert chi2 < 27.9  # 8 degrees of freedom: the 0.9995 quantile
    assert np.array_equal(noisy_labels(labels, p, 10, seed=0), noisy)
    assert not np.array_equal(noisy_labels(labels, p, 10, seed=1), noisy)


def test_the_other_rule_moves_exactly_p_of_the_labels():
    labels = np.repeat(np.arange(10), 5000)
    noisy = noisy_labels(labels, 0.8, 10, seed=0, rule="other")
    assert (noisy != labels).sum() == 40_000


@pytest.fixture
def tiny_data(tmp_path):
    return write_cifar10(tmp_path / "data", per_batch=40)


def test_test_and_validation_labels_never_change(tiny_data):
    data = load_cifar("cifar10", tiny_data)
    train_loader, evals = build_loaders(data, augment="basic", batch_size=16, device="cpu", label_noise=0.8,
                                        val_split=0.2, seed=4)
    assert torch.equal(evals["test"].labels, torch.from_numpy(data.test_labels))
    assert torch.equal(evals["val"].labels, torch.from_numpy(data.train_labels[160:]))
    assert not torch.equal(train_loader.labels, torch.from_numpy(data.train_labels[:160]))


def test_mixup_mixes_the_batch_with_itself_reversed_and_the_loss_follows(tiny_data):
    """One weight per batch, max(l, 1 - l), images and one-hots mixed with the reversed batch; the
    step's loss is then lam CE(y) + (1 - lam) CE(y reversed), checked by hand in float64."""
    from engine.step import TrainStep
    data = load_cifar("cifar10", tiny_data)
    plain, _ = build_loaders(data, augment="basic", batch_size=16, device="cpu", seed=5, channels_last=False)
    mixed, _ = build_loaders(data, augment="basic", batch_size=16, device="cpu", seed=5, channels_last=False,
                             mixup_alpha=8.0)
    for loader in (plain, mixed):
        loader.set_epoch(3)
    (x, y), (xm, ym) = next(iter(plain)), next(iter(mixed))
    lam = mixup_weight(8.0, derived_seed(5, 3, 0, 2))
    assert 0.5 <= lam <= 1
    one_hot = nn.functional.one_hot(y, 10).float()
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(ym, lam * one_hot + (1 - lam) * one_hot.flip(0))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    logits = model(xm.double())
    a, b = (torch.tensor(w, dtype=torch.float32).item() for w in (lam, 1 - lam))  # the soft labels are float32
    want = a * nn.functional.cross_entropy(logits, y) + b * nn.functional.cross_entropy(logits, y.flip(0))
    step = TrainStep(model, model, optimizer, nn.CrossEntropyLoss(), sam=False,
                     autocast=__import__("contextlib").nullcontext)
    loss, correct, _ = step(xm.double(), ym.double())
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    assert correct.item() == (logits.argmax(1) == torch.where(torch.tensor(lam >= 0.5), y, y.flip(0))).sum().item()


def test_bootstrap_trains_on_the_labels_a_finished_model_predicts(tiny_data, tmp_path):
    """--relabel-from: the new run's training labels are the argmax of the source model on the
    unaugmented training images (normalised with the training set's statistics), computed here
    by hand from its checkpoint."""
    common = ["--model", "wrn10_1", "--batch-size", "32", "--m-sharpness", "0", "--device", "cpu",
              "--wandb-mode", "disabled", "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "1",
              "--label-noise", "0.6"]
    assert train.main([*common, "--name", "first"]) == 0
    run = train.prepare(parse_config([*common, "--name", "second", "--relabel-from", str(tmp_path / "first")]))
    state = torch.load(tmp_path / "first" / "last.pt", weights_only=True)
    model = build_model("wrn10_1")
    model.load_state_dict(state["model"])
    model.eval()
    images = load_cifar("cifar10", tiny_data).train_images
    scaled = images.astype(np.float64) / 255
    mean, std = scaled.mean(axis=(0, 2, 3)), scaled.std(axis=(0, 2, 3))
    x = torch.from_numpy((scaled - mean[None, :, None, None]) / std[None, :, None, None]).float()
    with torch.no_grad():
        want = model(x).argmax(1)
    assert torch.equal(run.train_loader.labels, want)
    relabelled = run.meta["relabelled_from"]
    assert relabelled["from"] == str(tmp_path / "first" / "last.pt") and relabelled["source_epoch"] == 1
    assert 0 < relabelled["changed_labels"] <= 1
    run.lock.release()


@pytest.mark.parametrize("args, message", [
    (["--relabel-from", "nowhere"], "--relabel-from: nowhere is not a readable train.py checkpoint"),
    (["--label-noise-rule", "other"], "--label-noise-rule applies only with --label-noise"),
    (["--mixup-alpha", "1", "--augment", "cutout"], "--mixup-alpha with a Cutout augmentation is not supported"),
])
def test_bad_label_noise_settings(tiny_data, tmp_path, capsys, args, message):
    code = train.main(["--model", "wrn10_1", "--device", "cpu", "--data-dir", str(tiny_data), "--out-dir",
                       str(tmp_path / "runs"), "--wandb-mode", "disabled", *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_table4_dry_run_lists_every_cell_and_bootstraps_from_stage_one(tmp_path):
    """table4.sh checks every run before any starts, data files included: $SAM_DATA_DIR holds some
    (300 training images: the paper's batch of 256 fits)."""
    tiny_data = write_cifar10(tmp_path / "data", per_batch=60)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
           "CUDA_VISIBLE_DEVICES": "", "SAM_DATA_DIR": str(tiny_data)}
    result = subprocess.run(["bash", "scripts/table4.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    runs = [(shlex.split(line.split("  # ")[0]), line.split("  # ")[1]) for line in result.stdout.splitlines()]
    folders = [folder for _, folder in runs]
    assert len(runs) == 4 * 3 * (1 + 1 + 4 + 1 + 4) and len(set(folders)) == len(folders)
    cells = {(w[w.index("--label-noise") + 1], w[w.index("--seed") + 1], w[w.index("--config") + 1],
              w[w.index("--mixup-alpha") + 1] if "--mixup-alpha" in w else None, "--relabel-from" in w)
             for w, _ in runs}
    for level in ("0.2", "0.4", "0.6", "0.8"):
        sam = "configs/labelnoise/sam_80.yaml" if level == "0.8" else "configs/labelnoise/sam.yaml"
        for seed in ("0", "1", "2"):
            assert (level, seed, "configs/labelnoise/sgd.yaml", None, False) in cells
            for bootstrap in (False, True):
                assert (level, seed, sam, None, bootstrap) in cells
                for alpha in ("1", "8", "16", "32"):
                    assert (level, seed, "configs/labelnoise/mixup.yaml", alpha, bootstrap) in cells
    for words, _ in runs:
        if "--relabel-from" in words:  # from its own stage-one run: same level, seed and alpha
            source = words[words.index("--relabel-from") + 1]
            (stage_one,) = [w for w, f in runs if f == source]
            assert [w for w in words if w not in ("--relabel-from", source)] == stage_one
    assert all(w[w.index("--wandb-group") + 1] == "table4" for w, _ in runs)


def test_table4_summary_in_the_papers_layout(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import summarize
    base = dict(dataset="cifar10", model="resnet32_jiang", augment="basic", epochs=200)
    cells = [("sgd", 0.0, 0.0, None, [0.15, 0.17]), ("sam", 0.1, 0.0, None, [0.05, 0.06]),
             ("sgd", 0.0, 1.0, None, [0.09, 0.09]), ("sgd", 0.0, 8.0, None, [0.07, 0.08]),
             ("sgd", 0.0, 8.0, "runs/x", [0.06, 0.07])]
    for i, (optimizer, rho, alpha, source, errors) in enumerate(cells):
        for seed, error in enumerate(errors):
            settings = {**base, "optimizer": optimizer, "rho": rho, "mixup_alpha": alpha, "label_noise": 0.2,
                        "relabel_from": f"{source}-{seed}" if source else None}
            (tmp_path / f"{i}-{seed}").mkdir()
            (tmp_path / f"{i}-{seed}" / "results.json").write_text(json.dumps(
                {**settings, "seed": seed, "final_test_error": error, "settings": settings}))
    assert summarize.main(["--table4", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| SGD | 84.00 ± 12.71 (2; paper 84.8) | - (paper 68.8) |" in out
    assert "| Mixup | 92.50 ± 6.35 (2, alpha 8; paper 93.0) |" in out  # the better alpha
    assert "| Bootstrap + Mixup | 93.50 ± 6.35 (2, alpha 8; paper 93.3) |" in out
    assert "| SAM | 94.50 ± 6.35 (2; paper 95.1) |" in out
    assert "| Bootstrap + SAM | - (paper 95.4) |" in out
