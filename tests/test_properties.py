"""The properties that decide results, each tested directly against an independent reference, so
that the bug that breaks one cannot pass unseen (issue 31's survivors and their classes):
what a step reports, BatchNorm statistics through a step, the weight decay counted once, the
normalising statistics, the data order of each epoch, every stage's output size, and residual blocks."""

import contextlib
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import write_cifar10
from data import build_loaders, load_cifar
from engine.config import parse_config
from engine.groups import GroupGradients
from engine.step import TrainStep, build_training, resolve_runtime
from models import build_model
from models.resnet import BasicBlock, _JiangBlock
from models.wide_resnet import PreActBlock, SamBlock
from sam import SAM


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 3)).double()


def batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def step_of(model, sam=True, groups=None, **kwargs):
    base = dict(lr=0.1, momentum=0.9)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, **base) if sam else torch.optim.SGD(model.parameters(), **base)
    grouped = None
    if groups:
        grouped = (groups[0], GroupGradients(model, nn.CrossEntropyLoss(), contextlib.nullcontext, groups[1]))
    return TrainStep(model, model, opt, nn.CrossEntropyLoss(), sam=sam, autocast=contextlib.nullcontext,
                     groups=grouped, **kwargs)


# ---- what a step reports: the first pass, at w ---------------------------------------------------

@pytest.mark.parametrize("groups", [None, (2, "vmap"), (2, "loop")], ids=["whole", "vmap", "loop"])
def test_a_step_reports_the_loss_and_accuracy_at_w_not_at_w_plus_e(groups):
    """rho 0.5 moves the loss at w + e well away from the loss at w: a step that reported its second
    pass would be off by far more than the float64 round-off allowed here."""
    model, (x, y) = bn_model(), batch()
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        if groups:  # each group normalised over its own images, the mean of the group losses
            parts = [reference(xi) for xi in x.chunk(groups[0])]
            losses = [F.cross_entropy(p, yi) for p, yi in zip(parts, y.chunk(groups[0]))]
            want_loss, logits = torch.stack(losses).mean(), torch.cat(parts)
        else:
            logits = reference(x)
            want_loss = F.cross_entropy(logits, y)
    want_correct = (logits.argmax(1) == y).sum()
    loss, correct, norm = step_of(model, groups=groups)(x, y)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
    assert int(correct) == int(want_correct) and norm is not None
    if not groups:  # the second pass's loss, at w + rho g / ||g||, is far away: the test can tell them apart
        probe = copy.deepcopy(reference)
        g = torch.autograd.grad(F.cross_entropy(probe(x), y), list(probe.parameters()))
        norm = torch.sqrt(sum((t ** 2).sum() for t in g))
        with torch.no_grad():
            for p, gi in zip(probe.parameters(), g):
                p.add_(0.5 * gi / norm)
            assert abs(F.cross_entropy(probe(x), y).item() - want_loss.item()) > 1e-2


# ---- BatchNorm's running statistics: from the first pass only, once -----------------------------

@pytest.mark.parametrize("groups", [None, (2, "vmap"), (2, "loop")], ids=["whole", "vmap", "loop"])
def test_batchnorm_statistics_after_one_sam_step_are_a_hand_computation_from_the_first_pass(groups):
    """running_mean = 0.9 * 0 + 0.1 * (mean of conv(x) at w over the batch, or each group's, averaged),
    running_var likewise with the unbiased variance; num_batches_tracked = 1. A statistic updated
    by the second pass (at w + e), or twice, differs."""
    model, (x, y) = bn_model(), batch()
    conv = copy.deepcopy(model[0])
    with torch.no_grad():
        parts = conv(x).chunk(groups[0] if groups else 1)
    mean = torch.stack([p.mean((0, 2, 3)) for p in parts]).mean(0)
    var = torch.stack([p.var((0, 2, 3), unbiased=True) for p in parts]).mean(0)
    step_of(model, groups=groups)(x, y)
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, 0.1 * mean, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(bn.running_var, 0.9 * torch.ones(4, dtype=torch.float64) + 0.1 * var,
                               rtol=1e-12, atol=1e-15)
    assert int(bn.num_batches_tracked) == 1


def test_batchnorm_statistics_through_train_py_step_come_from_the_first_pass():
    """The step train.py builds (build_training, a WideResNet, m = 16 over a batch of 32): every
    BatchNorm's statistics equal one forward pass at w of each group, averaged."""
    config = parse_config(["--model", "wrn10_1", "--batch-size", "32", "--m-sharpness", "16", "--device", "cpu"]).config
    training = build_training(config, 10, resolve_runtime(config), total_steps=10)
    model = training.model
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    copies = [copy.deepcopy(reference) for _ in range(2)]
    with torch.no_grad():
        for c, xi in zip(copies, x.chunk(2)):
            c(xi)
    training.step(x, y)
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point():
            want = torch.stack([dict(c.named_buffers())[name] for c in copies]).mean(0)
            torch.testing.assert_close(buffer, want, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert int(buffer) == 1, name


# ---- the weight decay: counted once ---------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["sam", "sgd"])
@pytest.mark.parametrize("where", ["loss", "optimizer"])
def test_the_weight_decay_is_counted_once(optimizer, where):
    config = parse_config(["--model", "wrn10_1", "--optimizer", optimizer, "--weight-decay-in", where,
                           "--weight-decay", "0.003", "--device", "cpu"]).config
    t = build_training(config, 10, resolve_runtime(config), total_steps=10)
    assert all(g["weight_decay"] == (0.003 if where == "optimizer" else 0.0) for g in t.optimizer.param_groups)
    assert t.step.weight_decay == (0.003 if where == "loss" else 0.0)


@pytest.mark.parametrize("where", ["loss", "optimizer"])
def test_an_sgd_step_with_weight_decay_is_w_minus_lr_times_g_plus_wd_w(where):
    """float64, momentum 0 on the first step (the buffer is the gradient itself): w - lr (g + wd w), in
    either place, once."""
    model, (x, y) = bn_model(), batch()
    wd, lr = 0.01, 0.1
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = copy.deepcopy(model)
    g = dict(zip(w, torch.autograd.grad(F.cross_entropy(reference(x), y), list(reference.parameters()))))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd if where == "optimizer" else 0.0)
    TrainStep(model, model, opt, nn.CrossEntropyLoss(), sam=False, autocast=contextlib.nullcontext,
              **({"weight_decay": wd} if where == "loss" else {}))(x, y)  # the default: no penalty in the loss
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[n] - lr * (g[n] + wd * w[n]), rtol=1e-12, atol=1e-15)


# ---- the normaliser: the training split's statistics --------------------------------------------

@pytest.mark.parametrize("subset, val_split", [(0, 0.0), (60, 0.0), (0, 0.25)])
def test_normalising_statistics_are_the_training_splits(tmp_path, subset, val_split):
    """Test images made brighter than the training ones, the validation part different again: the
    mean and std every loader uses are those of the training images the run trains on, in float64."""
    root = write_cifar10(tmp_path, per_batch=20)
    data = load_cifar("cifar10", root)
    data.test_images = np.clip(data.test_images.astype(int) + 60, 0, 255).astype(np.uint8)
    n = len(data.train_labels)
    data.train_images[-n // 4:] //= 2  # the last quarter (the validation part at 0.25) darker
    train, evals = build_loaders(data, augment="basic", batch_size=10, device="cpu", subset=subset, val_split=val_split,
                                 channels_last=False)
    used = data.train_images[:subset or n]
    used = used[:len(used) - round(val_split * len(used))].astype(np.float64) / 255
    want_mean, want_std = used.mean((0, 2, 3)), used.std((0, 2, 3))
    for loader in (train, *evals.values()):
        np.testing.assert_allclose(loader.normaliser.mean.flatten().numpy(), want_mean, rtol=1e-6)
        np.testing.assert_allclose(loader.normaliser.std.flatten().numpy(), want_std, rtol=1e-6)


# ---- the data order: a new permutation each epoch -----------------------------------------------

@pytest.mark.parametrize("loader", ["device", "workers"])
def test_every_epoch_visits_the_images_in_a_new_order_that_its_seed_and_epoch_decide(tmp_path, loader):
    data = load_cifar("cifar10", write_cifar10(tmp_path, per_batch=20))
    data.train_labels = np.arange(len(data.train_labels))  # each image's label is its index

    def order(epoch, seed=0):
        train, _ = build_loaders(data, augment="none", batch_size=10, device="cpu", loader=loader, workers=0,
                                 seed=seed, channels_last=False)
        train.set_epoch(epoch)
        return torch.cat([labels for _, labels in train]).tolist()

    orders = [order(e) for e in range(3)]
    assert all(sorted(o) == list(range(100)) for o in orders)  # each a permutation of every image
    assert orders[0] != orders[1] != orders[2] != orders[0]
    assert order(1) == orders[1] and order(1, seed=1) != orders[1]


# ---- the models: every stage's output size -----------------------------------------------------

STAGES = {  # (name, stage module indices in model.blocks: the last block of each stage) -> output shapes
    "resnet18": ([1, 3, 5, 7], [(64, 32), (128, 16), (256, 8), (512, 4)]),
    "resnet32": ([4, 9, 14], [(16, 32), (32, 16), (64, 8)]),
    "resnet32_jiang": ([4, 9, 14], [(128, 32), (256, 16), (512, 8)]),
    "wrn16_2": ([1, 3, 5], [(32, 32), (64, 16), (128, 8)]),
    "sam_wrn16_2": ([1, 3, 5], [(32, 32), (64, 16), (128, 8)]),
    "wrn10_1": ([0, 1, 2], [(16, 32), (32, 16), (64, 8)]),
}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_stage_outputs_the_size_its_architecture_defines(name):
    """He et al. / Zagoruyko & Komodakis: stride 1 in the first stage, 2 in every later one, the
    stage widths doubling; a stride that is wrong keeps the parameter count but not these shapes."""
    model = build_model(name).eval()
    indices, shapes = STAGES[name]
    seen = {}
    for i in indices:
        model.blocks[i].register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, tuple(out.shape)))
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert [seen[i] for i in indices] == [(2, c, s, s) for c, s in shapes]
    assert len(model.blocks) == indices[-1] + 1


# ---- residual blocks: output = shortcut + branch ------------------------------------------------

def test_each_residual_block_is_its_shortcut_plus_its_branch():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        b = PreActBlock(8, 8, 1, 0.0).eval()  # identity shortcut
        torch.testing.assert_close(b(x), x + b.conv2(F.relu(b.bn2(b.conv1(F.relu(b.bn1(x)))))))
        b = PreActBlock(8, 16, 2, 0.0).eval()  # 1x1 projection of the pre-activated input
        a = F.relu(b.bn1(x))
        torch.testing.assert_close(b(x), b.shortcut(a) + b.conv2(F.relu(b.bn2(b.conv1(a)))))
        for first in (False, True):
            b = SamBlock(8, 8, 1, first, "batch").eval()
            a = F.relu(b.bn1(x))
            torch.testing.assert_close(b(x), (a if first else x) + b.conv2(F.relu(b.bn2(b.conv1(a)))))
        b = SamBlock(8, 16, 2, False, "batch").eval()  # average-pooled, zero-padded identity
        want = F.pad(F.avg_pool2d(x, 2), (0, 0, 0, 0, 0, 8)) + b.conv2(F.relu(b.bn2(b.conv1(F.relu(b.bn1(x))))))
        torch.testing.assert_close(b(x), want)
        b = BasicBlock(8, 8, 1).eval()
        torch.testing.assert_close(b(x), F.relu(x + b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x)))))))
        b = BasicBlock(8, 16, 2).eval()
        torch.testing.assert_close(b(x), F.relu(b.shortcut(x) + b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x)))))))
        b = BasicBlock(8, 16, 2, zero_pad=True).eval()  # option A: subsample, zero-pad 4 + 4 channels
        want = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4)) + b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x)))))
        torch.testing.assert_close(b(x), F.relu(want))
        b = _JiangBlock(8, 8, 1, False).eval()
        branch = b.conv2(F.leaky_relu(b.bn2(b.conv1(F.leaky_relu(b.bn1(x), 0.1))), 0.1))
        torch.testing.assert_close(b(x), x + branch)
        b = _JiangBlock(8, 16, 2, False).eval()
        branch = b.conv2(F.leaky_relu(b.bn2(b.conv1(F.leaky_relu(b.bn1(x), 0.1))), 0.1))
        torch.testing.assert_close(b(x), F.pad(F.avg_pool2d(x, 2), (0, 0, 0, 0, 4, 4)) + branch)


# ---- what build_training builds: the settings, all of them --------------------------------------

@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no step is taken here
@pytest.mark.parametrize("flags", [["--optimizer", "sam"], ["--optimizer", "sgd", "--no-nesterov"],
                                   ["--adaptive", "--eta", "0.02", "--sam-p", "3", "--weight-decay-in", "optimizer"]])
def test_the_step_train_py_builds_carries_every_setting(flags):
    config = parse_config(["--model", "wrn10_1", "--batch-size", "32", "--m-sharpness", "16", "--lr", "0.3",
                           "--momentum", "0.8", "--weight-decay", "0.002", "--label-smoothing", "0.2",
                           "--grad-clip", "2.5", "--device", "cpu", *flags]).config
    if config["optimizer"] == "sam":
        config["rho"] = 0.3  # not SAM's own default, so a setting that went missing shows
    t = build_training(config, 10, resolve_runtime(config), total_steps=40)
    sam = config["optimizer"] == "sam"
    decay_in_optimizer = 0.002 if config["weight_decay_in"] == "optimizer" else 0.0
    for group in t.optimizer.param_groups:
        assert (group["lr"], group["initial_lr"], group["momentum"]) == (0.3, 0.3, 0.8)
        assert group["nesterov"] == config["nesterov"] and group["weight_decay"] == decay_in_optimizer
        if sam:
            assert group["rho"] == config["rho"] and group["eta"] == config["eta"]
    if sam:
        assert t.optimizer.p == config["sam_p"] and t.optimizer.second_order is False
        assert {g["adaptive"] for g in t.optimizer.param_groups} == ({True, False} if config["adaptive"] else {False})
    assert t.step.sam == sam and t.step.weight_decay == 0.002 - decay_in_optimizer and t.step.grad_clip == 2.5
    assert t.step.criterion.label_smoothing == 0.2 and t.step.scaler is None and t.scaler is None
    assert t.step.groups[0] == 2 and t.step.groups[1].weight_decay == t.step.weight_decay  # m 16 of 32: two groups
    assert t.model.fc.out_features == 10 and t.step.mark() is None  # no CUDA graphs on the CPU
    assert build_training(config, 100, resolve_runtime(config), 40).model.fc.out_features == 100
    for step in range(1, 41):  # the per-step cosine: lr = 0.3 (1 + cos(pi step / 40)) / 2, 0 at the end
        t.schedule.step()
        assert t.optimizer.param_groups[0]["lr"] == pytest.approx(0.15 * (1 + np.cos(np.pi * step / 40)), abs=1e-12)
    assert build_training({**config, "m_sharpness": 0}, 10, resolve_runtime(config), 40).step.groups is None
    assert build_training({**config, "m_sharpness": 32}, 10, resolve_runtime(config), 40).step.groups is None
    if config["optimizer"] == "sam" and not config["adaptive"]:
        second = build_training({**config, "sam_second_order": True, "m_sharpness": 0}, 10, resolve_runtime(config), 4)
        assert second.optimizer.second_order and second.step.second_order


def test_devices_precisions_and_memory_formats_resolve_as_documented(monkeypatch):
    from engine.config import ConfigError
    from engine.step import resolve_device
    cpu = parse_config(["--model", "wrn10_1"]).config
    assert resolve_device("auto", 3) == torch.device("cpu") or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", 1) == torch.device("cuda", 1) and resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda", 1) == torch.device("cuda", 1) and resolve_device("cuda:1", 0) == torch.device("cuda", 1)
    assert resolve_device("cpu", 1) == torch.device("cpu")
    with pytest.raises(ConfigError, match="only 2 CUDA device"):
        resolve_device("cuda:2")
    gpu = resolve_runtime({**cpu, "device": "auto"}, 1)
    assert (gpu.device, gpu.precision, gpu.channels_last) == (torch.device("cuda", 1), "bf16", True)
    explicit = resolve_runtime({**cpu, "device": "cuda", "channels_last": False, "precision": "fp32"})
    assert explicit.channels_last is False and explicit.device == torch.device("cuda", 0)
    plain = resolve_runtime({**cpu, "device": "cpu"})
    assert (plain.precision, plain.channels_last) == ("fp32", False)
    assert resolve_runtime({**cpu, "device": "cpu", "channels_last": True, "precision": "bf16"}).channels_last is True
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_runtime({**cpu, "device": "cpu", "precision": "fp16"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        resolve_device("cuda")
    assert resolve_device("auto", 3) == torch.device("cpu")


def test_speed_settings_reach_what_they_set(monkeypatch, tmp_path):
    """Each fast setting changes what it should (and only on the device it is for): autocast's type,
    the model's memory format, the compile mode, fused SGD, the DDP wrapper's buffer handling."""
    from engine.step import Runtime
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        assert Runtime(torch.device("cpu"), precision, False).autocast().fast_dtype == dtype
    config = parse_config(["--model", "wrn10_1", "--batch-size", "32", "--m-sharpness", "0", "--device", "cpu"]).config
    fast = build_training(config, 10, Runtime(torch.device("cpu"), "fp32", True), total_steps=10)
    assert fast.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not build_training(config, 10, resolve_runtime(config), 10).model.conv1.weight.is_contiguous(
        memory_format=torch.channels_last)
    assert not fast.optimizer.defaults.get("fused")  # fused SGD is CUDA's (test_cuda.py checks it there)
    modes = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: modes.append(kwargs.get("mode")) or module)
    for mode, want in (("default", None), ("reduce-overhead", "reduce-overhead"), ("max-autotune", "max-autotune")):
        compiled = build_training({**config, "compile": mode}, 10, resolve_runtime(config), 10)
        assert modes.pop() == want
        assert compiled.step.mark is not torch.compiler.cudagraph_mark_step_begin  # CUDA graphs are CUDA's
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = build_training(config, 10, resolve_runtime(config), 10, distributed=True).step.net
        assert isinstance(ddp, nn.parallel.DistributedDataParallel) and ddp.broadcast_buffers is False
        assert ddp.device_ids is None  # on the CPU; each replica keeps its own BatchNorm statistics
    finally:
        torch.distributed.destroy_process_group()


def test_a_step_of_a_sam_run_may_be_an_sgd_step_and_an_sgd_run_never_takes_a_sam_step():
    """TrainStep(sam=True) called with sam=False is exactly an SGD step of the same base optimizer (late-
    phase and randomized SAM), and the schedule does not take it for a missed optimizer step; called
    with sam=True, an SGD run's step stays an SGD step."""
    import warnings
    from engine.step import CosineSchedule
    model, (x, y) = bn_model(), batch()
    reference = copy.deepcopy(model)
    step_of(reference, sam=False)(x, y)
    want = {k: v.detach() for k, v in reference.named_parameters()}
    sam_run = copy.deepcopy(model)
    step = step_of(sam_run)
    schedule = CosineSchedule(step.optimizer, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, correct, norm = step(x, y, sam=False)
        schedule.step()
    assert norm is None
    for k, v in sam_run.named_parameters():
        torch.testing.assert_close(v.detach(), want[k], rtol=0, atol=0)
    sgd_run = copy.deepcopy(model)
    assert step_of(sgd_run, sam=False)(x, y, sam=True)[2] is None
    for k, v in sgd_run.named_parameters():
        torch.testing.assert_close(v.detach(), want[k], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_a_schedule_that_seeks_a_step_has_the_learning_rate_of_one_stepped_there():
    """What a resumed run does (engine/resume.py restore): bitwise the lr of the uninterrupted schedule,
    and the closed-form cosine."""
    from engine.step import CosineSchedule
    stepped_opt, sought_opt = (torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2) for _ in range(2))
    stepped, sought = CosineSchedule(stepped_opt, 40), CosineSchedule(sought_opt, 40)
    for step in range(1, 41):
        stepped.step()
        sought.seek(step)
        assert sought_opt.param_groups[0]["lr"] == stepped_opt.param_groups[0]["lr"]
        assert sought.get_last_lr() == stepped.get_last_lr()
        assert sought_opt.param_groups[0]["lr"] == pytest.approx(0.1 * (1 + np.cos(np.pi * step / 40)), abs=1e-15)
    sought.seek(17)
    sought.step()
    assert sought_opt.param_groups[0]["lr"] == pytest.approx(0.1 * (1 + np.cos(np.pi * 18 / 40)), abs=1e-15)


def test_hard_labels_of_soft_ones_are_the_class_with_the_larger_share():
    from engine.step import hard
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.0, 0.8]])
    assert hard(soft).tolist() == [0, 2] and hard(torch.tensor([2, 1])).tolist() == [2, 1]
    grouped = soft.expand(2, 2, 3)  # m-sharpness groups: G x m x classes
    assert hard(grouped).tolist() == [[0, 2], [0, 2]]
