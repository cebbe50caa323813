"""engine/step.py's TrainStep against float64 hand computations of the official training step
(google-research/sam flax_training.py train_step): weight decay as a loss term, so SAM's ascent
includes wd*w; the global-norm clip of the descent gradient; SAM's second-order term."""

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from engine.step import TrainStep, half_squared_norm
from sam import SAM

LR, RHO, WD = 0.1, 0.05, 0.05  # a large decay, so its share of the ascent is plain to see


def model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def grad_at(model, weights, x, y, decay):
    """float64 gradient of cross-entropy (+ (decay/2)||w||^2) at `weights`."""
    w = {k: v.detach().clone().requires_grad_(True) for k, v in weights.items()}
    loss = nn.functional.cross_entropy(functional_call(model, w, (x,)), y)
    loss = loss + 0.5 * decay * sum((v ** 2).sum() for v in w.values())
    return dict(zip(w, torch.autograd.grad(loss, list(w.values()))))


def official_step(model, x, y, decay_in_loss, clip):
    """One SAM step as the official train_step takes it, written out."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    decay = WD if decay_in_loss else 0.0
    g = grad_at(model, w, x, y, decay)
    norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
    e = {k: RHO * g[k] / norm for k in w}
    g2 = grad_at(model, {k: w[k] + e[k] for k in w}, x, y, decay)
    if clip:  # clip_by_global_norm: unchanged below the threshold, else rescaled to it
        total = torch.sqrt(sum((v ** 2).sum() for v in g2.values()))
        assert total > 2 * clip  # the case under test: the clip acts
        if total >= clip:
            g2 = {k: v / total * clip for k, v in g2.items()}
    if not decay_in_loss:  # SGD's own weight decay, outside the ascent and after the clip
        g2 = {k: g2[k] + WD * w[k] for k in w}
    return e, {k: w[k] - LR * g2[k] for k in w}


def our_step(model, x, y, decay_in_loss, clip):
    model = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, weight_decay=0.0 if decay_in_loss else WD)
    step = TrainStep(model, model, opt, nn.CrossEntropyLoss(), sam=True, autocast=contextlib.nullcontext,
                     weight_decay=WD if decay_in_loss else 0.0, grad_clip=clip)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    seen = {}
    real_first_step = opt.first_step

    def first_step(**kwargs):
        norm = real_first_step(**kwargs)
        seen.update({k: v.detach() - before[k] for k, v in model.named_parameters()})
        return norm

    opt.first_step = first_step
    step(x, y)
    return seen, {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize("decay_in_loss", [True, False], ids=["loss", "optimizer"])
@pytest.mark.parametrize("clip", [0.0, 0.05], ids=["no-clip", "clip"])  # the gradient's norm here is about 0.4
def test_one_step_is_the_official_train_step(decay_in_loss, clip):
    model, x, y = model_and_batch()
    want_e, want_w = official_step(model, x, y, decay_in_loss, clip)
    got_e, got_w = our_step(model, x, y, decay_in_loss, clip)
    for k in want_w:
        torch.testing.assert_close(got_e[k], want_e[k], rtol=1e-10, atol=1e-13, msg=k)
        torch.testing.assert_close(got_w[k], want_w[k], rtol=1e-10, atol=1e-13, msg=k)


def test_the_ascent_includes_wd_w_only_when_the_decay_is_in_the_loss():
    model, x, y = model_and_batch()
    in_loss, _ = our_step(model, x, y, True, 0.0)
    in_sgd, _ = our_step(model, x, y, False, 0.0)
    w = {k: v.detach() for k, v in model.named_parameters()}
    g = grad_at(model, w, x, y, 0.0)
    for decay, e in ((WD, in_loss), (0.0, in_sgd)):
        d = {k: g[k] + decay * w[k] for k in w}  # the ascent direction: g, plus wd*w in loss mode
        norm = torch.sqrt(sum((v ** 2).sum() for v in d.values()))
        for k in w:
            torch.testing.assert_close(e[k], RHO * d[k] / norm, rtol=1e-10, atol=1e-13)
    assert max((in_loss[k] - in_sgd[k]).abs().max().item() for k in w) > 1e-4


def test_the_clip_acts_only_above_the_threshold():
    model, x, y = model_and_batch()
    _, unclipped = our_step(model, x, y, True, 0.0)
    _, loose = our_step(model, x, y, True, 1e6)
    _, tight = our_step(model, x, y, True, 0.05)
    for k in unclipped:
        assert torch.equal(unclipped[k], loose[k])
    assert max((unclipped[k] - tight[k]).abs().max().item() for k in unclipped) > 1e-4


def test_two_steps_are_two_official_steps_with_momentum():
    """The state a step leaves behind (gradients cleared, momentum, w restored) is what the next one
    starts from: two TrainStep calls against two official steps written out, momentum 0.9, Nesterov."""
    model, x, y = model_and_batch()
    x2, y2 = x.flip(0), y.flip(0)
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    buf = {k: torch.zeros_like(v) for k, v in w.items()}
    for xb, yb in ((x, y), (x2, y2)):
        g = grad_at(model, w, xb, yb, WD)
        norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
        g2 = grad_at(model, {k: w[k] + RHO * g[k] / norm for k in w}, xb, yb, WD)
        buf = {k: 0.9 * buf[k] + g2[k] for k in w}
        w = {k: w[k] - LR * (g2[k] + 0.9 * buf[k]) for k in w}
    ours = copy.deepcopy(model)
    opt = SAM(ours.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, nesterov=True)
    step = TrainStep(ours, ours, opt, nn.CrossEntropyLoss(), sam=True, autocast=contextlib.nullcontext,
                     weight_decay=WD)
    step(x, y)
    step(x2, y2)
    for k, v in ours.named_parameters():
        torch.testing.assert_close(v.detach(), w[k], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("run", ["sgd", "sam-run"])
def test_sgd_steps_leave_no_gradient_behind(run):
    """An SGD step clears its gradient, so the next step (SGD, or SAM in a late-phase run) starts from
    nothing: an SGD step then a second step, against the two written out, momentum 0.9."""
    model, x, y = model_and_batch()
    x2, y2 = x.flip(0), y.flip(0)
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = grad_at(model, w, x, y, WD)
    buf = g
    w = {k: w[k] - LR * buf[k] for k in w}
    g = grad_at(model, w, x2, y2, WD)
    if run == "sam-run":  # the second step is a SAM step
        norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
        g = grad_at(model, {k: w[k] + RHO * g[k] / norm for k in w}, x2, y2, WD)
    buf = {k: 0.9 * buf[k] + g[k] for k in w}
    w = {k: w[k] - LR * buf[k] for k in w}
    ours = copy.deepcopy(model)
    opt = (torch.optim.SGD(ours.parameters(), lr=LR, momentum=0.9) if run == "sgd" else
           SAM(ours.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9))
    step = TrainStep(ours, ours, opt, nn.CrossEntropyLoss(), sam=run == "sam-run", autocast=contextlib.nullcontext,
                     weight_decay=WD)
    step(x, y, sam=False)
    step(x2, y2)
    for k, v in ours.named_parameters():
        torch.testing.assert_close(v.detach(), w[k], rtol=1e-10, atol=1e-13)


def test_the_second_order_gradient_is_clipped_whole():
    """The clip acts on the final descent gradient, second-order term included (restore() before it)."""
    model, x, y = model_and_batch()
    names = [n for n, _ in model.named_parameters()]
    w = [p.detach().clone().requires_grad_(True) for p in model.parameters()]

    def objective(weights):
        return nn.functional.cross_entropy(functional_call(model, dict(zip(names, weights)), (x,)), y)

    g = torch.autograd.grad(objective(w), w, create_graph=True)
    norm = torch.sqrt(sum((t ** 2).sum() for t in g))
    full = torch.autograd.grad(objective([a + RHO * b / norm for a, b in zip(w, g)]), w)
    total = torch.sqrt(sum((t ** 2).sum() for t in full))
    clip = 0.5 * total.item()
    ours = copy.deepcopy(model)
    opt = SAM(ours.parameters(), torch.optim.SGD, rho=RHO, lr=LR, second_order=True)
    TrainStep(ours, ours, opt, nn.CrossEntropyLoss(), sam=True, autocast=contextlib.nullcontext, grad_clip=clip)(x, y)
    for p, start, want in zip(ours.parameters(), model.parameters(), full):
        torch.testing.assert_close(p.detach(), start.detach() - LR * want * clip / total, rtol=1e-10, atol=1e-13)


def test_half_squared_norm_and_its_gradient():
    w = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(5, dtype=torch.float64,
                                                                                requires_grad=True)]
    value = half_squared_norm(w, 0.3)
    torch.testing.assert_close(value, 0.15 * sum((t ** 2).sum() for t in w), rtol=1e-14, atol=0)
    for t, g in zip(w, torch.autograd.grad(value, w)):
        torch.testing.assert_close(g, 0.3 * t, rtol=1e-14, atol=0)


def test_second_order_step_with_the_decay_in_the_loss_is_the_full_gradient():
    """Through TrainStep (which takes the first gradient with create_graph): the descent gradient
    is d/dw of [CE + (wd/2)||.||^2](w + e(w)) with e(w) from the penalised gradient."""
    model, x, y = model_and_batch()
    names = [n for n, _ in model.named_parameters()]
    w = [p.detach().clone().requires_grad_(True) for p in model.parameters()]

    def objective(weights):
        loss = nn.functional.cross_entropy(functional_call(model, dict(zip(names, weights)), (x,)), y)
        return loss + 0.5 * WD * sum((t ** 2).sum() for t in weights)

    g = torch.autograd.grad(objective(w), w, create_graph=True)
    norm = torch.sqrt(sum((t ** 2).sum() for t in g))
    full = torch.autograd.grad(objective([a + RHO * b / norm for a, b in zip(w, g)]), w)

    ours = copy.deepcopy(model)
    opt = SAM(ours.parameters(), torch.optim.SGD, rho=RHO, lr=LR, second_order=True)
    TrainStep(ours, ours, opt, nn.CrossEntropyLoss(), sam=True, autocast=contextlib.nullcontext,
              weight_decay=WD)(x, y)
    for p, start, want in zip(ours.parameters(), model.parameters(), full):
        torch.testing.assert_close(p.detach(), start.detach() - LR * want, rtol=1e-10, atol=1e-13)
