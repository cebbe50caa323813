"""The benchmarks run end to end on small CPU sizes (their figures are for BENCHMARKS.md)."""

import subprocess
import sys

from conftest import REPO, write_cifar10


def run(*args):
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_throughput_runs_train_py_step_and_the_comparisons():
    out = run("benchmarks.throughput", "--model", "wrn10_1", "--batch-size", "8", "--steps", "2", "--warmup", "1",
              "--device", "cpu", "--compare", "--vs-sgd")
    for text in ("train.py step (sam)", "train.py step (sgd)", "SAM / SGD step time", "fp32 per-parameter-loop SAM",
                 "speed-up over the fp32 loop SAM step", "images/s", "200 epochs", "TFLOP/s"):
        assert text in out


def test_sam_overhead_runs():
    out = run("benchmarks.sam_overhead", "--model", "wrn10_1", "--device", "cpu", "--repeats", "2")
    assert "sam.SAM (foreach)" in out and "per-parameter loop" in out


def test_loader_throughput_runs(tmp_path):
    data = write_cifar10(tmp_path, per_batch=64)
    out = run("benchmarks.loader_throughput", "--data-dir", str(data), "--device", "cpu", "--batch-size", "32",
              "--batches", "2", "--workers", "0")
    assert out.count("images/s") == 4
