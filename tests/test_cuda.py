"""The CUDA path, each fast setting against its plain one (same seed, same batch), with the tolerance
each one's arithmetic allows. Marked `cuda`: skipped without a GPU; `python -m benchmarks.suite` runs
them (`pytest -m cuda`). SAM_CUDA_TESTS_DEVICE=cpu runs what can run on a CPU, to check the tests
themselves.

Tolerances, from the number formats, on what a step does: its weight update (all parameters as one
vector), its loss and ascent norm, and BatchNorm's statistics. fp32 with TF32 off (set here: cuDNN
would otherwise run fp32 convolutions in TF32, 10-bit mantissas) differs between algorithms only in
the order of sums, which BatchNorm over small batches and SAM's ascent then amplify: over three steps
the updates agree to 5e-3 of their size (measured on a CPU, WRN-16-2 at batch 64: channels_last 2.8e-3,
torch.compile 2.5e-3, vmap against the loop 7.9e-4), the losses to 1e-4 and the ascent norms to 3e-3
(measured 1.1e-3),
while SAM's update differs from SGD's by tens of percent. bf16 keeps 8 bits of mantissa (rounding
2^-9 = 0.2% per operation), fp16 11 bits: a step's update agrees with fp32's in direction (cosine >
0.99) and in size to within 10% (measured on a CPU: 0.9%), not bitwise. Each test records what it
measured (SAM_CUDA_FIGURES), so the suite's JSON holds the figures, not only a pass."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, write_cifar10
from engine.config import parse_config
from engine.step import Runtime, build_training

pytestmark = pytest.mark.cuda
ON = os.environ.get("SAM_CUDA_TESTS_DEVICE", "cuda")
FIGURES = os.environ.get("SAM_CUDA_FIGURES")  # the suite's file for the figures these tests measure


@pytest.fixture
def device():
    if ON == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(ON)


@pytest.fixture(autouse=True)
def strict_fp32():
    """fp32 means fp32: no TF32 in matmuls or convolutions while these tests compare."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def record(**figures):
    if FIGURES:
        existing = json.loads(open(FIGURES).read()) if os.path.exists(FIGURES) else {}
        with open(FIGURES, "w") as f:
            json.dump({**existing, **figures}, f, indent=2)


def training(device, *flags, precision="fp32", channels_last=False, model="wrn16_2", batch=64):
    config = parse_config(["--model", model, "--batch-size", str(batch), "--device", str(device), *flags]).config
    torch.manual_seed(0)
    return build_training(config, 10, Runtime(device, precision, channels_last), total_steps=100)


def data(device, batch=64, channels_last=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), \
        torch.randint(0, 10, (batch,), generator=g).to(device)


def run_steps(t, batches, sam=None):
    out = []
    for x, y in batches:
        loss, correct, norm = t.step(x, y, sam)
        t.schedule.step()
        out.append((loss.float().item(), None if norm is None else norm.float().item()))
    return out, {k: v.detach().float().clone() for k, v in t.model.state_dict().items()}


def same_steps(w0, fast, plain, rtol=5e-3):
    """The update of the parameters (one vector) and BatchNorm's statistics agree to rtol of their size."""
    cosine, size = update_agreement(w0, fast, plain)
    assert size <= rtol, size
    for k in plain:
        if "running" in k:
            assert (fast[k] - plain[k]).abs().max() <= rtol * plain[k].abs().max().clamp(min=1e-3), k
    return size


def update_agreement(w0, a, b):
    """cosine and relative size of two updates (a - w0 and b - w0), over every parameter at once."""
    da = torch.cat([(a[k] - w0[k]).flatten() for k in w0 if "running" not in k and w0[k].is_floating_point()])
    db = torch.cat([(b[k] - w0[k]).flatten() for k in w0 if "running" not in k and w0[k].is_floating_point()])
    return F.cosine_similarity(da, db, dim=0).item(), ((da - db).norm() / db.norm()).item()


@pytest.mark.parametrize("optimizer", ["sam", "sgd"])
def test_bf16_autocast_step_against_fp32(device, optimizer):
    w0 = {k: v.float().clone() for k, v in training(device, "--optimizer", optimizer).model.state_dict().items()}
    batch = [data(device)]
    fp32, w32 = run_steps(training(device, "--optimizer", optimizer), batch)
    bf16, w16 = run_steps(training(device, "--optimizer", optimizer, precision="bf16"), batch)
    assert abs(bf16[0][0] - fp32[0][0]) <= 1e-2 * abs(fp32[0][0])
    if optimizer == "sam":
        assert abs(bf16[0][1] - fp32[0][1]) <= 3e-2 * fp32[0][1]
    cosine, size = update_agreement(w0, w16, w32)
    record(**{f"bf16_vs_fp32_{optimizer}": {"loss": [bf16[0][0], fp32[0][0]], "update_cosine": cosine,
                                            "update_relative_difference": size}})
    assert cosine > 0.99 and size < 0.1, (cosine, size)


def initial(device, *flags):
    return {k: v.float().clone() for k, v in training(device, *flags).model.state_dict().items()}


def test_channels_last_against_contiguous(device):
    batches = [data(device, channels_last=True, seed=s) for s in range(3)]
    plain, a = run_steps(training(device), [(x.contiguous(), y) for x, y in batches])
    fast, b = run_steps(training(device, channels_last=True), batches)
    record(channels_last_update_difference=same_steps(initial(device), b, a))
    assert all(abs(la - lb) <= 1e-4 * abs(la) and abs(na - nb) <= 3e-3 * na for (la, na), (lb, nb) in zip(plain, fast))


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("optimizer", ["sam", "sgd"])
def test_compiled_steps_against_eager(device, mode, optimizer):
    """Three steps, so a CUDA graph is recorded and then replayed (reduce-overhead)."""
    batches = [data(device, seed=s) for s in range(3)]
    flags = ["--optimizer", optimizer, "--m-sharpness", "0"]
    eager, a = run_steps(training(device, *flags), batches)
    compiled, b = run_steps(training(device, *flags, "--compile", mode), batches)
    for (la, na), (lb, nb) in zip(eager, compiled):
        assert abs(la - lb) <= 1e-4 * abs(la) and (na is None or abs(na - nb) <= 3e-3 * na)
    record(**{f"compile_{mode}_{optimizer}_update_difference": same_steps(initial(device, *flags), b, a)})


def test_the_m_sharpness_step_is_not_compiled_and_says_so(tmp_path, capsys):
    """train.py runs the per-group step eagerly and refuses --compile with it (one line), rather than
    compiling a part of it silently; its CUDA arithmetic is held to the loop below."""
    import train
    assert train.main(["--m-sharpness", "16", "--compile", "reduce-overhead", "--out-dir", str(tmp_path),
                       "--data-dir", str(tmp_path)]) == 2
    assert "--compile does not apply to the per-group step" in capsys.readouterr().err


def test_m_sharpness_vmap_against_loop(device):
    batches = [data(device, seed=s) for s in range(2)]
    _, a = run_steps(training(device, "--m-sharpness", "16", "--m-sharpness-impl", "loop"), batches)
    _, b = run_steps(training(device, "--m-sharpness", "16", "--m-sharpness-impl", "vmap"), batches)
    record(m16_vmap_vs_loop_update_difference=same_steps(initial(device), b, a))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_m_sharpness_vmap_under_autocast_against_the_loop(device, precision):
    """The paper's default on a GPU: m = 32 groups, vmap, bf16. vmap's BatchNorm takes float32 inputs
    (engine/groups.py); the loop gives its BatchNorm the autocast type: both round alike."""
    if precision == "fp16" and device.type != "cuda":
        pytest.skip("fp16 autocast is the CUDA path")
    batches = [data(device, seed=s) for s in range(2)]
    _, a = run_steps(training(device, "--m-sharpness", "16", "--m-sharpness-impl", "loop", precision=precision), batches)
    _, b = run_steps(training(device, "--m-sharpness", "16", "--m-sharpness-impl", "vmap", precision=precision), batches)
    cosine, size = update_agreement(initial(device), b, a)
    record(**{f"m16_vmap_vs_loop_{precision}": {"update_cosine": cosine, "update_relative_difference": size}})
    assert cosine > 0.99 and size < 0.1, (cosine, size)


def test_fused_sgd_against_foreach(device):
    t = training(device)
    assert bool(t.optimizer.defaults.get("fused")) == (device.type == "cuda")  # build_training asks for it on CUDA
    batches = [data(device, seed=s) for s in range(2)]
    _, fused = run_steps(t, batches)
    plain = training(device)
    for group in plain.optimizer.param_groups:
        group["fused"], group["foreach"] = False, True
    _, foreach = run_steps(plain, batches)
    record(fused_sgd_update_difference=same_steps(initial(device), fused, foreach, rtol=1e-5))


def test_fp16_with_grad_scaler_against_fp32(device):
    if device.type != "cuda":
        pytest.skip("fp16 autocast with a GradScaler is the CUDA path")
    w0 = {k: v.float().clone() for k, v in training(device).model.state_dict().items()}
    batch = [data(device)]
    fp32, w32 = run_steps(training(device), batch)
    fp16, w16 = run_steps(training(device, "--m-sharpness", "0", precision="fp16"), batch)
    _, w32m0 = run_steps(training(device, "--m-sharpness", "0"), batch)
    cosine, size = update_agreement(w0, w16, w32m0)
    record(fp16_vs_fp32_sam={"update_cosine": cosine, "update_relative_difference": size})
    assert cosine > 0.995 and size < 0.05, (cosine, size)


def test_the_device_loader_is_a_function_of_seed_and_epoch_with_cpu_statistics(device, tmp_path):
    from data import build_loaders, load_cifar
    d = load_cifar("cifar10", write_cifar10(tmp_path, per_batch=200))

    def batches(on, seed=0, epoch=1):
        loader, _ = build_loaders(d, augment="cutout", batch_size=100, device=on, seed=seed, channels_last=False)
        loader.set_epoch(epoch)
        return [(x.cpu(), y.cpu()) for x, y in loader]

    a, b = batches(device), batches(device)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][0], batches(device, epoch=2)[0][0])
    on_device, on_cpu = torch.cat([x for x, _ in a]), torch.cat([x for x, _ in batches("cpu")])
    for stat in (lambda t: t.mean((0, 2, 3)), lambda t: t.std((0, 2, 3)), lambda t: (t == 0).float().mean()):
        assert torch.allclose(stat(on_device), stat(on_cpu), atol=0.05), (stat(on_device), stat(on_cpu))


def test_peak_memory_of_a_wrn28_10_sam_step_at_batch_256_in_bf16(device):
    if device.type != "cuda":
        pytest.skip("CUDA memory")
    t = training(device, model="sam_wrn28_10", batch=256, precision="bf16", channels_last=True)
    x, y = data(device, batch=256, channels_last=True)
    t.step(x, y)  # the first step allocates momentum and SAM's copies
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    t.step(x, y)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    record(wrn28_10_sam_b256_bf16_peak_gib=peak)
    assert 0 < peak < torch.cuda.get_device_properties(device).total_memory / 2**30


@pytest.mark.slow
def test_a_run_stopped_on_cuda_resumes_to_the_same_state(device, tmp_path):
    """SIGTERM mid-epoch on the GPU, then --resume, against an uninterrupted run: bitwise where the
    algorithms are deterministic; cudnn.benchmark may pick others after a restart, so the figure
    recorded is the largest difference, held to what fp32 round-off over a few steps allows."""
    d = write_cifar10(tmp_path / "data", per_batch=64)
    args = [sys.executable, "train.py", "--model", "wrn16_2", "--batch-size", "64", "--epochs", "2", "--device",
            str(device), "--data-dir", str(d), "--out-dir", str(tmp_path), "--wandb-mode", "disabled", "--log-every", "1"]
    env = {**os.environ, "WANDB_SILENT": "true"}
    assert subprocess.run([*args, "--name", "whole"], cwd=REPO, env=env, capture_output=True).returncode == 0
    proc = subprocess.Popen([*args, "--name", "split"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "split" / "metrics.jsonl"
    import time
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    assert subprocess.run([*args, "--name", "split", "--resume"], cwd=REPO, env=env).returncode == 0
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["model"]
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
    record(resume_on_cuda_max_abs_difference=worst)
    assert worst < 1e-3, worst
