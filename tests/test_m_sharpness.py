"""--m-sharpness: per-group ascent and per-group BatchNorm, against a float64 hand loop, and
against real data parallel (torchrun)."""

import contextlib
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import train
from conftest import REPO, write_cifar10
from engine.groups import GroupGradients
from engine.step import TrainStep
from sam import SAM

LR, MOMENTUM, WD, GROUPS = 0.1, 0.9, 5e-4, 3


def small_model(bn, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 4, 3, padding=1)] + ([nn.BatchNorm2d(4)] if bn else []) + \
        [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)]
    return nn.Sequential(*layers).double()


def batches(steps=3, n=12):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for _ in range(steps)]


def reference(model, data, sam, rho=0.0, adaptive=False, eta=0.0, decay_in_loss=False, clip=0.0):
    """What G accelerators compute, written out group by group: each group's gradient at w with
    BatchNorm over its own images, its own ascent e_k (global norm over all its parameters), its
    gradient at w + e_k, the mean over groups, then SGD with momentum and weight decay. Running
    statistics: the mean of the groups' updates. decay_in_loss: (wd/2)||.||^2 of each group's own
    weights is part of its loss (official), and SGD adds none; clip: the official global-norm clip
    of the mean gradient."""
    net = copy.deepcopy(model).train()
    w = {n: p.detach().clone() for n, p in net.named_parameters()}
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    momentum = None

    def gradient(weights, stats, x, y):
        stats = {n: b.clone() for n, b in stats.items()}
        weights = {n: v.clone().requires_grad_(True) for n, v in weights.items()}
        loss = nn.functional.cross_entropy(functional_call(net, (weights, stats), (x,)), y)
        if decay_in_loss:
            loss = loss + 0.5 * WD * sum((v ** 2).sum() for v in weights.values())
        return dict(zip(weights, torch.autograd.grad(loss, list(weights.values())))), stats

    for x, y in data:
        total, updated = {n: torch.zeros_like(v) for n, v in w.items()}, []
        for xk, yk in zip(x.chunk(GROUPS), y.chunk(GROUPS)):
            g, stats = gradient(w, buffers, xk, yk)
            updated.append(stats)
            if sam:
                t = {n: (w[n].abs() + eta) if adaptive else torch.ones_like(w[n]) for n in w}
                norm = torch.sqrt(sum(((t[n] * g[n]) ** 2).sum() for n in w))
                g, _ = gradient({n: w[n] + rho * t[n] ** 2 * g[n] / norm for n in w}, buffers, xk, yk)
            for n in w:
                total[n] += g[n] / GROUPS
        buffers = {n: torch.stack([u[n].double() for u in updated]).mean(0).to(b.dtype) if b.is_floating_point()
                   else updated[0][n] for n, b in buffers.items()}
        if clip:
            norm = torch.sqrt(sum((v ** 2).sum() for v in total.values()))
            assert norm > clip  # the clip acts
            total = {n: v * clip / norm for n, v in total.items()}
        d = {n: total[n] + (0.0 if decay_in_loss else WD * w[n]) for n in w}
        momentum = d if momentum is None else {n: MOMENTUM * momentum[n] + d[n] for n in w}
        w = {n: w[n] - LR * momentum[n] for n in w}
    return w, buffers


def product(model, data, impl, sam, rho=0.0, adaptive=False, eta=0.0, decay_in_loss=False, clip=0.0):
    model = copy.deepcopy(model).train()
    in_loss = WD if decay_in_loss else 0.0
    kwargs = dict(lr=LR, momentum=MOMENTUM, weight_decay=WD - in_loss)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, eta=eta, **kwargs) if sam \
        else torch.optim.SGD(model.parameters(), **kwargs)
    criterion = nn.CrossEntropyLoss()
    step = TrainStep(model, model, optimizer, criterion, sam=sam, autocast=contextlib.nullcontext,
                     weight_decay=in_loss, grad_clip=clip,
                     groups=(GROUPS, GroupGradients(model, criterion, contextlib.nullcontext, impl, in_loss)))
    for x, y in data:
        step(x, y)
    return dict(model.named_parameters()), dict(model.named_buffers())


@pytest.mark.parametrize("impl", ["vmap", "loop"])
@pytest.mark.parametrize("bn", [True, False], ids=["batchnorm", "no-batchnorm"])
@pytest.mark.parametrize("method", ["sam", "asam", "sgd"])
def test_per_group_steps_match_a_float64_hand_loop(impl, bn, method):
    model, data = small_model(bn), batches()
    kwargs = {"sam": dict(sam=True, rho=0.05), "asam": dict(sam=True, rho=0.5, adaptive=True, eta=0.01),
              "sgd": dict(sam=False)}[method]
    want_w, want_buffers = reference(model, data, **kwargs)
    got_w, got_buffers = product(model, data, impl, **kwargs)
    moved = max((want_w[n] - p).abs().max().item() for n, p in model.named_parameters())
    assert moved > 1e-3  # three steps moved the weights: the comparison below means something
    for n in want_w:
        torch.testing.assert_close(got_w[n].detach(), want_w[n], rtol=1e-10, atol=1e-12, msg=n)
    for n in want_buffers:
        torch.testing.assert_close(got_buffers[n], want_buffers[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("impl", ["vmap", "loop"])
def test_per_group_steps_with_the_official_decay_and_clip(impl):
    """Weight decay in each group's loss (so each e_k includes wd*w and each second gradient
    wd*(w + e_k)) and the global-norm clip of the mean, as the official per-device step."""
    model, data = small_model(True), batches()
    kwargs = dict(sam=True, rho=0.05, decay_in_loss=True, clip=0.3)
    want_w, want_buffers = reference(model, data, **kwargs)
    got_w, got_buffers = product(model, data, impl, **kwargs)
    for n in want_w:
        torch.testing.assert_close(got_w[n].detach(), want_w[n], rtol=1e-10, atol=1e-12, msg=n)


def test_groups_differ_from_one_big_batch():
    """The test above can tell per-group SAM from whole-batch SAM: they are not the same."""
    model, data = small_model(True), batches(steps=1)
    grouped, _ = product(model, data, "vmap", sam=True, rho=0.05)
    whole = copy.deepcopy(model).train()
    optimizer = SAM(whole.parameters(), torch.optim.SGD, rho=0.05, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    step = TrainStep(whole, whole, optimizer, nn.CrossEntropyLoss(), sam=True, autocast=contextlib.nullcontext)
    step(*data[0])
    assert max((grouped[n] - p).abs().max().item() for n, p in whole.named_parameters()) > 1e-4


def test_vmap_equals_loop_on_a_wide_resnet_step():
    """The fast path and the reference on a real model (float64: in float32 the two differ by up
    to 2e-5 after one step, float round-off that BatchNorm over 8 images amplifies)."""
    from models import build_model
    results = []
    for impl in ("vmap", "loop"):
        torch.manual_seed(0)
        model = build_model("wrn10_1").double()
        optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        criterion = nn.CrossEntropyLoss()
        step = TrainStep(model, model, optimizer, criterion, sam=True, autocast=contextlib.nullcontext,
                         groups=(4, GroupGradients(model, criterion, contextlib.nullcontext, impl)))
        g = torch.Generator().manual_seed(0)
        loss, correct, norm = step(torch.randn(32, 3, 32, 32, generator=g, dtype=torch.float64),
                                   torch.randint(0, 10, (32,), generator=g))
        results.append((model.state_dict(), loss, correct, norm))
    (a, *stats_a), (b, *stats_b) = results
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-12, msg=key)
    for x, y in zip(stats_a, stats_b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


@pytest.fixture
def tiny_data(tmp_path):
    return write_cifar10(tmp_path / "data", per_batch=40)


TINY = ["--model", "wrn10_1", "--batch-size", "32", "--eval-batch-size", "40", "--device", "cpu",
        "--wandb-mode", "disabled"]


@pytest.mark.parametrize("args, message", [
    (["--m-sharpness", "5"], "m_sharpness 5 must divide the per-process batch 32 (batch 32 over 1 process); "
                             "use --m-sharpness with one of 1, 2, 4, 8, 16, 32, or 0 for whole-batch SAM"),
    (["--batch-size", "48"], "m_sharpness 32 must divide the per-process batch 48"),
    (["--m-sharpness", "0", "--m-sharpness-impl", "loop"], "--m-sharpness-impl applies only with --m-sharpness M"),
    (["--m-sharpness", "8", "--compile", "default"], "--compile does not apply to the per-group step"),
    (["--m-sharpness", "-1"], "m_sharpness must be in [0, 1000000]"),
])
def test_bad_m_is_one_line_exit_2_and_writes_nothing(tiny_data, tmp_path, capsys, args, message):
    try:
        code = train.main([*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "runs"), *args])
    except SystemExit as e:
        code = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "runs").exists()


def test_the_run_name_and_config_record_m(tiny_data, tmp_path):
    import json
    assert train.main([*TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "1",
                       "--m-sharpness", "8"]) == 0
    (run,) = tmp_path.glob("wrn10_1-*")
    assert run.name.endswith("+m_sharpness=8")
    assert json.loads((run / "results.json").read_text())["settings"]["m_sharpness"] == 8


@pytest.mark.slow
def test_torchrun_four_processes_equal_one_process_with_m(tmp_path):
    """4 processes x 16 images (each ascends on its own 16, BatchNorm over its own 16), 2 processes
    x 2 groups of 16, and one process with batch 64 and --m-sharpness 16 end with the same
    parameters and BatchNorm statistics: the same images in the same groups with the same
    augmentation, the same mean of second gradients, the same mean of statistics.

    Tolerance: fp32 on the CPU, one step (64 images), the order of float sums being the only
    difference: measured 3e-8 on the weights and 2 ulps (2.4e-7) on BatchNorm running variances
    near 1; 1e-6 allowed. One process without groups lands 6.6e-3 away, so the comparison can tell.
    Longer runs drift further: SAM on this toy model (random images, BatchNorm over 16) amplifies
    round-off chaotically (its second gradient moves by 3% when e moves by 2e-6 relative), to
    3e-7..3e-5 after two steps depending on the images drawn, and 1e-6..3e-4 after six. The
    reference is the loop implementation, which runs each group as a process does; vmap is held to
    the loop in float64 above."""
    data = write_cifar10(tmp_path / "data", per_batch=40)
    common = ["--model", "wrn10_1", "--batch-size", "64", "--epochs", "1", "--subset", "64", "--device", "cpu",
              "--wandb-mode", "disabled", "--data-dir", str(data), "--out-dir", str(tmp_path / "runs"),
              "--eval-batch-size", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*args, nproc=1):
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
        result = subprocess.run([sys.executable, *launcher, "train.py", *common, *args], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return torch.load(tmp_path / "runs" / args[1] / "last.pt", weights_only=True)["model"]

    def distance(a, b):  # weights, biases and BatchNorm running statistics
        return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())

    ddp = run("--name", "ddp", "--m-sharpness", "0", nproc=4)
    grouped = run("--name", "grouped", "--m-sharpness", "16", "--m-sharpness-impl", "loop", nproc=2)
    one = run("--name", "one", "--m-sharpness", "16", "--m-sharpness-impl", "loop")
    whole = run("--name", "whole", "--m-sharpness", "0")
    assert distance(ddp, one) < 1e-6
    assert distance(grouped, one) < 1e-6  # 2 processes x 2 groups: the per-group step's own all-reduce
    assert distance(ddp, whole) > 1e-3


def test_the_vmap_groups_run_under_cpu_bf16_autocast_and_with_dropout_and_leave_no_hooks():
    """Under autocast vmap's BatchNorm gets float32 inputs (engine/groups.py), and only while the groups
    run; dropout draws differently in each group (vmap's randomness="different")."""
    from engine.groups import GroupGradients
    from models import build_model
    torch.manual_seed(0)
    model = build_model("wrn10_1", dropout=0.3)
    x, y = torch.randn(2, 8, 3, 32, 32), torch.randint(0, 10, (2, 8))
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    grads, losses, _ = GroupGradients(model, nn.CrossEntropyLoss(), autocast, "vmap").first(x, y)
    loop = GroupGradients(copy.deepcopy(model), nn.CrossEntropyLoss(), autocast, "loop").first(x, y)[1]
    assert torch.isfinite(losses).all() and torch.allclose(losses, loop, rtol=0.05)  # dropout: not the same draws
    assert all(not m._forward_pre_hooks for m in model.modules())
    grads = GroupGradients(model, nn.CrossEntropyLoss(), autocast, "vmap").second(
        x, y, {p: torch.zeros(2, *p.shape) for p in model.parameters()})
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_group_gradients_carry_no_weight_penalty_unless_asked():
    from engine.groups import GroupGradients
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x, y = torch.randn(2, 5, 4, dtype=torch.float64), torch.randint(0, 3, (2, 5))
    grads, _, _ = GroupGradients(model, nn.CrossEntropyLoss(), contextlib.nullcontext, "vmap").first(x, y, mean=True)
    want = [torch.autograd.grad(nn.functional.cross_entropy(model(xi), yi), list(model.parameters())) for xi, yi in
            zip(x, y)]
    for i, p in enumerate(model.parameters()):
        torch.testing.assert_close(grads[p], (want[0][i] + want[1][i]) / 2, rtol=1e-12, atol=1e-14)
