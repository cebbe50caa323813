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


@pytest.mark.slow
def test_the_suite_smoke_runs_every_stage_on_the_cpu_in_under_3_minutes(tmp_path):
    import time
    start = time.monotonic()
    out = run("benchmarks.suite", "--smoke", "--out", str(tmp_path / "suite"))
    assert time.monotonic() - start < 180
    folder = tmp_path / "suite"
    for stage in ("environment", "correctness", "speed", "training"):
        document = json.loads((folder / f"{stage}.json").read_text())
        assert document["stage"] == stage and document["command"].startswith("python") and document["git_commit"]
    suite = json.loads((folder / "suite.json").read_text())
    assert suite["ran"] == ["environment", "correctness", "speed", "training"] and suite["skipped"] == []
    correctness = json.loads((folder / "correctness.json").read_text())
    assert correctness["failed"] == 0 and correctness["skipped"] >= 10  # the CUDA tests, collected and skipped
    speed = json.loads((folder / "speed.json").read_text())
    assert {r["name"] for r in speed["rows"]} == {"wrn10_1 b8 eager", "wrn10_1 b8 m4 vmap/loop",
                                                   "wrn10_1 b8 sam-prob 0.5"} and not speed["failed"]
    training = json.loads((folder / "training.json").read_text())
    assert [r["optimizer"] for r in training["runs"]] == ["sam", "sgd"]
    assert all(r["exit_code"] == 0 and r["epochs_done"] == training["epochs"] for r in training["runs"])
    assert "shortened to the budget" in training["schedule"]
    summary = (folder / "summary.md").read_text()
    assert "## CUDA correctness" in summary and "## Speed" in summary and "## Training" in summary
    assert "summary:" in out


def test_the_suite_stops_cleanly_when_its_budget_runs_out(tmp_path):
    out = run("benchmarks.suite", "--smoke", "--budget-min", "0.2", "--out", str(tmp_path / "suite"))
    suite = json.loads((tmp_path / "suite" / "suite.json").read_text())
    assert suite["ran"] == ["environment"]
    assert [s["stage"] for s in suite["skipped"]] == ["correctness", "speed", "training"]
    assert all("of the 0.2-minute budget left" in s["why"] for s in suite["skipped"])
    assert "## Skipped" in (tmp_path / "suite" / "summary.md").read_text() and "skipped 3" in out
