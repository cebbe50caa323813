"""One command on a GPU: a budgeted self-check that proves the CUDA path, times it, and trains.

    python -m benchmarks.suite --data-dir DIR               # 8 minutes, figures in benchmarks/results/
    python -m benchmarks.suite --budget-min 20 --out DIR    # more speed rows and a longer training run
    python -m benchmarks.suite --smoke --out DIR            # every stage tiny, on the CPU (CI runs this)

Four stages, in this order. Each writes DIR/<stage>.json the moment it is done (device, versions, the
command, the git commit, every figure); DIR/suite.json lists what ran, what was skipped and why;
DIR/summary.md is a short summary that BENCHMARKS.md quotes as it is. Every measurement runs in a
child process with what is left of the budget as its time limit, so a crash or a hang costs one row,
and the suite stops cleanly when the budget would be exceeded.

  1 environment  the device, its memory and bf16 support, the versions; the data found (official
                 CIFAR-10 by checksum, or not); whether W&B is there (the runs here never need it)
  2 correctness  pytest -m cuda (tests/test_cuda.py): each fast setting against its plain one
  3 speed        train.py's step (benchmarks/throughput.py): ms/step, images/s, % of the bf16 peak and
                 SAM/SGD for ResNet-18 and WRN-28-10, eager, then compiled; m-sharpness (vmap, loop)
                 against M = 0; one --sharpness-every measurement; randomized SAM at P = 0.5; the
                 cost of late-phase SAM from the SAM and SGD steps; 200-epoch projections
  4 training     ResNet-18 SAM, then SGD (configs/resnet18_*.yaml) on the data found, in the fastest
                 setting stage 2 passed, for as many epochs as the budget leaves: 200 when they fit,
                 else a shorter cosine schedule, said in the JSON (never an extrapolated accuracy)
"""

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from engine.config import OneLineParser  # noqa: E402
from analysis import figures  # noqa: E402

STAGES = ("environment", "correctness", "speed", "training")
TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000


class Suite:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.start, self.budget = time.monotonic(), 60 * args.budget_min
        self.done, self.skipped = [], []
        self.context = {"command": " ".join([Path(sys.executable).name, "-m", "benchmarks.suite", *sys.argv[1:]]),
                        "git_commit": git("rev-parse", "HEAD"), "date": datetime.date.today().isoformat(),
                        "smoke": args.smoke, "budget_min": args.budget_min}

    def left(self):
        return self.budget - (time.monotonic() - self.start)

    def fits(self, stage, need_s):
        """Whether `need_s` seconds are left; if not, the stage is skipped and the reason recorded."""
        if self.left() >= need_s:
            return True
        self.skipped.append({"stage": stage, "why": f"needs about {need_s:.0f} s, {max(self.left(), 0):.0f} s of "
                                                     f"the {self.budget / 60:g}-minute budget left"})
        print(f"skip {stage}: {self.skipped[-1]['why']}", flush=True)
        return False

    def write(self, stage, figures):
        document = {"stage": stage, **self.context, "seconds": round(time.monotonic() - self.start, 1), **figures}
        (self.out / f"{stage}.json").write_text(json.dumps(document, indent=2) + "\n")
        self.done.append(stage)
        print(f"{stage}: written {self.out / (stage + '.json')}", flush=True)
        return document

    def child(self, command, limit_s, env=None):
        """Run a child process with a time limit -> (return code or 'timeout', its output's tail)."""
        try:
            result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=max(limit_s, 1),
                                    env={**os.environ, **(env or {})})
            return result.returncode, (result.stdout + result.stderr)[-3000:]
        except subprocess.TimeoutExpired as e:
            return "timeout", ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                               else (e.stdout or ""))[-3000:]


def git(*args):
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---- 1. environment -------------------------------------------------------------------------------

def environment(suite):
    import torch

    from data.cifar import RELEASES, _fingerprint, check_files, resolve_data_dir
    cuda = torch.cuda.is_available() and not suite.args.smoke
    figures = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        figures.update(device=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                       capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported(),
                       driver=nvidia_smi("driver_version"))
    else:
        figures.update(device="cpu", bf16=True)
    data = {"folder": None, "official": None}
    try:
        check_files("cifar10", suite.args.data_dir)
        folder = resolve_data_dir(suite.args.data_dir)
        release = RELEASES["cifar10"][0]
        fingerprint = _fingerprint("cifar10", folder / release.base_folder, release)
        data = {"folder": str(folder), "official": fingerprint["official"], "mismatched": fingerprint["mismatched"]}
    except Exception as e:  # no data: stage 4 trains on none (or, smoke, on synthetic images)
        data["why_none"] = str(e)
    figures["data"] = data
    try:
        import wandb
        figures["wandb"] = {"installed": wandb.__version__, "used": False}
    except ImportError:
        figures["wandb"] = {"installed": None, "used": False}
    suite.device = "cuda" if cuda else "cpu"
    suite.data = data
    return suite.write("environment", figures)


def nvidia_smi(field):
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip().splitlines()
    return out[0] if out else None


# ---- 2. correctness -------------------------------------------------------------------------------

def correctness(suite, need_s):
    if not suite.fits("correctness", need_s):
        return None
    report, figures = suite.out / "cuda_tests.xml", suite.out / "cuda_figures.json"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
               "tests/test_cuda.py"]
    code, tail = suite.child(command, suite.left() - 30, env={"SAM_CUDA_FIGURES": str(figures)})
    tests = []
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for kind in ("failure", "error", "skipped"):
                node = case.find(kind)
                if node is not None:
                    outcome, message = {"failure": "failed", "error": "failed", "skipped": "skipped"}[kind], \
                        (node.get("message") or "")[:300]
            tests.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                          "message": message})
        report.unlink()
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
    measured = json.loads(figures.read_text()) if figures.exists() else {}
    figures.unlink(missing_ok=True)
    suite.passed = {t["test"] for t in tests if t["outcome"] == "passed"}
    return suite.write("correctness", {"pytest": " ".join(command[1:]), "exit_code": code, **counts,
                                       "tests": tests, "figures": measured,
                                       **({"output_tail": tail} if code not in (0, 5) else {})})


# ---- 3. speed -------------------------------------------------------------------------------------

def speed_items(suite):
    """(name, throughput flags, estimated seconds) in the order they matter."""
    if suite.args.smoke:
        tiny = ["--model", "wrn10_1", "--batch-size", "8", "--steps", "2", "--warmup", "1", "--device", "cpu"]
        return [("wrn10_1 b8 eager", [*tiny, "--m-sharpness", "0", "--vs-sgd", "--lambda-max"], 20),
                ("wrn10_1 b8 m4 vmap/loop", [*tiny, "--m-sharpness", "4", "--vs-m"], 20),
                ("wrn10_1 b8 sam-prob 0.5", [*tiny, "--m-sharpness", "0", "--sam-prob", "0.5"], 15)]
    steps = ["--steps", "30", "--warmup", "5"]
    items = []
    for batch in ("256", "128"):
        for model, flags in (("resnet18", ["--m-sharpness", "0"]), ("sam_wrn28_10", ["--m-sharpness", "0"])):
            for compile_mode, cost in (("off", 45), ("reduce-overhead", 120), ("default", 120)):
                if batch == "128" and compile_mode != "off":
                    continue
                extra = ["--lambda-max"] if (batch, compile_mode, model) == ("256", "off", "sam_wrn28_10") else []
                items.append((f"{model} b{batch} {compile_mode}", ["--model", model, "--batch-size", batch, *flags,
                              "--compile", compile_mode, "--vs-sgd", *steps, *extra], cost))
        if batch == "256":
            items.insert(2, ("sam_wrn28_10 b256 m32 vmap/loop", ["--model", "sam_wrn28_10", "--batch-size", "256",
                                                                 "--m-sharpness", "32", "--vs-m", *steps], 90))
            items.insert(3, ("resnet18 b256 sam-prob 0.5", ["--model", "resnet18", "--batch-size", "256",
                                                            "--m-sharpness", "0", "--sam-prob", "0.5", *steps], 40))
    order = sorted(items, key=lambda item: ("reduce-overhead" in item[0], "default" in item[0], "b128" in item[0]))
    return order


def speed(suite, reserve_s):
    rows, failures = [], []
    folder = suite.out / "speed"
    for name, flags, cost in speed_items(suite):
        if suite.left() - reserve_s < cost:
            suite.skipped.append({"stage": f"speed: {name}", "why": f"needs about {cost} s; the rest of the budget "
                                                                    f"is kept for training"})
            continue
        before = set(folder.glob("*.json")) if folder.exists() else set()
        code, tail = suite.child([sys.executable, "-m", "benchmarks.throughput", *flags, "--out", str(folder)],
                                 suite.left() - reserve_s)
        new = sorted(set(folder.glob("*.json")) - before) if folder.exists() else []
        if code == 0 and new:
            record = json.loads(new[-1].read_text())
            rows.append({"name": name, "flags": flags, **record["figures"]})
        else:
            failures.append({"name": name, "exit_code": code, "output_tail": tail})
            print(f"speed: {name} failed ({code})", flush=True)
    if not rows and not failures:
        return None
    return suite.write("speed", {"rows": rows, "failed": failures, "late_phase_cost": late_phase_cost(rows)})


def late_phase_cost(rows):
    """Late-phase SAM's cost from the measured SAM and SGD steps of each eager setting: switching at
    epoch E of 200 takes (E x SGD + (200 - E) x SAM) / (200 x SAM) of full SAM's time."""
    costs = {}
    for row in rows:
        ms = {r["step"].split()[2].strip("(,)"): r["ms_per_step"] for r in row["rows"] if r["step"].startswith("train.py")}
        if " off" in row["name"] and "sam" in ms and "sgd" in ms:
            costs[row["name"]] = {f"switch_at_{e}_of_200": round((e * ms["sgd"] + (200 - e) * ms["sam"]) /
                                                                 (200 * ms["sam"]), 3) for e in (150, 175, 190)}
    return costs


# ---- 4. training ----------------------------------------------------------------------------------

def training(suite, speed_document):
    data_dir = suite.data["folder"]
    if suite.args.smoke:
        from data.cifar import write_synthetic_cifar10
        data_dir = str(write_synthetic_cifar10(Path(tempfile.mkdtemp()) / "data", per_batch=64))
        flags = ["--model", "wrn10_1", "--batch-size", "32", "--device", "cpu"]
        epoch_s = {"sam": 3.0, "sgd": 2.0}
    elif not data_dir:
        suite.skipped.append({"stage": "training", "why": "no CIFAR-10 found; pass --data-dir"})
        return None
    else:
        compiled = any("reduce-overhead" in t and "sam" in t for t in getattr(suite, "passed", set()))
        flags = ["--compile", "reduce-overhead"] if compiled else []
        epoch_s = epoch_seconds(speed_document, "resnet18 b256 reduce-overhead" if compiled else "resnet18 b256 off")
    startup = 20 if suite.args.smoke else 60  # per run: start-up, compilation, the first evaluation
    per_pair = epoch_s["sam"] + epoch_s["sgd"]
    epochs = min(200, math.floor((suite.left() - 2 * startup) / per_pair)) if per_pair else 0
    if suite.args.smoke:
        epochs = min(epochs, 2)
    if epochs < 1:
        suite.skipped.append({"stage": "training", "why": f"one SAM and one SGD epoch take about {per_pair:.0f} s; "
                                                          f"{max(suite.left(), 0):.0f} s left"})
        return None
    runs = []
    for optimizer in ("sam", "sgd"):
        name = f"resnet18-{optimizer}-{epochs}epochs"
        command = [sys.executable, "train.py", "--config", f"configs/resnet18_{optimizer}.yaml", "--epochs",
                   str(epochs), "--data-dir", data_dir, "--out-dir", str(suite.out / "runs"), "--name", name,
                   "--wandb-mode", "disabled", *flags]
        limit = suite.left() if optimizer == "sgd" else suite.left() * epoch_s["sam"] / per_pair
        code, tail = suite.child(command, limit)
        runs.append(read_run(suite.out / "runs" / name, optimizer, epochs, command[1:], code, tail))
    return suite.write("training", {"data": suite.data if not suite.args.smoke else "synthetic (smoke)",
                                    "epochs": epochs, "schedule": "the paper's 200 epochs" if epochs == 200 else
                                    f"a cosine schedule over {epochs} epochs (shortened to the budget; not the "
                                    f"paper's 200: its accuracy is not the 200-epoch one)", "runs": runs})


def epoch_seconds(speed_document, name):
    """Seconds a ResNet-18 epoch (train and test) takes, SAM and SGD, from the speed stage."""
    row = next((r for r in (speed_document or {}).get("rows", []) if r["name"] == name), None)
    if row is None:
        return {"sam": 60.0, "sgd": 30.0}  # no measurement: a cautious guess for a slow GPU
    ms = {("sam" if r["step"].startswith("train.py step (sam") else "sgd"): r["ms_per_step"] for r in row["rows"]}
    steps = TRAIN_IMAGES // 256
    return {k: 1.15 * (v * steps + ms["sgd"] / 3 * TEST_IMAGES / 256) / 1e3 for k, v in ms.items()}


def read_run(folder, optimizer, epochs, command, code, tail):
    rows = []
    if (folder / "metrics.jsonl").exists():
        for line in (folder / "metrics.jsonl").read_bytes().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("kind") == "epoch":
                rows.append({"epoch": row["epoch"], "epoch_time_s": row.get("epoch_time_s"),
                             "test_acc": row.get("test/acc")})
    result = json.loads((folder / "results.json").read_text()) if (folder / "results.json").exists() else {}
    run = {"optimizer": optimizer, "epochs_asked": epochs, "epochs_done": len(rows), "exit_code": code,
           "command": " ".join(command), "per_epoch": rows, "final_test_acc": result.get("final_test_acc"),
           "wall_time_s": result.get("wall_time_s")}
    return run if code == 0 else {**run, "output_tail": tail}


# ---- summary --------------------------------------------------------------------------------------

def summary(suite, documents):
    env = documents.get("environment", {})
    lines = [f"# GPU suite: {env.get('device')}, {suite.context['date']}", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, driver {env.get('driver')}; "
             f"commit {str(suite.context['git_commit'])[:10]}; budget {suite.args.budget_min:g} min, used "
             f"{(time.monotonic() - suite.start) / 60:.1f} min. Data: " + describe_data(env.get("data") or {}) + ".", ""]
    if "correctness" in documents:
        c = documents["correctness"]
        lines += [f"## CUDA correctness: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped", ""]
        lines += [f"- FAILED {t['test']}: {t['message'][:160]}" for t in c["tests"] if t["outcome"] == "failed"]
        for key, value in c.get("figures", {}).items():
            lines.append(f"- {key}: {json.dumps(value)}")
        lines.append("")
    if "speed" in documents:
        lines += ["## Speed (train.py's step, synthetic batches)", "",
                  "| setting | step | ms/step | images/s | % of bf16 peak | 200 epochs (min) |", "|---|---|---|---|---|---|"]
        for row in documents["speed"]["rows"]:
            for r in row["rows"]:
                peak = f"{r['percent_of_bf16_peak']:.0f}" if r.get("percent_of_bf16_peak") else "-"
                lines.append(f"| {row['name']} | {r['step']} | {r['ms_per_step']:.1f} | {r['images_per_s']:,.0f} | "
                             f"{peak} | {r['run_200_epochs_min']:.0f} |")
        ratios = [f"{row['name']}: " + ", ".join(f"{k} {v:.2f}" for k, v in row["ratios"].items())
                  for row in documents["speed"]["rows"] if row["ratios"]]
        lines += ["", *[f"- {r}" for r in ratios]]
        for name, costs in documents["speed"]["late_phase_cost"].items():
            lines.append(f"- late-phase SAM, {name}: " + ", ".join(f"{k} {v}x SAM's time" for k, v in costs.items()))
        lines += [f"- FAILED {f['name']} (exit {f['exit_code']})" for f in documents["speed"]["failed"]]
        lines.append("")
    if "training" in documents:
        t = documents["training"]
        model = "wrn10_1 (smoke)" if suite.args.smoke else "ResNet-18"
        lines += [f"## Training: {model}, {t['schedule']}", "", "| run | epochs | s/epoch | final test accuracy |",
                  "|---|---|---|---|"]
        for run in t["runs"]:
            times = [r["epoch_time_s"] for r in run["per_epoch"] if r["epoch_time_s"]]
            per = f"{sum(times) / len(times):.1f}" if times else "-"
            acc = f"{run['final_test_acc']:.4f}" if run["final_test_acc"] is not None else f"failed ({run['exit_code']})"
            lines.append(f"| {run['optimizer'].upper()} | {run['epochs_done']} of {run['epochs_asked']} | {per} | {acc} |")
        lines.append("")
    if suite.skipped:
        lines += ["## Skipped", "", *[f"- {s['stage']}: {s['why']}" for s in suite.skipped], ""]
    (suite.out / "summary.md").write_text("\n".join(lines))


def describe_data(data):
    if not data.get("folder"):
        return "none found"
    return f"{data['folder']} ({'official CIFAR-10' if data['official'] else 'not the official files (checksums)'})"


def main(argv=None):
    p = OneLineParser(prog="python -m benchmarks.suite", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-min", type=float, default=8.0, help="minutes for everything (default 8)")
    p.add_argument("--out", help="folder for the JSON files and summary.md (default: benchmarks/results/DATE_suite)")
    p.add_argument("--data-dir", help="CIFAR-10 for the training stage (default: $SAM_DATA_DIR, ~/.cache/sam-cifar)")
    p.add_argument("--smoke", action="store_true", help="every stage tiny, on the CPU")
    args = p.parse_args(argv)
    if not 0 < args.budget_min <= 600 or not math.isfinite(args.budget_min):
        p.error(f"--budget-min must be in (0, 600], got {args.budget_min}")
    if args.smoke and args.data_dir:
        p.error("--smoke trains on synthetic images; drop --data-dir (or --smoke)")
    if not args.smoke:  # the training stage's data, read and validated as train.py --check does, before any stage
        from data.cifar import DataError, check_files, load_cifar, resolve_data_dir
        try:
            check_files("cifar10", args.data_dir)
        except DataError as e:
            if args.data_dir:  # none named and none found: the training stage is skipped, saying so
                p.error(str(e))
        else:
            try:
                load_cifar("cifar10", str(resolve_data_dir(args.data_dir)))
            except DataError as e:
                p.error(str(e))
    args.out = args.out or str(REPO / "benchmarks" / "results" / f"{datetime.date.today().isoformat()}_suite")
    out = Path(args.out)
    try:  # the shared output checks: a path the system takes, no run's or data set's folder, a writable place
        figures.check_output_folder(out, ["suite.json", "summary.md"])
    except figures.OutputError as e:
        p.error(str(e))
    if out.exists() and (not out.is_dir() or any(out.glob("*.json"))):
        p.error(f"--out {out} already holds results (or is not a folder); choose a new folder")
    out.mkdir(exist_ok=True)
    suite = Suite(args)
    documents = {"environment": environment(suite)}
    smoke = args.smoke
    documents["correctness"] = correctness(suite, need_s=20 if smoke else 90)
    speed_reserve = (60 if smoke else 0.4 * suite.budget)  # training keeps at least this share
    if suite.fits("speed", 20 if smoke else 60):
        documents["speed"] = speed(suite, min(speed_reserve, max(suite.left() - 60, 0)))
    if suite.fits("training", 30 if smoke else 150):
        documents["training"] = training(suite, documents.get("speed"))
    documents = {k: v for k, v in documents.items() if v}
    (out / "suite.json").write_text(json.dumps({**suite.context, "ran": suite.done, "skipped": suite.skipped,
                                                "minutes": round((time.monotonic() - suite.start) / 60, 2)},
                                               indent=2) + "\n")
    summary(suite, documents)
    print(f"done in {(time.monotonic() - suite.start) / 60:.1f} min: {', '.join(suite.done)}"
          + (f"; skipped {len(suite.skipped)} (see {out / 'suite.json'})" if suite.skipped else "")
          + f"\nsummary: {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    from engine.stopping import entry
    sys.exit(entry(main))
