"""The benchmarks run end to end on small CPU sizes (their figures are for BENCHMARKS.md)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, write_cifar10


def run(*args):
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def figures(tmp_path, what):
    (path,) = tmp_path.glob(f"*_{what}*.json")
    record = json.loads(path.read_text())
    assert record["what"] == what and record["device"].startswith("CPU") and record["torch"]
    assert record["command"].startswith("python") and f"benchmarks.{what}" in record["command"]
    return record["figures"]

@pytest.mark.slow

def test_throughput_runs_train_py_step_and_the_comparisons(tmp_path):
    out = run("benchmarks.throughput", "--model", "wrn10_1", "--batch-size", "8", "--steps", "2", "--warmup", "1",
              "--device", "cpu", "--m-sharpness", "0", "--compare", "--vs-sgd", "--out", str(tmp_path))
    for text in ("train.py step (sam)", "train.py step (sgd)", "SAM / SGD step time", "fp32 per-parameter-loop SAM",
                 "speed-up over the fp32 loop SAM step", "images/s", "200 epochs", "TFLOP/s"):
        assert text in out
    result = figures(tmp_path, "throughput")
    assert [r["step"] for r in result["rows"]] == ["train.py step (sam)", "train.py step (sgd)",
                                                    "fp32 per-parameter-loop SAM"]
    assert result["ratios"]["sam_over_sgd"] == result["rows"][0]["ms_per_step"] / result["rows"][1]["ms_per_step"]


@pytest.mark.slow
def test_throughput_times_m_sharpness_against_m_0(tmp_path):
    out = run("benchmarks.throughput", "--model", "wrn10_1", "--batch-size", "8", "--steps", "2", "--warmup", "1",
              "--device", "cpu", "--m-sharpness", "4", "--vs-m", "--out", str(tmp_path))
    assert "--m-sharpness 4 / M = 0 step time: vmap" in out
    assert set(figures(tmp_path, "throughput")["ratios"]) == {"m4_vmap_over_m0", "m4_loop_over_m0"}

@pytest.mark.slow

def test_sam_overhead_runs(tmp_path):
    out = run("benchmarks.sam_overhead", "--model", "wrn10_1", "--device", "cpu", "--repeats", "2", "--out",
              str(tmp_path))
    assert "sam.SAM (foreach)" in out and "per-parameter loop" in out
    assert figures(tmp_path, "sam_overhead")["sam_foreach_ms"] > 0

@pytest.mark.slow

def test_loader_throughput_runs(tmp_path):
    data = write_cifar10(tmp_path, per_batch=64)
    out = run("benchmarks.loader_throughput", "--data-dir", str(data), "--device", "cpu", "--batch-size", "32",
              "--batches", "2", "--workers", "0", "--out", str(tmp_path / "results"))
    assert out.count("images/s") == 4
    assert len(figures(tmp_path / "results", "loader_throughput")["rows"]) == 4
