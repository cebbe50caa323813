"""Bad input, as a hostile user would give it, to every entry point: train.py, sharpness.py,
evaluate.py, scripts/summarize.py, scripts/plot.py, the sweep scripts and the SLURM launcher. Each
case must end with exit code 2 and one `error:` line on stderr that contains the words given, and
must leave every file of a sandbox (data, finished and stopped runs, results, configs) as it was,
creating nothing."""

import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
import sharpness
import train
from conftest import REPO, write_cifar10
from engine import checkpoint, sweep
from test_train import TINY

sys.path.insert(0, str(REPO / "scripts"))
import plot  # noqa: E402
import summarize  # noqa: E402


BASES = {"empty": '""', "dot": ".", "map": "{a: 1}", "null": "~", "stdin": "/dev/stdin", "folder": "empty",
         "missing": "nope.yaml"}  # base: values of YAML files in the box


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """The sandbox: data, a relabelled copy, a finished run, a run stopped mid-epoch, results, configs."""
    root = tmp_path_factory.mktemp("attack")
    data = write_cifar10(root / "data", per_batch=40)
    shutil.copytree(data, root / "other")
    path = root / "other" / "cifar-10-batches-py" / "data_batch_1"
    entry = pickle.load(open(path, "rb"), encoding="latin1")
    entry["labels"][0] = (entry["labels"][0] + 1) % 10
    pickle.dump(entry, open(path, "wb"), protocol=2)
    runs = root / "runs"
    base = [*TINY, "--data-dir", str(data), "--out-dir", str(runs), "--wandb-mode", "disabled"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "project", lambda run: None)
        assert train.main([*base, "--epochs", "1", "--name", "done"]) == 0
        assert train.main([*base, "--epochs", "1", "--name", "cifar100", "--dataset", "cifar100",
                           "--data-dir", str(root / "c100")]) == 2  # no CIFAR-100 here: only a refusal
        import engine.step
        real, calls = engine.step.TrainStep.__call__, {"n": 0}

        def stop_at_8(self, images, labels, sam=None):
            calls["n"] += 1
            if calls["n"] == 8:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(self, images, labels, sam)

        mp.setattr(engine.step.TrainStep, "__call__", stop_at_8)
        assert train.main([*base, "--epochs", "2", "--name", "half"]) == 75
    checkpoint.RunLock(runs / "half").acquire().release()  # its lock file exists; nobody holds it
    (runs / "dirlast" / "last.pt").mkdir(parents=True)
    (root / "afile").write_text("x\n")
    (root / "dangling").symlink_to(root / "nowhere")
    (root / "empty").mkdir()
    (root / "notckpt.pt").write_text("not a checkpoint\n")
    results = root / "results"
    (results / "smoke").mkdir(parents=True)
    (results / "smoke" / "results.json").write_text(json.dumps({"final_test_error": 0.5, "seed": 0, "settings": {
        "dataset": "cifar10", "model": "wrn10_1", "augment": "basic", "optimizer": "sam", "rho": 0.05}}))
    (results / "broken").mkdir()
    (results / "broken" / "results.json").write_text("{not json")
    (root / "bad.yaml").write_text("lr: [0.1\n")
    for name, base in BASES.items():
        (root / f"base_{name}.yaml").write_text(f"base: {base}\nseed: 1\n")
    (root / "metrics_only").mkdir()
    (root / "metrics_only" / "metrics.jsonl").write_text('{"step": 2, "kind": "step", "lr": 0.1}\n')
    return root


def tree(root):
    """Every file and link under root, with a hash of its content."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[p.relative_to(root)] = "link:" + os.readlink(p)
        elif p.is_file():
            out[p.relative_to(root)] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[p.relative_to(root)] = "dir"
    return out


def fill(args, box):
    return [a.format(box=box, data=box / "data", runs=box / "runs", done=box / "runs" / "done",
                     half=box / "runs" / "half") for a in args]


TRAIN = ["--data-dir", "{data}", "--out-dir", "{runs}", "--wandb-mode", "disabled", *TINY]
T = [  # train.py: (arguments, words of the error line)
    (["--epochs", "0"], "epochs must be in [1, 100000], got 0"),
    (["--epochs", "ten"], "invalid int value"),
    (["--epochs", "1e3"], "invalid int value"),
    (["--lr", "-0.1"], "lr must be in (0, 10]"),
    (["--lr", "inf"], "lr must be in (0, 10], got inf"),
    (["--lr", "nan"], "lr must be in (0, 10], got nan"),
    (["--lr", "abc"], "invalid float value: 'abc'"),
    (["--weight-decay", "1e9"], "weight_decay must be in [0, 0.1]"),
    (["--momentum", "1"], "momentum must be in [0, 1)"),
    (["--batch-size", "0"], "batch_size must be in [1"),
    (["--batch-size", "33"], "m_sharpness 32 must divide the per-process batch 33"),
    (["--batch-size", "4096"], "larger than the 200 training images"),
    (["--rho", "-0.05"], "rho must be in [0, 10]"),
    (["--rho", "11"], "rho must be in [0, 10], got 11.0"),
    (["--seed", "-1"], "seed must be in [0, 4294967295], got -1"),
    (["--seed", "4294967296"], "seed must be in [0, 4294967295]"),
    (["--model", "vgg16"], "unknown model 'vgg16'"),
    (["--model", "wrn11_2"], "WideResNet depth must be 6n+4"),
    (["--model", "resnet18", "--norm", "none"], "resnet18 takes no options; got dropout, norm"),
    (["--dropout", "1"], "dropout must be in [0, 1)"),
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["--augment", "mixup"], "invalid choice: 'mixup'"),
    (["--label-noise", "1.5"], "label_noise must be in [0, 1]"),
    (["--label-noise", "-0.2"], "label_noise must be in [0, 1]"),
    (["--val-split", "1.0"], "val_split must be in [0, 1)"),
    (["--grad-clip", "-1"], "grad_clip must be in [0, 1000]"),
    (["--weight-decay-in", "both"], "invalid choice: 'both'"),
    (["--eta", "0.01"], "--eta applies only to ASAM"),
    (["--adaptive", "--eta", "2"], "eta must be in [0, 1], got 2.0"),
    (["--optimizer", "sgd", "--rho", "0.1"], "--rho applies only to SAM"),
    (["--optimizer", "sgd", "--adaptive"], "--adaptive applies only to SAM"),
    (["--optimizer", "sgd", "--sam-prob", "0.5"], "--sam-prob applies only to SAM"),
    (["--sam-start-epoch", "3", "--epochs", "2"], "--sam-start-epoch 3 is after the last epoch (2)"),
    (["--sam-prob", "2"], "sam_prob must be in [0, 1], got 2.0"),
    (["--sam-prob", "nan"], "sam_prob must be in [0, 1], got nan"),
    (["--sam-p", "1"], "sam_p must be in [1.5, inf], got 1.0"),
    (["--sam-second-order", "--sam-p", "3"], "--sam-second-order supports only p = 2"),
    (["--sam-second-order", "--m-sharpness", "16"], "--sam-second-order does not combine"),
    (["--momentum", "0", "--nesterov"], "--nesterov needs momentum > 0"),
    (["--workers", "8"], "--workers applies only to --loader workers"),
    (["--augment", "none", "--padding-mode", "constant"], "--padding-mode applies only to cropping"),
    (["--autoaugment-policy", "torchvision"], "--autoaugment-policy applies only with --augment autoaugment"),
    (["--label-noise-rule", "other"], "--label-noise-rule applies only with --label-noise p"),
    (["--cutout-placement", "image"], "--cutout-placement applies only with --augment cutout"),
    (["--augment", "cutout", "--mixup-alpha", "1"], "--mixup-alpha with a Cutout augmentation is not supported"),
    (["--loader", "device", "--augment", "autoaugment", "--autoaugment-policy", "torchvision"],
     "torchvision's AutoAugment runs in DataLoader workers"),
    (["--m-sharpness", "5"], "m_sharpness 5 must divide the per-process batch 32"),
    (["--m-sharpness", "0", "--m-sharpness-impl", "loop"], "--m-sharpness-impl applies only with --m-sharpness M"),
    (["--m-sharpness", "16", "--compile", "default"], "--compile does not apply to the per-group step"),
    (["--compile", "fast"], "invalid choice: 'fast'"),
    (["--precision", "fp16"], "--precision fp16 needs a CUDA device"),
    (["--device", "meta"], "device 'meta' is not supported"),
    (["--device", "junk"], "unknown device 'junk'"),
    (["--device", "cuda"], "no CUDA device is available"),
    (["--device", "cuda:7"], "no CUDA device is available"),
    (["--subset", "10"], "--subset 10 holds fewer images than one batch of 32"),
    (["--sharpness-every", "5", "--epochs", "2"], "--sharpness-every 5 is more than --epochs 2"),
    (["--log-every", "0"], "log_every must be in [1, inf)"),
    (["--eval-batch-size", "0"], "eval_batch_size must be in [1"),
    (["--checkpoint-every-min", "-1"], "checkpoint_every_min must be in [0, 100000]"),
    (["--checkpoint-every-min", "nan"], "checkpoint_every_min must be in [0, 100000], got nan"),
    (["--wandb-mode", "disabled", "--wandb-project", "p"], "--wandb-project needs W&B"),
    (["--wandb-mode", "disabled", "--save-artifact"], "--save-artifact needs W&B"),
    (["--wandb-mode", "online"], "W&B online mode needs credentials"),
    (["--allow-changes"], "unrecognized arguments: --allow-changes"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--config", "{box}/missing.yaml"], "not found"),
    (["--config", "{box}/bad.yaml"], "is not valid YAML"),
    (["--config", "{box}/afile"], "must hold a mapping of settings"),
    (["--config", "{box}/base_empty.yaml"], "base: must name one YAML file (relative to"),
    (["--config", "{box}/base_dot.yaml"], "base: must name one YAML file (relative to"),
    (["--config", "{box}/base_map.yaml"], "base: must name one YAML file (relative to"),
    (["--config", "{box}/base_null.yaml"], "base: must name one YAML file (relative to"),
    (["--config", "{box}/base_stdin.yaml"], "/dev/stdin (the base: of "),
    (["--config", "{box}/base_folder.yaml"], "base_folder.yaml) is a folder"),
    (["--config", "{box}/base_missing.yaml"], "base_missing.yaml) not found"),
    (["--config", "{box}/empty"], "(--config) is a folder"),
    (["--name", "../escape"], "--name must be one folder name"),
    (["--name", "/abs/path"], "--name must be one folder name"),
    (["--name", "a/b"], "--name must be one folder name"),
    (["--name", ""], "--name is empty; give a value"),
    (["--name", "."], "--name must be one folder name"),
    (["--name", ".."], "--name must be one folder name"),
    (["--name", "x" * 300], "--name is 300 bytes long"),
    (["--name", "a\nb"], "--name must be one folder name"),
    (["--name", "tab\there"], "--name must be one folder name"),
    (["--subset", "10000000"], "--subset 10000000 is more than the 200 training images"),
    (["--out-dir", "{box}/afile/runs"], "is not a writable folder"),
    (["--out-dir", "{box}/dangling"], "is a symbolic link to"),
    (["--out-dir", "{box}/dangling/runs"], "is a symbolic link to"),
    (["--data-dir", "{box}/empty"], "cifar10 not found"),
    (["--name", "done", "--epochs", "1", "--seed", "3"], "holds a finished run of other settings (seed 0 -> 3)"),
    (["--name", "half"], "already holds a run; pass --resume"),
    (["--name", "dirlast"], "is not a regular file, so it cannot be this run's last.pt"),
    (["--name", "dirlast", "--resume"], "is not a regular file, so it cannot be this run's last.pt"),
    (["--name", "nothing", "--resume"], "no checkpoint at"),
    (["--resume", "{box}/notckpt.pt"], "not a readable train.py checkpoint"),
    (["--resume", "{box}/empty"], "no checkpoint at"),
    (["--resume", "{half}", "--name", "other"], "but --name other says otherwise; drop --name"),
    (["--resume", "{half}", "--out-dir", "{box}/elsewhere"], "says otherwise; drop --out-dir"),
    (["--resume", "{half}", "--rho", "0.1"], "change the experiment: rho 0.05 -> 0.1; a resumed run continues"),
    (["--resume", "{half}", "--lr", "0.2"], "change the experiment: lr 0.1 -> 0.2"),
    (["--resume", "{half}", "--seed", "3"], "change the experiment: seed 0 -> 3"),
    (["--resume", "{half}", "--subset", "64"], "change the experiment: subset 0 -> 64"),
    (["--resume", "{half}", "--optimizer", "sgd"], "change the experiment: optimizer"),
    (["--resume", "{half}", "--batch-size", "64"], "change the experiment: batch_size 32 -> 64"),
    (["--resume", "{half}", "--model", "wrn10_2"], "change the experiment: model"),
    (["--resume", "{half}", "--epochs", "1"], "change the experiment: epochs 2 -> 1"),
    (["--resume", "{half}", "--epochs", "3"], "change the experiment: epochs 2 -> 3"),
    (["--resume", "{half}", "--data-dir", "{box}/other"], "data_batch_1 differ from the checksums"),
    (["--resume", "{done}", "--relabel-from", "{half}"], "change the experiment: relabel_from"),
    (["--relabel-from", "{box}/empty"], "--relabel-from"),
    (["--relabel-from", "{box}/notckpt.pt"], "not a readable train.py checkpoint"),
]
RAW = [  # train.py commands given as they are
    (["--check-all", "{box}/afile"], "unrecognized arguments: --check-all"),
    (["--resume", "{done}", "--rho", "0.1"], "change the experiment: rho 0.05 -> 0.1"),
]


@pytest.mark.parametrize("args, words", T, ids=[" ".join(a)[:60] for a, _ in T])
def test_train(box, capsys, monkeypatch, args, words):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(box / "no-netrc"))
    attack(box, capsys, train.main, fill([*TRAIN, *args], box), words)


@pytest.mark.parametrize("args, words", RAW, ids=[" ".join(a)[:60] for a, _ in RAW])
def test_train_raw(box, capsys, args, words):
    attack(box, capsys, train.main, fill(args, box), words)


def test_train_refuses_a_run_folder_another_process_holds(box, capsys):
    lock = checkpoint.RunLock(box / "runs" / "half").acquire()
    try:
        attack(box, capsys, train.main, fill([*TRAIN, "--resume", "{half}"], box), "is in use by process")
        attack(box, capsys, train.main, fill([*TRAIN, "--resume", "{half}", "--check"], box), "is in use by process")
    finally:
        lock.release()


def test_no_tool_writes_into_a_run_folder_a_live_run_holds(box, capsys):
    """Reading a live run is fine; writing beside its records while it trains is refused, by every tool."""
    lock = checkpoint.RunLock(box / "runs" / "done").acquire()
    try:
        for main, args in [(sharpness.main, ["{done}", "--landscape", "1d", "--batch-size", "50"]),
                           (sharpness.main, ["{done}", "--landscape", "1d", "--batch-size", "50", "--out", "{done}/m"]),
                           (evaluate.main, ["{done}", "--json", "{done}/eval.json"]),
                           (plot.main, ["{done}", "--out", "{done}/curves.png"])]:
            attack(box, capsys, main, fill(args, box), "is in use by process")
    finally:
        lock.release()


S = [  # sharpness.py
    ([], "give one run folder, or --compare RUN_A RUN_B"),
    (["{done}"], "nothing to measure"),
    (["{done}", "--compare", "{done}", "{half}", "--hessian", "1"], "give one run folder, or --compare"),
    (["{done}", "--landscape", "interp"], "--landscape interp draws the line between two runs"),
    (["{done}", "--landscape", "3d"], "invalid choice: '3d'"),
    (["{done}", "--hessian", "-1"], "--hessian must be >= 0"),
    (["{done}", "--hessian", "1", "--batches", "0"], "--batches must be >= 1"),
    (["{done}", "--density", "--density-runs", "0"], "--density-runs must be >= 1"),
    (["{done}", "--density", "--density-steps", "1"], "--density-steps must be >= 2"),
    (["{done}", "--hessian", "1", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["{done}", "--m-sharpness", "-1"], "--m-sharpness must be >= 0, got -1"),
    (["{done}", "--m-sharpness", "5"], "--m-sharpness 5 must divide --batch-size 256"),
    (["{done}", "--m-sharpness", "16", "--rho", "0"], "--rho must be in [1.18e-38, 100)"),
    (["{done}", "--m-sharpness", "16", "--rho", "nan"], "--rho must be in [1.18e-38, 100), got nan"),
    (["{done}", "--landscape", "1d", "--points", "2"], "--points must be in [3, 201]"),
    (["{done}", "--landscape", "1d", "--span", "nan"], "--span must be a number in (0, 1000), got nan"),
    (["{done}", "--landscape", "1d", "--span", "-1"], "--span must be a number in (0, 1000)"),
    (["{done}", "--landscape", "1d", "--span", "inf"], "--span must be a number in (0, 1000), got inf"),
    (["{done}", "--hessian", "1", "--seed", "-1"], "--seed must be in [0, 4294967295]"),
    (["{done}", "--hessian", "1", "--seed", "18446744073709551616"], "--seed must be in [0, 4294967295]"),
    (["{done}", "--hessian", "1", "--batches", "1000", "--batch-size", "32"], "hold 6 batches of 32, not 1000"),
    (["{done}", "--hessian", "1", "--batches", "7", "--batch-size", "32"], "hold 6 batches of 32, not 7"),
    (["{done}", "--hessian", "1", "--bn", "both"], "invalid choice: 'both'"),
    (["{done}", "--hessian", "1", "--device", "junk"], "unknown device 'junk'"),
    (["{done}", "--hessian", "1", "--device", "cuda"], "no CUDA device is available"),
    (["--compare", "{done}", "{done}", "--hessian", "1", "--out", "{box}/fig"], "--compare needs two different runs"),
    (["--compare", "{done}", "{done}/last.pt", "--landscape", "interp", "--out", "{box}/fig"],
     "--compare needs two different runs"),
    (["--compare", "{done}", "{half}", "--hessian", "1"], "--compare needs --out DIR"),
    (["{box}/empty", "--hessian", "1"], "not a readable train.py checkpoint"),
    (["{box}/notckpt.pt", "--hessian", "1"], "not a readable train.py checkpoint"),
    (["{done}", "--hessian", "1", "--data-dir", "{box}/empty"], "cifar10 is not in"),
    (["{done}", "--hessian", "1", "--batch-size", "32", "--out", "{box}/afile"], "cannot write the output folder"),
]


@pytest.mark.parametrize("args, words", S, ids=[" ".join(a)[:60] for a, _ in S])
def test_sharpness(box, capsys, args, words):
    attack(box, capsys, sharpness.main, fill(args, box), words)


E = [  # evaluate.py
    ([], "the following arguments are required: run"),
    (["{box}/missing"], "not a readable train.py checkpoint"),
    (["{box}/notckpt.pt"], "not a readable train.py checkpoint"),
    (["{box}/empty"], "not a readable train.py checkpoint"),
    (["{done}", "--split", "val"], "held out no validation images"),
    (["{done}", "--split", "train"], "invalid choice: 'train'"),
    (["{done}", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["{done}", "--data-dir", "{box}/missing"], "is not a folder"),
    (["{done}", "--data-dir", "{box}/empty"], "no CIFAR-10.1 (*_data.npy) or CIFAR-10-C (labels.npy) files"),
    (["{done}", "--data-dir", "{box}/data"], "holds CIFAR-10/100 itself, which the run reads from its own config"),
    (["{done}", "--split", "val", "--data-dir", "{box}/empty"], "--split val is the run's own held-out images"),
    (["{done}", "--json", "{box}/missing/out.json"], "does not exist"),
    (["{done}", "--device", "junk"], "unknown device 'junk'"),
    (["{done}", "--device", "cuda"], "no CUDA device is available"),
]


@pytest.mark.parametrize("args, words", E, ids=[" ".join(a)[:60] for a, _ in E])
def test_evaluate(box, capsys, args, words):
    attack(box, capsys, evaluate.main, fill(args, box), words)


M = [  # scripts/summarize.py
    ([], "give result folders, --wandb-group or --wandb-sweep"),
    (["{box}/missing"], "is not a folder"),
    (["{box}/empty"], "no finished runs found"),
    (["{box}/results", "--table4"], "--table4: none of the 1 runs has label noise"),
    (["{box}/results", "--metric", "worst"], "invalid choice: 'worst'"),
    (["--wandb-group", "g"], "reading W&B needs credentials"),
    (["{box}/results", "--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("args, words", M, ids=[" ".join(a)[:60] for a, _ in M])
def test_summarize(box, capsys, monkeypatch, args, words):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(box / "no-netrc"))
    attack(box, capsys, summarize.main, fill(args, box), words, warnings=int("--table4" in args))  # the broken one


P = [  # scripts/plot.py
    ([], "the following arguments are required"),
    (["{done}"], "the following arguments are required: --out"),
    (["{box}/missing", "--out", "{box}/p.png"], "is not a folder"),
    (["{box}/empty", "--out", "{box}/p.png"], "no metrics.jsonl in or below"),
    (["{box}/metrics_only", "--out", "{box}/p.png"], "has no finished epoch yet"),
    (["{done}", "--out", "{box}/p.txt"], "write a .png, .pdf, .svg file"),
    (["{done}", "--out", "{box}/missing/p.png"], "does not exist"),
]


@pytest.mark.parametrize("args, words", P, ids=[" ".join(a)[:60] for a, _ in P])
def test_plot(box, capsys, args, words):
    attack(box, capsys, plot.main, fill(args, box), words)


L = [  # python -m engine.sweep (the scripts' queue and SLURM launcher), given one run line
    (["--launcher", "pbs", "--out-dir", "{runs}"], "invalid choice: 'pbs'"),
    (["--out-dir", "{runs}", "--time", "60"], "--time is a SLURM option: add --launcher slurm"),
    (["--launcher", "slurm-local", "--out-dir", "{runs}", "--time", "0"], "--time 0 is too short"),
    (["--launcher", "slurm-local", "--out-dir", "{runs}", "--slurm-arg", "=x"], "--slurm-arg takes KEY=VALUE"),
    (["--launcher", "slurm-local", "--out-dir", "{runs}", "--gpus", "0"], "under SLURM use --gpus-per-run"),
    (["--out-dir", "{runs}", "--gpus", "a"], "--gpus must name distinct GPUs"),
    (["--out-dir", "{runs}", "--", "--lr", "abc"], "invalid float value: 'abc'"),
    (["--out-dir", "{runs}", "--", "--name", "x"], "--name after -- is not for train.py here"),
]


@pytest.mark.parametrize("args, words", L, ids=[" ".join(a)[:60] for a, _ in L])
def test_sweep(box, capsys, monkeypatch, args, words):
    monkeypatch.setattr(sys, "stdin", io.StringIO("--model wrn10_1 --batch-size 32 --device cpu\n"))
    attack(box, capsys, sweep.main, fill(args, box), words)


def test_sweep_without_sbatch(box, capsys, monkeypatch):
    """Whatever this machine has installed: no sbatch on PATH."""
    monkeypatch.setenv("PATH", str(box / "empty"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("--model wrn10_1\n"))
    attack(box, capsys, sweep.main, ["--launcher", "slurm", "--out-dir", str(box / "runs")], "no sbatch here")


U = [  # python -m benchmarks.suite (and the throughput benchmark it runs)
    (["--budget-min", "0"], "--budget-min must be in (0, 600]"),
    (["--budget-min", "nan"], "--budget-min must be in (0, 600], got nan"),
    (["--budget-min", "inf"], "--budget-min must be in (0, 600], got inf"),
    (["--smoke", "--data-dir", "{data}"], "--smoke trains on synthetic images"),
    (["--out", "{box}/afile"], "cannot write the output folder there, it is a file"),
    (["--out", "{box}/missing/suite"], "does not exist"),
    (["--steps", "3"], "unrecognized arguments: --steps 3"),
]


@pytest.mark.parametrize("args, words", U, ids=[" ".join(a)[:60] for a, _ in U])
def test_suite(box, capsys, args, words):
    import benchmarks.suite
    attack(box, capsys, benchmarks.suite.main, fill(args, box), words)


B = [
    (["--steps", "0"], "--steps takes a whole number >= 1"),
    (["--lr", "abc"], "invalid float value: 'abc'"),
    (["--device", "junk"], "unknown device 'junk'"),
    (["--vs-m", "--m-sharpness", "0"], "--vs-m compares against --m-sharpness M"),
]


@pytest.mark.parametrize("args, words", B, ids=[" ".join(a)[:60] for a, _ in B])
def test_throughput(box, capsys, args, words):
    import benchmarks.throughput
    attack(box, capsys, benchmarks.throughput.main, fill(["--out", "{box}/bench", *args], box), words)


C = "configs/resnet18_sam.yaml"
FLAGS = ["--", "--data-dir", "{data}", *TINY]
SC = [  # the sweep scripts: (script, arguments, variables, words)
    ("seeds.sh", [C, "--bogus", "1"], {}, "unrecognized arguments: --bogus 1"),
    ("seeds.sh", [], {}, "give a config file first"),
    ("seeds.sh", ["configs/nope.yaml"], {}, "give a config file first"),
    ("seeds.sh", [C], {"SEEDS": ""}, "no runs"),
    ("seeds.sh", [C], {"SEEDS": "x"}, "argument --seed: invalid int value: 'x'"),
    ("seeds.sh", [C], {"SEEDS": "-1"}, "seed must be in [0, 4294967295]"),
    ("seeds.sh", [C], {"SEEDS": "*"}, "argument --seed: invalid int value: '*'"),
    ("seeds.sh", [C], {"SEEDS": "0 0"}, "are the same experiment"),
    ("seeds.sh", [C, "--gpus", "0,0"], {}, "--gpus must name distinct GPUs"),
    ("seeds.sh", [C, "--gpus", "a"], {}, "--gpus must name distinct GPUs"),
    ("seeds.sh", [C, "--out-dir"], {}, "argument --out-dir: expected one argument"),
    ("seeds.sh", [C, "--launcher", "pbs"], {}, "invalid choice: 'pbs'"),
    ("seeds.sh", [C, "--time", "60"], {}, "--time is a SLURM option: add --launcher slurm"),
    ("seeds.sh", [C, *FLAGS, "--seed", "7"], {}, "--seed after -- is set by this script for each run"),
    ("seeds.sh", [C, *FLAGS, "--seed=7"], {}, "--seed after -- is set by this script"),
    ("seeds.sh", [C, *FLAGS, "--out-dir", "x"], {}, "--out-dir after -- is not for train.py here"),
    ("seeds.sh", [C, *FLAGS, "--name", "x"], {}, "--name after -- is not for train.py here"),
    ("seeds.sh", [C, *FLAGS, "--config", C], {}, "--config after -- is set by this script"),
    ("seeds.sh", [C, *FLAGS, "--resume"], {}, "the sweep resumes interrupted runs itself"),
    ("seeds.sh", [C, *FLAGS, "--check"], {}, "the sweep checks every run itself"),
    ("seeds.sh", [C, *FLAGS, "--lr", "abc"], {}, "argument --lr: invalid float value: 'abc'"),
    ("seeds.sh", [C, *FLAGS, "--rho", "20"], {}, "rho must be in [0, 10], got 20.0"),
    ("seeds.sh", [C, "--dry-run", *FLAGS, "--lr", "abc"], {}, "invalid float value: 'abc'"),
    ("seeds.sh", [C, *FLAGS[:1], "--data-dir", "{box}/empty", *TINY], {}, "cifar10 not found"),
    ("sweep_rho.sh", [C, *FLAGS], {"RHOS": "0.05 20"}, "rho must be in [0, 10], got 20.0"),
    ("sweep_rho.sh", [C, *FLAGS], {"VAL_SPLIT": "1.5"}, "val_split must be in [0, 1), got 1.5"),
    ("sweep_rho.sh", [C, *FLAGS], {"RHOS": "0.05 big"}, "argument --rho: invalid float value: 'big'"),
    ("sweep_rho.sh", [C, *FLAGS, "--rho", "0.1"], {}, "--rho after -- is set by this script for each run"),
    ("sweep_rho.sh", [C, *FLAGS, "--optimizer", "sgd"], {}, "--optimizer after -- is set by this script"),
    ("sweep_m.sh", [C, *FLAGS], {"MS": "7"}, "m_sharpness 7 must divide the per-process batch 32"),
    ("sweep_m.sh", [C, *FLAGS, "--m-sharpness", "8"], {}, "--m-sharpness after -- is set by this script"),
    ("sgd_vs_sam.sh", [C, *FLAGS], {"AUGMENT": "mixup"}, "argument --augment: invalid choice: 'mixup'"),
    ("sgd_vs_sam.sh", [C, *FLAGS], {"LATE_SAM": "300", "EPOCHS": "1"}, "--sam-start-epoch 300 is after the last epoch"),
    ("sgd_vs_sam.sh", [C, *FLAGS], {"LATE_SAM": "-1"}, "sam_start_epoch must be in [0, 100000], got -1"),
    ("sgd_vs_sam.sh", [C, *FLAGS], {"EPOCHS": "99999999999999999999"}, "epochs must be in [1, 100000]"),
    ("sgd_vs_sam.sh", [C, *FLAGS, "--optimizer", "sgd"], {}, "--optimizer after -- is set by this script"),
    ("sgd_vs_sam.sh", [C, *FLAGS, "--epochs", "3"], {}, "it reads SEEDS AUGMENT EPOCHS DOUBLE_SGD LATE_SAM"),
    ("table4.sh", [*FLAGS], {"LEVELS": "1.5"}, "label_noise must be in [0, 1], got 1.5"),
    ("table4.sh", [*FLAGS], {"ALPHAS": "-1"}, "mixup_alpha must be in [0, 100], got -1.0"),
    ("table4.sh", [*FLAGS, "--label-noise", "0.4"], {}, "--label-noise after -- is set by this script"),
    ("table4.sh", [*FLAGS, "--relabel-from", "x"], {}, "--relabel-from after -- is set by this script"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, args, variables, words", SC,
                         ids=[f"{n} {' '.join(a)} {v}"[:70] for n, a, v, _ in SC])
def test_scripts(box, name, args, variables, words):
    before = tree(box), (REPO / "runs").exists()
    args = fill(args, box)
    args = args[:1] + ["--out-dir", str(box / "runs")] + args[1:] if args[:1] == [C] else \
        ["--out-dir", str(box / "runs"), *args] if name == "table4.sh" else args
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "CUDA_VISIBLE_DEVICES": "", "SAM_DATA_DIR": str(box / "data"), **variables}
    result = subprocess.run(["bash", f"scripts/{name}", *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stdout == "", (result.returncode, result.stdout[-500:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert (tree(box), (REPO / "runs").exists()) == before


def attack(box, capsys, main, argv, words, warnings=0):
    before = tree(box), (REPO / "runs").exists()
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert code == 2, (code, err)
    assert len(errors) == 1 and words in errors[0], err
    assert len(err) == 1 + warnings, err  # nothing else on stderr (summarize: one warning per skipped record)
    assert (tree(box), (REPO / "runs").exists()) == before


def test_the_attack_table_is_large():
    assert len(T) + len(RAW) + len(S) + len(E) + len(M) + len(P) + len(L) + len(U) + len(B) + len(SC) + 2 >= 150
