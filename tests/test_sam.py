"""SAM against independent float64 hand computations of the paper's update."""

import copy
import gc
import math
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import example, given, settings, strategies as st
from torch.func import functional_call

from sam import SAM, frozen_bn_stats

LR, RHO = 0.1, 0.05


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def batch(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def reference_grads(model, weights, x, y):
    """float64 loss gradient at `weights` (a name -> tensor dict), in train mode."""
    ref = copy.deepcopy(model).double().train()
    w = {k: v.detach().double().requires_grad_(True) for k, v in weights.items()}
    loss = nn.functional.cross_entropy(functional_call(ref, w, (x.double(),)), y)
    return dict(zip(w, torch.autograd.grad(loss, list(w.values()))))


def sam_two_step(model, opt, x, y):
    nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    perturbed = {k: v.detach().clone() for k, v in model.named_parameters()}
    with frozen_bn_stats(model):
        nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    return perturbed


def test_one_step_matches_float64_hand_computation():
    model = small_model()
    x, y = batch()
    w0 = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    perturbed = sam_two_step(model, opt, x, y)

    g = reference_grads(model, w0, x, y)
    norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
    w_adv = {k: w0[k] + RHO * g[k] / norm for k in w0}
    g_adv = reference_grads(model, w_adv, x, y)
    for k, v in model.named_parameters():
        torch.testing.assert_close(perturbed[k].double(), w_adv[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(v.detach().double(), w0[k] - LR * g_adv[k], rtol=0, atol=1e-6)


def test_first_step_returns_global_norm_and_second_step_restores_bitwise():
    model = small_model()
    x, y = batch()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.0)
    nn.functional.cross_entropy(model(x), y).backward()
    expected = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
    norm = opt.first_step(zero_grad=True)
    assert torch.is_tensor(norm) and norm.item() == pytest.approx(expected.item(), rel=1e-6)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step()
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)  # lr 0: the restore alone must be exact


def test_asam_matches_its_formula():
    model = small_model()
    x, y = batch()
    eta = 0.01
    w0 = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, eta=eta, lr=LR)
    perturbed = sam_two_step(model, opt, x, y)

    g = reference_grads(model, w0, x, y)
    t = {k: w0[k].abs() + eta for k in w0}
    norm = torch.sqrt(sum(((t[k] * g[k]) ** 2).sum() for k in g))
    w_adv = {k: w0[k] + 0.5 * t[k] ** 2 * g[k] / norm for k in w0}
    g_adv = reference_grads(model, w_adv, x, y)
    for k, v in model.named_parameters():
        torch.testing.assert_close(perturbed[k].double(), w_adv[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(v.detach().double(), w0[k] - LR * g_adv[k], rtol=0, atol=1e-6)


def test_per_group_rho_and_adaptive():
    model = small_model()
    x, y = batch()
    w0 = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    others = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    opt = SAM([{"params": weights, "adaptive": True}, {"params": others, "rho": 0.2}],
              torch.optim.SGD, rho=0.1, lr=LR)
    perturbed = sam_two_step(model, opt, x, y)

    g = reference_grads(model, w0, x, y)
    t = {k: (w0[k].abs() if k.endswith("weight") else torch.ones_like(w0[k])) for k in w0}
    norm = torch.sqrt(sum(((t[k] * g[k]) ** 2).sum() for k in g))
    for k in w0:
        rho = 0.1 if k.endswith("weight") else 0.2
        torch.testing.assert_close(perturbed[k].double(), w0[k] + rho * t[k] ** 2 * g[k] / norm,
                                   rtol=0, atol=1e-6)


def test_rho_zero_is_exactly_the_base_optimizer():
    x, y = batch()
    a, b = small_model(), small_model()
    sam = SAM(a.parameters(), torch.optim.SGD, rho=0.0, lr=LR, momentum=0.9, nesterov=True)
    sgd = torch.optim.SGD(b.parameters(), lr=LR, momentum=0.9, nesterov=True)
    for _ in range(3):
        sam_two_step(a, sam, x, y)
        nn.functional.cross_entropy(b(x), y).backward()
        sgd.step()
        sgd.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_closure_form_equals_two_step_form_bitwise():
    x, y = batch()
    a, b = small_model(), small_model()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)

    def closure():
        loss = nn.functional.cross_entropy(b(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        nn.functional.cross_entropy(a(x), y).backward()
        opt_a.first_step(zero_grad=True)
        nn.functional.cross_entropy(a(x), y).backward()
        opt_a.second_step(zero_grad=True)
        closure()  # davda54 style: first backward outside, then step(closure)
        opt_b.step(closure)
        opt_b.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_closure_alone_computes_the_first_gradient_too():
    x, y = batch()
    a, b = small_model(), small_model()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    nn.functional.cross_entropy(a(x), y).backward()
    opt_a.first_step(zero_grad=True)
    nn.functional.cross_entropy(a(x), y).backward()
    opt_a.second_step(zero_grad=True)
    opt_b.step(lambda: nn.functional.cross_entropy(b(x), y).backward())
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_step_without_closure_is_a_clear_error():
    opt = SAM(small_model().parameters(), torch.optim.SGD, lr=LR)
    with pytest.raises(ValueError, match="closure"):
        opt.step()


def test_parameters_without_grad_are_skipped():
    model = small_model()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    sam_two_step(model, opt, x, y)
    assert frozen.grad is None and torch.equal(frozen, before)
    assert "backup" not in opt.state[frozen]


def test_zero_gradient_gives_no_nan_and_no_move():
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    norm = opt.first_step()
    assert norm.item() == 0.0
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)
    opt.second_step()
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)


def test_a_vanishing_gradient_gives_a_small_step_along_it():
    """e = rho g / (||g|| + eps): with ||g|| far below eps the ascent shrinks towards 0, still along g."""
    model = small_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    g = [torch.randn_like(p, dtype=torch.float64) for p in model.parameters()]
    total = torch.sqrt(sum((t ** 2).sum() for t in g))
    for p, t in zip(model.parameters(), g):
        p.data = p.data.double()
        p.grad = t / total * 1e-13  # ||g|| = 1e-13
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    for b, p, t in zip(before, model.parameters(), g):
        torch.testing.assert_close(p.detach() - b, RHO * (t / total * 1e-13) / (1e-13 + 1e-12), rtol=1e-6, atol=0)


def test_no_gradients_at_all_is_a_no_op():
    model = small_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    assert opt.first_step() is None
    opt.second_step()


def test_state_dict_round_trip_continues_identically():
    x, y = batch()
    model = small_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    for _ in range(2):
        sam_two_step(model, opt, x, y)
    state = opt.state_dict()
    assert all("momentum_buffer" in s for s in state["state"].values())
    assert state["param_groups"][0]["rho"] == RHO

    clone = copy.deepcopy(model)
    opt2 = SAM(clone.parameters(), torch.optim.SGD, rho=0.5, lr=1.0, momentum=0.9)
    opt2.load_state_dict(copy.deepcopy(state))
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.param_groups[0]["rho"] == RHO and opt2.param_groups[0]["lr"] == LR
    sam_two_step(model, opt, x, y)
    sam_two_step(clone, opt2, x, y)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_lr_scheduler_on_sam_drives_the_base_optimizer_without_warning():
    model = small_model()
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sam_two_step(model, opt, x, y)
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(LR * (1 + 0.7071067811865476) / 2)


def test_bn_running_stats_come_from_the_first_pass_only():
    model = small_model()
    plain = copy.deepcopy(model)
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    sam_two_step(model, opt, x, y)
    plain(x)  # one plain training-mode forward
    bn, ref = model[1], plain[1]
    assert torch.equal(bn.running_mean, ref.running_mean)
    assert torch.equal(bn.running_var, ref.running_var)
    assert bn.num_batches_tracked.item() == 1


def test_frozen_bn_stats_restores_tracking_after_an_exception():
    model = small_model()
    with pytest.raises(RuntimeError):
        with frozen_bn_stats(model):
            raise RuntimeError("boom")
    assert model[1].track_running_stats


@pytest.mark.parametrize("kwargs, error", [
    (dict(rho=-0.1), ValueError), (dict(eta=-1.0), ValueError),
    (dict(base_optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)), TypeError),
    (dict(base_optimizer="sgd"), TypeError),
])
def test_invalid_arguments_are_rejected(kwargs, error):
    kwargs.setdefault("base_optimizer", torch.optim.SGD)
    with pytest.raises(error, match="rho|eta|base_optimizer"):
        SAM(small_model().parameters(), lr=LR, **kwargs)


def test_negative_rho_in_a_param_group_is_rejected():
    model = small_model()
    with pytest.raises(ValueError, match="rho"):
        SAM([{"params": model.parameters(), "rho": -1}], torch.optim.SGD, lr=LR)


def test_fp16_grad_scaler_order_matches_unscaled_sam():
    x, y = batch()
    a, b = small_model(), small_model()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    sam_two_step(a, opt_a, x, y)

    scaler.scale(nn.functional.cross_entropy(b(x), y)).backward()
    scaler.unscale_(opt_b)
    opt_b.first_step(zero_grad=True)
    with frozen_bn_stats(b):
        scaler.scale(nn.functional.cross_entropy(b(x), y)).backward()
    opt_b.second_step(zero_grad=True, scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 1024.0
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad_pass", ["first", "second"])
def test_fp16_grad_scaler_skips_the_step_cleanly_on_inf(bad_pass):
    x, y = batch()
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    if bad_pass == "first":
        model[0].weight.grad[0, 0] = float("inf")
    scaler.unscale_(opt)
    opt.first_step(zero_grad=True)
    with frozen_bn_stats(model):
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    if bad_pass == "second":
        model[3].bias.grad[0] = float("nan")
    opt.second_step(zero_grad=True, scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 512.0
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)
    assert not opt.base_optimizer.state  # no momentum buffer was created either


def test_bf16_autocast_step_runs_without_a_scaler():
    model = small_model()
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nn.functional.cross_entropy(model(x), y).backward()
    norm = opt.first_step(zero_grad=True)
    assert norm.dtype == torch.float32 and torch.isfinite(norm)
    with torch.autocast("cpu", dtype=torch.bfloat16), frozen_bn_stats(model):
        nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


# ---- the paper's ablations: p-norm ascent (Appendix C.5), second-order term (Appendix C.4) ----

@pytest.mark.parametrize("p, adaptive", [(float("inf"), False), (3.0, False), (1.5, False), (float("inf"), True),
                                         (4.0, True)])
def test_p_norm_ascent_matches_the_dual_norm_formula(p, adaptive):
    """e = rho T sign(Tg)|Tg|^(q-1) / ||Tg||_q^(q-1), 1/p + 1/q = 1 (T = |w| + eta for ASAM), in float64
    (in float32 the first layer's bias, whose gradient is zero up to round-off under BatchNorm, would
    get a random sign: p = inf turns round-off into +-rho)."""
    model = small_model().double()
    x, y = batch()
    x = x.double()
    rho, eta = (0.5, 0.01) if adaptive else (RHO, 0.0)
    w0 = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, eta=eta, p=p, lr=LR)
    perturbed = sam_two_step(model, opt, x, y)

    g = reference_grads(model, w0, x, y)
    q = 1.0 if p == float("inf") else p / (p - 1)
    t = {k: (w0[k].abs() + eta) if adaptive else torch.ones_like(w0[k]) for k in w0}
    s = {k: t[k] * g[k] for k in g}
    dual = sum((s[k].abs() ** q).sum() for k in s) ** (1 / q)
    w_adv = {k: w0[k] + rho * t[k] * s[k].sign() * s[k].abs() ** (q - 1) / dual ** (q - 1) for k in w0}
    g_adv = reference_grads(model, w_adv, x, y)
    for k, v in model.named_parameters():
        torch.testing.assert_close(perturbed[k], w_adv[k], rtol=0, atol=1e-12)
        torch.testing.assert_close(v.detach(), w0[k] - LR * g_adv[k], rtol=0, atol=1e-12)


def test_p_infinity_is_rho_times_the_sign():
    model = small_model().double()
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, p=float("inf"), lr=LR)
    nn.functional.cross_entropy(model(x.double()), y).backward()
    signs = [p.grad.sign() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    for b, s, p in zip(before, signs, model.parameters()):
        torch.testing.assert_close(p.detach() - b, RHO * s, rtol=0, atol=1e-12)


def smooth_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


# torch warns on every backward(create_graph=True) that .grad and its graph form a cycle; the
# drop-in API needs that backward, and the test below checks that SAM breaks the cycle itself.
CREATE_GRAPH_CYCLE = "ignore:Using backward\\(\\) with create_graph=True:UserWarning"


@pytest.mark.filterwarnings(CREATE_GRAPH_CYCLE)
def test_second_order_gradient_is_the_full_gradient_of_the_sam_loss():
    """With second_order=True the base optimizer steps with d/dw L(w + e(w)), e(w) = rho g/||g||,
    the gradient through e(w) included: checked against autograd of that whole composite in float64
    (and it differs from the first-order gradient, so the test can tell them apart)."""
    x, y = batch()
    x = x.double()
    model = smooth_model()
    w0 = [p.detach().clone() for p in model.parameters()]

    def loss_at(weights):
        names = [n for n, _ in model.named_parameters()]
        return nn.functional.cross_entropy(functional_call(model, dict(zip(names, weights)), (x,)), y)

    w = [t.clone().requires_grad_(True) for t in w0]
    g = torch.autograd.grad(loss_at(w), w, create_graph=True)
    norm = torch.sqrt(sum((t ** 2).sum() for t in g))
    full = torch.autograd.grad(loss_at([a + RHO * b / norm for a, b in zip(w, g)]), w)
    first_order = torch.autograd.grad(loss_at([a + RHO * b.detach() / norm.detach() for a, b in zip(w, g)]), w)

    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, second_order=True)
    nn.functional.cross_entropy(model(x), y).backward(create_graph=True)
    opt.first_step(zero_grad=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.restore()
    for p, want, start in zip(model.parameters(), full, w0):
        assert torch.equal(p.detach(), start)  # w is back bitwise
        torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12)
    gap = max((a - b).abs().max().item() for a, b in zip(full, first_order))
    assert gap > 1e-6
    opt.second_step(zero_grad=True)
    for p, start, want in zip(model.parameters(), w0, full):
        torch.testing.assert_close(p.detach(), start - LR * want, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings(CREATE_GRAPH_CYCLE)
def test_second_order_step_frees_the_first_gradient_graph():
    """backward(create_graph=True) ties each .grad to a graph that refers back to the parameter.
    After second_step(zero_grad=True) nothing may still hold those gradients: with the cyclic
    collector off, plain reference counting has to free them, step after step."""
    model = smooth_model()
    x, y = batch()
    x = x.double()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, second_order=True)
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):
            nn.functional.cross_entropy(model(x), y).backward(create_graph=True)
            first = [weakref.ref(p.grad) for p in model.parameters()]
            opt.first_step(zero_grad=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
            assert [r() for r in first] == [None] * len(first)
    finally:
        gc.enable()


def test_second_order_needs_the_graph_and_plain_sam():
    model = smooth_model()
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, second_order=True)
    nn.functional.cross_entropy(model(x.double()), y).backward()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.first_step()
    for kwargs in (dict(p=float("inf")), dict(adaptive=True)):
        with pytest.raises(ValueError, match="second_order=True supports"):
            SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, second_order=True, **kwargs)
    with pytest.raises(ValueError, match="p must be a real number in"):
        SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, p=1.0)
    first, *rest = model.parameters()  # one rho for the Hessian-vector product: two are refused
    with pytest.raises(ValueError, match="one rho for all groups"):
        SAM([{"params": [first], "rho": 0.1}, {"params": rest}], torch.optim.SGD, rho=RHO, lr=LR, second_order=True)
    SAM([{"params": [first], "rho": RHO}, {"params": rest}], torch.optim.SGD, rho=RHO, lr=LR, second_order=True)


def test_the_api_defaults_are_davda54s():
    """SAM(params, SGD, lr=...) as davda54/sam documents it: rho 0.05, not adaptive; the base optimizer's
    defaults are SAM's too (so a param group added later gets them); first_step() and second_step()
    leave the gradients alone unless asked (zero_grad=False), and perturbation() only reads them."""
    model = small_model()
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=0.9)
    assert opt.param_groups[0]["rho"] == 0.05 and opt.param_groups[0]["adaptive"] is False
    assert opt.defaults["lr"] == LR and opt.defaults["momentum"] == 0.9
    extra = nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra]})  # filled from the defaults: SGD's own (dampening, ...) included
    assert opt.param_groups[-1]["lr"] == LR and opt.param_groups[-1]["rho"] == 0.05
    assert opt.param_groups[-1]["dampening"] == 0 and opt.param_groups[-1]["nesterov"] is False
    opt.base_optimizer.step()  # SGD reads every key of every group
    opt.param_groups.pop()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.perturbation()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    opt.first_step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # not zeroed
    for p in model.parameters():
        p.grad = None
    with frozen_bn_stats(model):
        nn.functional.cross_entropy(model(x), y).backward()
    second = [p.grad.clone() for p in model.parameters()]
    opt.second_step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), second))  # not zeroed either


# ---- hostile hyperparameters and misuse of the two-call API ----

NAN, INF = float("nan"), float("inf")
SAM_KEYS, BASE_KEYS = ("rho", "eta", "eps", "p"), ("lr", "momentum", "weight_decay")
FLAGS = ("adaptive", "second_order")
VALID = {  # the paper's grid, davda54/sam's and ASAM's defaults, the configs' values
    "rho": [0, 0.01, 0.05, 0.1, 0.5, 1, 2, 10], "eta": [0, 0.01, 1], "eps": [1e-12, 1e-8, 1e-16],
    "p": [2, 1.5, 3, INF], "lr": [0, 0.05, 0.1, 1], "momentum": [0, 0.9], "weight_decay": [0, 5e-4]}
NOT_FLAGS = ["false", "False", "True", 0, 1, 2, 1.0, None, np.int64(1), torch.tensor(True)]
NOT_NUMBERS = [True, False, np.True_, "0.1", None, [0.1], 1j, torch.tensor([0.1, 0.2]), torch.tensor(True)]
REFUSED = {  # beyond NOT_NUMBERS, nan and every negative number
    "rho": [INF, 1e308, np.float64(1e39)], "eta": [INF, 1e308], "eps": [0, INF, 1e-300, 1e308],
    "p": [1, 1.0000001, 1 + 1e-12, 0.5, 0], **{k: [INF, 1e39, 1e308] for k in BASE_KEYS}}


def all_types(v):
    """v as every real number type a caller may pass: float, numpy floats, a 0-dim tensor, ints if whole."""
    whole = math.isfinite(v) and v == int(v)
    floats = [float(v), np.float32(v), np.float64(v), torch.tensor(float(v))]
    return floats + ([int(v), np.int64(v)] if whole else [])


def hyperparameters(key):
    """(value, verdict): "accept", "refuse", or "either" (ValueError or a finite step; refused if nan, negative
    or, but for p, infinite)."""
    if key in FLAGS:
        return st.one_of(st.sampled_from([True, False, np.True_, np.False_]).map(lambda v: (v, "accept")),
                         st.sampled_from(NOT_FLAGS).map(lambda v: (v, "refuse")))
    return st.one_of(
        st.sampled_from(VALID[key]).flatmap(lambda v: st.sampled_from(all_types(v))).map(lambda v: (v, "accept")),
        st.sampled_from(NOT_NUMBERS + REFUSED[key] + [NAN, np.float32(NAN), -INF, -1, -1e-9, np.float32(-1)])
        .map(lambda v: (v, "refuse")),
        st.one_of(st.floats(), st.floats(width=32).map(np.float32), st.integers(-10**40, 10**40),
                  st.integers(-2**63, 2**63 - 1).map(np.int64)).map(lambda v: (v, "either")))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["constructor", "group"]), st.sampled_from(SAM_KEYS + BASE_KEYS + FLAGS).flatmap(
    lambda key: st.tuples(st.just(key), hyperparameters(key))))
@example("constructor", ("eps", (NAN, "refuse"))).via("hostile tester")
@example("constructor", ("eps", (-1, "refuse"))).via("hostile tester")
@example("constructor", ("eps", (INF, "refuse"))).via("hostile tester")
@example("constructor", ("p", (1.0000001, "refuse"))).via("hostile tester")
@example("constructor", ("rho", (1e308, "refuse"))).via("hostile tester")
@example("constructor", ("adaptive", ("false", "refuse"))).via("hostile tester")
@example("constructor", ("adaptive", (2, "refuse"))).via("hostile tester")
@example("constructor", ("second_order", ("False", "refuse"))).via("hostile tester")
@example("group", ("rho", (NAN, "refuse"))).via("hostile tester")
@example("group", ("rho", (-5, "refuse"))).via("hostile tester")
@example("group", ("lr", (INF, "refuse"))).via("hostile tester")
@example("constructor", ("rho", (np.float32(0.05), "accept"))).via("hostile tester")
@example("constructor", ("rho", (np.int64(1), "accept"))).via("hostile tester")
@example("group", ("rho", (np.float32(0.05), "accept"))).via("hostile tester")
def test_every_hyperparameter_is_refused_or_trains_finite(where, drawn):
    """Hostile values of every argument, given to SAM(...) or to add_param_group: a ValueError (the README's
    promise, for wrong types too), or one SAM step that leaves every weight finite. Valid values of any real
    number type (numpy scalars, tensors) are accepted, flags only as bools; eps, p and second_order are for
    SAM(...), refused in a group. An accepted lr, momentum or weight decay above 1e6 is not stepped with: what
    it does to the weights is the base optimizer's business."""
    key, (value, verdict) = drawn
    if verdict == "either":
        number = float(value)
        if math.isnan(number) or number < 0 or (math.isinf(number) and key != "p"):
            verdict = "refuse"
    if where == "group" and key in ("eps", "p", "second_order"):
        verdict = "refuse"
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    base = dict(lr=0.1, momentum=0.5, adaptive=key == "eta")
    try:
        if where == "constructor":
            optimizer = SAM(model.parameters(), torch.optim.SGD, **{**base, key: value})
        else:
            optimizer = SAM([model.weight], torch.optim.SGD, **base)
            optimizer.add_param_group({"params": [model.bias], "adaptive": key == "eta", key: value})
    except ValueError:
        assert verdict != "accept", (key, value)
        return
    assert verdict != "refuse", (key, value)
    if key in FLAGS:
        assert type(optimizer.param_groups[-1].get(key, optimizer.second_order)) is bool
    if key in BASE_KEYS and float(value) > 1e6:
        return
    x, y = 10 * torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    nn.functional.cross_entropy(model(x), y).backward(create_graph=optimizer.second_order is True)
    optimizer.first_step(zero_grad=True)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.second_step(zero_grad=True)
    assert all(torch.isfinite(p).all() for p in model.parameters()), (key, value)


@pytest.mark.filterwarnings(CREATE_GRAPH_CYCLE)
def test_a_group_added_later_meets_second_orders_terms():
    """second_order=True needs one rho and no ASAM in every group, added later too; a refused group is not
    added."""
    first, *rest = smooth_model().parameters()
    opt = SAM([first], torch.optim.SGD, rho=RHO, lr=LR, second_order=True)
    for bad in (dict(rho=0.1), dict(adaptive=True)):
        with pytest.raises(ValueError, match="second_order=True supports p=2, adaptive=False and one rho"):
            opt.add_param_group({"params": rest, **bad})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": rest, "rho": np.float64(RHO)})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["rho"] == RHO


def test_first_step_twice_is_refused_and_the_step_stays_right():
    x, y = batch()
    model, reference = small_model(), small_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    sam_two_step(reference, SAM(reference.parameters(), torch.optim.SGD, rho=RHO, lr=LR), x, y)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match=r"first_step\(\) called twice: call second_step\(\) \(or restore\(\)\) after each"):
        opt.first_step()
    opt.zero_grad()
    with frozen_bn_stats(model):
        nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)  # the refused call changed nothing


def test_second_step_without_first_step_is_refused():
    x, y = batch()
    model = small_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x), y).backward()
    order = r"second_step\(\) without first_step\(\): call first_step\(\) after the first backward, then"
    with pytest.raises(RuntimeError, match=order):
        opt.second_step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # no plain SGD step taken
    opt.zero_grad()
    sam_two_step(model, opt, x, y)
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=order):  # one first_step, one second_step
        opt.second_step()


def test_perturbation_takes_gradients_shaped_g_by_the_parameter_and_then_second_step():
    """perturbation(grads) wants {param: (G, *param.shape)}, one G >= 1 for all: anything else (no group
    axis, a shape that merely broadcasts, two Gs, G = 0) is refused. Given right, it is the ascent: second_step
    follows."""
    model = small_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    params = list(model.parameters())
    weight, bias = params[0], params[1]  # (8, 5) and (8,)
    good = {p: torch.randn(8, *p.shape) for p in params}
    wrongs = ({weight: torch.randn(8, 5)}, {weight: torch.randn(8, 1, 5)}, {bias: torch.randn(8, 1)},
              {bias: torch.randn(4, 8)}, {weight: torch.randn(8, 8, 5, 1)},
              {p: torch.randn(0, *p.shape) for p in params})
    for wrong in wrongs:
        with pytest.raises(ValueError, match=r"perturbation\(grads\) takes \{param: tensor of shape \(G, \*param"):
            opt.perturbation({**good, **wrong})
    with pytest.raises(RuntimeError, match="second_step"):
        opt.second_step()  # the refused calls were no ascent
    out, e, norms = opt.perturbation(good)
    assert [t.shape for t in e] == [good[p].shape for p in out] and norms.shape == (8,)
    for p in params:
        p.grad = good[p].mean(0)
    opt.second_step(zero_grad=True)


def test_sam_takes_a_one_element_tensor_and_refuses_bools_strings_and_longer_tensors():
    """torch's SGD takes a tensor lr; SAM checks its value. True is no learning rate, nor is '0.1'."""
    model = nn.Linear(3, 2)
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=torch.tensor(0.1), rho=torch.tensor(0.05))
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(0.1)
    for key in ("rho", "lr", "momentum", "weight_decay"):
        for bad in (True, "0.1", torch.tensor([0.1, 0.2]), torch.tensor(float("nan"))):
            with pytest.raises(ValueError, match=f"{key} must be a real number in"):
                SAM(model.parameters(), torch.optim.SGD, **{"lr": 0.1, "rho": 0.05, key: bad})


@pytest.mark.parametrize("key, low, high", [("rho", 0.0, 100.0), ("eta", 0.0, 100.0), ("eps", 1e-30, 1e-3),
                                            ("p", 1.5, math.inf)])
def test_each_range_holds_its_bounds_and_nothing_beyond(key, low, high):
    """The documented interval, closed: its ends are accepted, a step beyond either is refused."""
    params = lambda: small_model().parameters()  # noqa: E731
    for value in (low, high):
        SAM(params(), torch.optim.SGD, lr=LR, **{key: value})
    for value in (low * 0.5 if low else -1e-9, high * 1.005):
        if value != math.inf:
            with pytest.raises(ValueError, match=f"{key} must be a real number in"):
                SAM(params(), torch.optim.SGD, lr=LR, **{key: value})


def test_numbers_are_stored_plain_and_a_tensor_lr_stays_a_tensor():
    """numpy scalars become floats (what the group prints and checkpoints); torch's SGD takes a tensor lr,
    which stays one; SAM's own rho and eta are always plain floats."""
    opt = SAM(small_model().parameters(), torch.optim.SGD, rho=np.float32(0.05), eta=torch.tensor(0.01),
              lr=torch.tensor(0.1), momentum=np.float64(0.9))
    group = opt.param_groups[0]
    assert type(group["rho"]) is float and type(group["eta"]) is float and type(group["momentum"]) is float
    assert torch.is_tensor(group["lr"])


def test_grouped_gradients_of_any_wrong_shape_are_refused():
    """perturbation(grads): every parameter's grads (G, *param.shape) with one G; a wrong trailing shape is
    refused even where its leading size looks right."""
    model = small_model()
    params = list(model.parameters())
    grads = {p: torch.zeros(1, *p.shape) for p in params}
    SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR).perturbation(grads)
    bad = dict(grads)
    bad[params[0]] = torch.zeros(1, *params[0].shape, 2)
    with pytest.raises(ValueError, match="perturbation"):
        SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR).perturbation(bad)
