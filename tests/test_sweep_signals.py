"""The local queue under stop signals (engine/sweep.py): a signal to the sweep, to its process group (a
terminal's Ctrl-C) or to the script that started it reaches each running train.py once, which
checkpoints; no further run starts; the sweep says so in one line and exits with the stop code; the
same command resumes. And the sweep's own inputs that would put a run elsewhere than it predicts
(a config's name:) or that train.py refuses (--group '') are refused before anything starts."""

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import REPO, write_cifar10
from engine import sweep
from engine.config import ConfigError, parse_config
from test_scripts import data_for_the_checks, folder_of, script, script_env  # noqa: F401 (the autouse fixture)

# A stand-in for train.py: records each stop signal it gets, "checkpoints" after the step in flight
# (argv[3] seconds, in which a second signal may come), and exits as train.py does (75; 130 for SIGINT).
FAKE_TRAIN = textwrap.dedent("""
    import pathlib, signal, sys, time
    folder, record, step_s = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), float(sys.argv[3])
    got = []
    def handle(signum, frame):
        got.append(signum)
        with open(record, "a") as f:
            f.write(f"{folder.name} {signal.Signals(signum).name}\\n")
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, handle)
    (folder / "started").touch()
    end = time.time() + 60
    while not got and time.time() < end:
        time.sleep(0.01)
    time.sleep(step_s)
    if got:
        (folder / "last.pt").touch()
    sys.exit((130 if got[0] == signal.SIGINT else 75) if got else 3)
""")


QUEUE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from engine import sweep
    from engine.stopping import entry
    sweep.Run.command = lambda run: [sys.executable, "-c", {fake!r}, str(run.dir), {record!r}, {step_s!r}]
    runs = [sweep.Run([], Path({folder!r}) / f"run{{i}}", {{"relabel_from": None}}) for i in range({n})]
    sys.exit(entry(sweep.run_local, runs, {slots!r}))
""")


def start_queue(tmp_path, n, slots, step_s=0.3, **popen):
    """The local queue in its own process (python -m engine.sweep's run_local), of `n` stand-in runs."""
    code = QUEUE.format(fake=FAKE_TRAIN, record=str(tmp_path / "signals"), step_s=str(step_s), folder=str(tmp_path),
                        n=n, slots=slots)
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def wait_for(condition, timeout=60, what="the runs to start"):
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 75), (signal.SIGHUP, 75), (signal.SIGUSR1, 75),
                                          (signal.SIGINT, 130)])
def test_a_stop_signal_to_the_queue_reaches_each_running_run_once_and_starts_no_other(tmp_path, signum, code):
    """Two slots, three runs: the two running get the signal once each, the third never starts."""
    queue = start_queue(tmp_path, 3, ["0", "1"])
    wait_for(lambda: all((tmp_path / f"run{i}" / "started").exists() for i in (0, 1)) or queue.poll() is not None)
    queue.send_signal(signum)
    out, err = queue.communicate(timeout=60)
    assert queue.returncode == code, (out, err)
    name = signal.Signals(signum).name
    assert sorted((tmp_path / "signals").read_text().splitlines()) == [f"run0 {name}", f"run1 {name}"]
    assert not (tmp_path / "run2").exists()  # never started: no folder, no log
    assert "finished:" not in out and "FAIL" not in out, out
    (line,) = err.splitlines()
    assert line.startswith(f"stopped by {name}: 2 run(s) stopped with a checkpoint (run"), line
    assert "run0" in line and "run1" in line and "; 1 not started" in line, line
    assert line.endswith("Run the same command again to resume them (finished runs are skipped)"), line


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_at_a_terminal_reaches_the_run_once_per_press(tmp_path, presses):
    """A terminal's Ctrl-C goes to its whole foreground process group: the run, in its own session, gets
    each press once, through the sweep (a second press: train.py stops at once), and never directly."""
    record = tmp_path / "signals"
    queue = start_queue(tmp_path, 2, ["cpu"], step_s=2.0, start_new_session=True)  # the "terminal's" group
    wait_for(lambda: (tmp_path / "run0" / "started").exists() or queue.poll() is not None)
    for press in range(presses):
        os.killpg(queue.pid, signal.SIGINT)
        wait_for(lambda n=press: record.exists() and len(record.read_text().splitlines()) > n, what="the signal")
    out, err = queue.communicate(timeout=60)
    assert queue.returncode == 130, (out, err)
    assert record.read_text().splitlines() == ["run0 SIGINT"] * presses  # once per press, not twice
    assert not (tmp_path / "run1").exists() and err.splitlines()[-1].startswith("stopped by SIGINT: 1 run(s)"), err


def test_the_queue_puts_back_the_signal_handlers_it_found(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep.Run, "command", lambda run: ["true"])
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGTSTP)}
    assert sweep.run_local([sweep.Run([], tmp_path / "r", {"relabel_from": None})], ["cpu"]) == 0
    assert {signum: signal.getsignal(signum) for signum in before} == before


def descendants(pid):
    """Every descendant of a process, from /proc -> {pid: command line}."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 1:].split()[1])
        except (ValueError, OSError):
            continue
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, p in parents.items():
            if p == parent and child not in found:
                try:
                    found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                frontier.append(child)
    return found


def wait_for_step(metrics, proc, timeout=300):
    def stepped():
        assert proc.poll() is None, "the sweep ended before its run took a step"
        return metrics.is_file() and any(json.loads(line).get("step", 0) >= 1
                                         for line in metrics.read_text().splitlines() if line.endswith("}"))
    wait_for(stepped, timeout, "the run's first step")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["sweep", "process group", "script"])
def test_a_stopped_sweep_checkpoints_its_run_and_the_same_command_finishes_it(tmp_path, target):
    """A real sweep of a real run: SIGTERM to the sweep, Ctrl-C to its process group, or SIGTERM to the
    script that started it, once the run has taken a step. The run's train.py checkpoints and
    ends (not left training on its own), the sweep says so in one line (exit 75 / 130), and the same
    command finishes the run."""
    data = write_cifar10(tmp_path / "data", per_batch=40)
    out = tmp_path / "runs"
    flags = ["--model", "wrn10_1", "--batch-size", "32", "--epochs", "2", "--log-every", "1", "--device", "cpu",
             "--wandb-mode", "disabled", "--data-dir", str(data)]
    line = "--config configs/resnet18_sam.yaml --seed 0\n"
    if target == "script":
        command = ["bash", "scripts/seeds.sh", "configs/resnet18_sam.yaml", "--out-dir", str(out), "--", *flags]
    else:
        command = [sys.executable, "-m", "engine.sweep", "--out-dir", str(out), "--group", "g", "--", *flags]
    env, lines = script_env(SEEDS="0"), tmp_path / "lines"
    lines.write_text(line)  # what a script pipes into the sweep (the script makes its own)

    def start():
        with open(lines) as stdin:
            return subprocess.Popen(command, cwd=REPO, env=env, stdin=stdin, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
    proc = start()
    folder = Path(folder_of(shlex.split(line) + flags + ["--out-dir", str(out)]))
    wait_for_step(folder / "metrics.jsonl", proc)
    (trainer,) = [pid for pid, cmd in descendants(proc.pid).items() if " train.py " in cmd]
    signum = signal.SIGINT if target == "process group" else signal.SIGTERM
    if target == "process group":
        os.killpg(proc.pid, signum)  # as a terminal's Ctrl-C: to every process of its foreground group
    else:
        proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=300)  # the pipes close once the sweep has ended
    assert not Path(f"/proc/{trainer}").exists() or " train.py " not in \
        Path(f"/proc/{trainer}/cmdline").read_bytes().replace(b"\0", b" ").decode(), "train.py left running"
    name = signal.Signals(signum).name
    log = (folder / "stdout.log").read_text()
    assert f"stopped by {name} after step" in log, log[-2000:]  # checkpointed the step in flight, not ended at once
    assert (folder / "last.pt").is_file() and not (folder / "results.json").exists()
    assert proc.returncode == (130 if signum == signal.SIGINT else 75), (stdout, stderr)  # a script execs the sweep
    assert stderr.splitlines()[-1].startswith("stopped by SIGTERM: 1 run(s) stopped with a checkpoint" if signum ==
                                              signal.SIGTERM else "stopped by SIGINT: 1 run(s) stopped with"), stderr
    assert "Run the same command again to resume them" in stderr and stderr.count("\n") == 1, stderr
    again = start()
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, (stdout, stderr)
    assert "finished: 1 run(s), skipped (already finished): 0, failed: 0" in stdout
    assert json.loads((folder / "results.json").read_text())["epochs"] == 2


# ---- what the sweep predicts is where train.py puts the run -------------------------------------------------

NAMES = st.text(st.sampled_from("abcxyz019-_.+=é"), min_size=1, max_size=30).filter(lambda n: n not in (".", ".."))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(NAMES, st.sampled_from(["yaml", "base yaml", "line"]))
def test_a_run_name_set_anywhere_is_refused_as_the_sweep_names_each_run(tmp_path, name, where):
    """name: in a config file (or the file it bases on), or --name in a script's line, would make train.py
    use OUT/NAME for every run while the sweep checks, skips and resumes the folders named after their
    settings: refused when the runs are resolved, before anything is checked or started."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"base": str(REPO / "configs" / "resnet18_sam.yaml"), "name": name}))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"base": str(base) if where == "base yaml" else str(REPO / "configs" /
                                                                                           "resnet18_sam.yaml"),
                                      **({"name": name} if where == "yaml" else {})}))
    lines = [shlex.join(["--config", str(config if where != "line" else REPO / "configs" / "resnet18_sam.yaml"),
                         "--seed", str(seed), *([f"--name={name}"] if where == "line" else [])]) for seed in (0, 1)]
    options, extra = sweep.parse(["--out-dir", str(tmp_path / "runs")])
    with pytest.raises(ConfigError) as e:
        sweep.resolve(lines, extra, options)
    assert str(e.value).startswith("run 1 (") and str(tmp_path / "runs" / name) in str(e.value), e.value
    assert ("--name would put this run in" if where == "line" else f"name: {name} from {config}") in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_a_config_file_that_names_its_run_is_one_line_and_creates_nothing(tmp_path):
    config = tmp_path / "named.yaml"
    config.write_text(f"base: {REPO / 'configs' / 'resnet18_sam.yaml'}\nname: foo\n")
    out = tmp_path / "runs"
    tiny = ["--", "--model", "wrn10_1", "--batch-size", "32", "--subset", "64", "--epochs", "1", "--device", "cpu",
            "--wandb-mode", "disabled"]  # (before the fix the first run trained: briefly, then the second failed)
    for extra in (["--dry-run"], []):
        result = script("seeds.sh", str(config), "--out-dir", str(out), *extra, *tiny, env_extra={"SEEDS": "0 1"})
        assert result.returncode == 2 and result.stdout == "", (result.stdout, result.stderr)
        assert result.stderr.startswith("error: run 1 (") and result.stderr.count("\n") == 1, result.stderr
        assert f"name: foo from {config} would put every run of its sweep in {out / 'foo'}" in result.stderr
        assert not out.exists()


def test_a_config_without_a_name_keeps_the_folder_train_py_uses(tmp_path):
    options, extra = sweep.parse(["--out-dir", str(tmp_path / "runs"), "--", "--epochs", "3"])
    (run,) = sweep.resolve(["--config configs/resnet18_sam.yaml --seed 4"], extra, options)
    assert str(run.dir) == folder_of(["--config", "configs/resnet18_sam.yaml", "--seed", "4", "--epochs", "3",
                                      "--out-dir", str(tmp_path / "runs")])


# ---- the sweep's own options, refused as train.py refuses the values it hands on ------------------------------

def train_refuses(*flags):
    try:
        parse_config([*flags, "--wandb-mode", "offline"])
    except ConfigError as e:
        return str(e)
    return None


def sweep_refuses(argv, capsys):
    try:
        sweep.parse(argv)
    except SystemExit as e:
        assert e.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err
    return None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.sampled_from(["", " ", "\t", "  \n", "g", "seeds-resnet18_sam", "-x"]),
                 st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12)))
def test_the_group_is_refused_exactly_when_train_py_refuses_it_as_a_wandb_group(capsys, group):
    """--group '' used to drop the group silently; train.py refuses --wandb-group '' (and the same
    values): the sweep refuses the same values, at once, and hands the others on unchanged."""
    refused, by_train = sweep_refuses([f"--group={group}"], capsys), train_refuses(f"--wandb-group={group}")
    assert (refused is None) == (by_train is None), (group, refused, by_train)
    if refused:
        assert by_train.replace("--wandb-group", "--group") in refused
        return
    options, extra = sweep.parse([f"--group={group}", "--", "--wandb-mode", "offline"])
    (run,) = sweep.resolve(["--config configs/resnet18_sam.yaml"], extra, options)
    assert run.args[run.args.index("--wandb-group") + 1] == group


@pytest.mark.parametrize("argv, message", [
    (["--group", ""], "--group is empty"),
    (["--group", "   "], "--group is empty"),
    (["--out-dir", ""], "--out-dir is empty"),
    (["--out-dir", " "], "--out-dir is empty"),
    (["--reads", "SEEDS NOPE"], "--reads names NOPE, which is no sweep variable"),
])
def test_the_sweeps_own_values_that_train_py_refuses_are_one_line_and_start_nothing(tmp_path, argv, message):
    result = subprocess.run([sys.executable, "-m", "engine.sweep", *argv, "--dry-run"], cwd=REPO,
                            input="--config configs/resnet18_sam.yaml\n", capture_output=True, text=True,
                            env=script_env(), timeout=120)
    assert result.returncode == 2 and result.stdout == "", (result.stdout, result.stderr)
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1, result.stderr


def test_a_scripts_empty_group_is_refused(tmp_path):
    out = tmp_path / "runs"
    result = script("seeds.sh", "configs/resnet18_sam.yaml", "--out-dir", str(out), "--group", "", "--dry-run",
                    env_extra={"SEEDS": "0"})
    assert result.returncode == 2 and result.stdout == "" and result.stderr.startswith("error: --group is empty")
    assert result.stderr.count("\n") == 1 and not out.exists()
