"""What the sweep scripts share. Each `scripts/*.sh` is a shell loop that prints one train.py
command line per run; this module takes those lines and does the rest:

    scripts/seeds.sh CONFIG ... | python -m engine.sweep --group NAME [options] [-- train.py flags]

1. Every run is checked as train.py checks a command (settings, run folder, data files) before any
   starts: the first bad one is one `error:` line, exit 2, and nothing is started or created.
2. A run's folder is train.py's own name for its settings, so the same experiment always finds the
   same folder, whatever the order or spelling of its flags. Finished runs (results.json) are
   skipped, interrupted ones (last.pt) resumed.
3. The runs go out one at a time per GPU of this machine (--launcher local), or as one SLURM job
   each through submitit (--launcher slurm; engine/slurm.py).

A run whose --relabel-from source (Table 4's Bootstrap rows) has not finished waits: the local queue
starts it once its source, in the same sweep, has finished; otherwise run the same command again.

A stop signal (engine/stopping.py's: Ctrl-C, kill, a closed terminal, ...) to the local queue reaches
each running train.py once, which checkpoints the step in flight; no further run starts, and the sweep
exits with train.py's stop code (75; 130 for Ctrl-C) and one line: the same command resumes the runs.
Each train.py runs in its own session, so a terminal's Ctrl-C reaches it once (through the sweep), and a
second Ctrl-C still means "stop now". The scripts exec the sweep, so a signal to a script's process is one
to the sweep."""

import argparse
import contextlib
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from engine import checkpoint
from engine.config import ConfigError, OneLineParser, build_parser, default_name, flag, parse_config, refuse
from engine.stopping import INTERRUPTED, STOP_SIGNALS, STOPPED, StoppedStarting, exit_code, say, signal_name
from engine.tracker import no_links, wandb_mode

REPO = Path(__file__).resolve().parents[1]
# train.py flags the sweep sets itself: a script's user cannot give them after --
OWN = {"name": "the sweep names each run after its settings", "out_dir": "give the sweep's own --out-dir",
       "resume": "the sweep resumes interrupted runs itself", "check": "the sweep checks every run itself"}
# The variables the sweep scripts read (each script passes --reads with its own): one set for another
# script's variable would do nothing, so it is refused (tests/test_scripts.py keeps this list true)
VARIABLES = ("SEEDS", "SEED", "AUGMENT", "EPOCHS", "DOUBLE_SGD", "LATE_SAM", "MS", "RHOS", "VAL_SPLIT", "LEVELS", "ALPHAS")


@dataclass
class Run:
    args: list                # train.py arguments: the script's line, then the flags after --
    dir: Path
    config: dict              # the settings these arguments give (train.py's own parse)

    @property
    def name(self):
        return self.dir.name

    @property
    def source(self):         # --relabel-from: the run this one learns its labels from
        return Path(self.config["relabel_from"]) if self.config["relabel_from"] else None

    def finished(self):
        return checkpoint.finished(self.dir)

    def waiting(self):
        return self.source is not None and not checkpoint.finished(self.source)

    def command(self):
        resume = ["--resume"] if (self.dir / "last.pt").is_file() else []
        return [sys.executable, "train.py", *self.args, *resume]


def parse(argv):
    p = OneLineParser(prog="python -m engine.sweep", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", help="W&B group of every run (the scripts name it after the sweep)")
    p.add_argument("--out-dir", default="runs", help="folder of the run folders (default runs)")
    p.add_argument("--dry-run", action="store_true", help="check every run, print its command, start nothing")
    p.add_argument("--relabelled", action="store_true",
                   help="print each run line again, learning its labels from that run (--relabel-from)")
    p.add_argument("--reads", metavar="'VAR ...'", help="the variables the calling script reads (each script gives "
                                                         "its own); any other sweep variable set is refused")
    p.add_argument("--launcher", choices=("local", "slurm", "slurm-local"), default="local")
    p.add_argument("--gpus", help="this machine's GPUs, one run on each at a time (default: $CUDA_VISIBLE_DEVICES, "
                                  "else every GPU; without one, the CPU, one run at a time)")
    slurm = p.add_argument_group("SLURM (--launcher slurm, or slurm-local: the same jobs on this machine)")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--constraint")
    slurm.add_argument("--gpus-per-run", type=int, help="GPUs per job (default 1; torchrun when > 1)")
    slurm.add_argument("--cpus-per-run", type=int, help="CPUs per job")
    slurm.add_argument("--time", type=int, help="minutes per job (default 1440)")
    slurm.add_argument("--slurm-arg", action="append", metavar="KEY=VALUE", help="any other sbatch option")
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    options = p.parse_args(own)
    try:  # what the sweep hands each train.py, checked as train.py checks the same values (W&B on: a group is
        # only given to runs that log to W&B)
        parse_config(["--out-dir", options.out_dir, "--wandb-mode", "offline",
                      *([f"--wandb-group={options.group}"] if options.group is not None else [])])
    except ConfigError as e:
        p.error(str(e).replace("--wandb-group", "--group"))
    if options.reads is not None:
        unknown = [v for v in options.reads.split() if v not in VARIABLES]
        if unknown:  # a script that says it reads a variable no script reads: the refusals of others would be off
            p.error(f"--reads names {unknown[0]}, which is no sweep variable (they are {' '.join(VARIABLES)})")
        unread = [v for v in VARIABLES if v in os.environ and v not in options.reads.split()]
        if unread:
            p.error(f"${unread[0]} is set, but this script does not read it (it reads {options.reads}), so it would "
                    f"do nothing; unset it, or use the script that reads it")
    slurm_given = [a.option_strings[0] for a in slurm._group_actions if getattr(options, a.dest) is not None]
    if options.launcher == "local":
        if slurm_given:
            p.error(f"{slurm_given[0]} is a SLURM option: add --launcher slurm (or slurm-local)")
        source = "--gpus" if options.gpus is not None else "$CUDA_VISIBLE_DEVICES"
        gpus = options.gpus if options.gpus is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
        if gpus is None:  # every GPU of this machine
            import torch
            gpus = ",".join(str(i) for i in range(torch.cuda.device_count()))
        slots = [g.strip() for g in gpus.split(",")] if gpus.strip() else ["cpu"]
        # a GPU as CUDA_VISIBLE_DEVICES names it: an index, or a UUID (GPU-..., MIG-...) as on many clusters
        if any(not re.fullmatch(r"[0-9]+|(GPU|MIG)-[0-9a-fA-F/-]+", g) for g in slots if g != "cpu") \
                or len(set(slots)) < len(slots):
            p.error(f"{source} must name distinct GPUs like 0,1,2 or their UUIDs (one run per GPU at a time), got "
                    f"{gpus!r}")
        options.slots = slots
    elif options.gpus is not None:
        p.error("--gpus chooses this machine's GPUs for the local queue; under SLURM use --gpus-per-run")
    if options.launcher != "local":
        from engine import slurm  # its own checks of the SLURM options, before anything else
        slurm.check_options(options, p.error)
    return options, extra


def given(words):
    """The train.py settings that `words` set -> {setting}."""
    namespace = vars(build_parser().parse_args(words))
    return {k for k, v in namespace.items() if v is not None}


def resolve(lines, extra, options):
    """The script's lines -> [Run], each checked as far as it can be before any starts."""
    extra_keys = given(extra)
    if extra_keys & set(OWN):
        key = sorted(extra_keys & set(OWN))[0]
        raise ConfigError(f"{flag(key)} after -- is not for train.py here: {OWN[key]}")
    runs, seen = [], {}
    for n, line in enumerate(lines, 1):
        try:
            run = resolve_line(line, extra, extra_keys, options)
        except ConfigError as e:
            raise ConfigError(f"run {n} ({line.strip()}): {e}") from None
        if run.dir in seen:
            raise ConfigError(f"runs {seen[run.dir]} and {n} are the same experiment ({run.name}); a sweep runs each once")
        seen[run.dir] = n
        runs.append(run)
    if not runs:
        raise ConfigError("no runs: the script's lists are empty (see the variables in its header)")
    return runs


def resolve_line(line, extra, extra_keys, options):
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise ConfigError(f"not shell words ({e})") from None
    clash = given(words) & extra_keys
    if clash:
        reads = f"; it reads {options.reads}, and its header says which of them sets it" if options.reads else ""
        raise ConfigError(f"{flag(sorted(clash)[0])} after -- is set by this script for each run: drop it, and "
                          f"set it through the script's environment variables{reads}")
    args = [*words, *extra, "--out-dir", options.out_dir]
    config = parse_config(args).config
    folder = Path(options.out_dir) / default_name(config)
    used = Path(config["out_dir"]) / (config["name"] or default_name(config))  # train.py's own (engine/resume.py)
    if used != folder:  # the sweep would check, skip and resume one folder while train.py trains in another
        if config["name"] is None:
            raise ConfigError(f"train.py would put this run in {used}, not in {folder} where the sweep looks for it")
        config_file = vars(build_parser().parse_args(args))["config"]
        said, fix = (f"--name would put this run in {used}", "drop --name") if "name" in given(words) else \
            (f"name: {config['name']} from {config_file} would put every run of its sweep in {used}",
             "drop name: from the config file (or give one without it)")
        raise ConfigError(f"{said}, not in the folder named after its settings ({folder}) where the sweep checks, "
                          f"skips and resumes it; {OWN['name']}: {fix}")
    from engine.resume import read_run_config
    recorded = ((read_run_config(folder) or {}).get("config") or {}).get("wandb_mode")  # a run started by hand
    if options.group and wandb_mode(config["wandb_mode"] or recorded) != "disabled" and config["wandb_group"] is None:
        args += ["--wandb-group", options.group]
    return Run(args, folder, config)


def check(runs, skip=(), measure=False):
    """train.py's own checks of every unfinished run (a waiting run without its source, which does not
    exist yet), but those in `skip` (their SLURM job holds them); the first failure is a ConfigError
    naming the run. `measure`: runs that will train on this machine's CPU are also timed, and refused
    as train.py refuses them (over 12 hours on a CPU --device auto fell back to)."""
    from engine.preflight import check as check_command
    from data import DataError
    for run in runs:
        if run.finished() or run.dir in skip:
            continue
        args = run.args
        if run.waiting():
            at = args.index("--relabel-from")
            args = args[:at] + args[at + 2:]
        try:
            check_command(parse_config([*args, *(["--resume"] if (run.dir / "last.pt").is_file() else [])]), measure)
        except (ConfigError, DataError) as e:
            raise ConfigError(f"{run.name}: {e}") from None


def run_local(runs, slots):
    """One run per slot at a time; a waiting run starts once its source has finished -> exit code.
    A stop signal is passed on to every running train.py (each in its own session: a terminal's Ctrl-C
    reaches it only this way, so once) and starts no further run; the queue then waits for them and says
    in one line what stopped, exit train.py's stop code."""
    todo, lock, report = list(runs), threading.Lock(), {"done": [], "failed": [], "skipped": [], "waiting": []}
    running = set()
    children, received, stopped = {}, [], []  # Popen -> run; the stop signals received; (run, exit code)
    guard = threading.RLock()  # a child starts, or the signals are passed on, never both at once (an RLock: a
    # second signal may run its handler inside the first's)

    def forward(signum, frame=None):  # in the main thread, which waits in Thread.join
        if signum in STOP_SIGNALS:
            received.append(signum)
        with guard:
            for proc in list(children):
                with contextlib.suppress(OSError):
                    proc.send_signal(signum)
        if signum == signal.SIGTSTP:  # Ctrl-Z: the runs pause with the sweep (fg, bg: SIGCONT, passed on)
            os.kill(os.getpid(), signal.SIGSTOP)

    def next_run():
        with lock:
            while not received:
                for run in list(todo):
                    if run.finished():
                        todo.remove(run)
                        report["skipped"].append(run.name)
                        tell(f"skip {run.name} (finished)")
                    elif not run.waiting():
                        todo.remove(run)
                        running.add(run.dir)
                        return run
                if not any(run.source in running for run in todo):  # all that is left waits in vain
                    report["waiting"] += [run.name for run in todo]
                    todo.clear()
                    return None
                lock.release()  # wait for a source that runs now
                time.sleep(1)
                lock.acquire()
            return None

    def start(run, slot):
        """-> the run's train.py, started, or None when a stop signal came first."""
        command = run.command()
        with guard:
            if received:
                return None
            run.dir.mkdir(parents=True, exist_ok=True)
            with open(run.dir / "stdout.log", "a", opener=no_links) as log:  # a retry keeps the failed attempt's log
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} on {slot}: {shlex.join(command)}\n")
                log.flush()
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": "" if slot == "cpu" else slot}
                proc = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            children[proc] = run
        tell(f"[{slot}] start {run.name}")
        return proc

    def worker(slot):
        while (run := next_run()) is not None:
            proc = start(run, slot)
            if proc is None:
                with lock:
                    running.discard(run.dir)
                    todo.append(run)  # not started: the stop line counts it
                return
            code = proc.wait()
            with guard:
                del children[proc]
            with lock:
                running.discard(run.dir)
                if received and code:  # stopped (or failed) after a stop signal: the stop line says it
                    stopped.append((run, code))
                    continue
                report["failed" if code else "done"].append(run.name)
            tell(f"[{slot}] {'FAIL' if code else 'done'}  {run.name}" +
                 (f" (exit {code}; log: {run.dir / 'stdout.log'}){said(run.dir / 'stdout.log')}" if code else ""))

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in slots]
    previous = {signum: signal.signal(signum, forward) for signum in (*STOP_SIGNALS, signal.SIGTSTP, signal.SIGCONT)}
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        restore(previous)
    if received:
        return stop_report(received, stopped, report, todo)
    tell(f"finished: {len(report['done'])} run(s), skipped (already finished): {len(report['skipped'])}, "
         f"failed: {len(report['failed'])}")
    for name in report["failed"]:
        tell(f"  failed: {name}")
    for name in report["waiting"]:
        tell(f"  waiting: {name} (its --relabel-from source has not finished; run this command again when it has)")
    if report["failed"]:
        tell("re-run the same command to retry the failed runs (finished ones are skipped)")
    return 1 if report["failed"] else 0


def stop_report(received, stopped, report, left):
    """The queue's one line after a stop signal -> train.py's stop code (130 once a run stopped by Ctrl-C)."""
    left = [run for run in left if not run.finished()]
    codes = [code for _, code in stopped if code in (STOPPED, INTERRUPTED)]
    kept = [run.name for run, code in stopped if code in (STOPPED, INTERRUPTED) and (run.dir / "last.pt").is_file()]
    fresh = sum(code in (STOPPED, INTERRUPTED) and not (run.dir / "last.pt").is_file() for run, code in stopped)
    failed = [f"{run.name} (exit {code}; log: {run.dir / 'stdout.log'})" for run, code in stopped
              if code not in (STOPPED, INTERRUPTED)] + report["failed"]
    parts = [*([f"{len(kept)} run(s) stopped with a checkpoint ({', '.join(kept)})"] if kept else []),
             *([f"{fresh} run(s) stopped before their first step (nothing to checkpoint)"] if fresh else []),
             *([f"{len(left)} not started"] if left else []),
             *([f"{len(report['done'])} finished"] if report["done"] else []),
             *([f"failed: {', '.join(failed)}"] if failed else [])] or ["no run was running"]
    say(f"stopped by {signal_name(received[0])}: {'; '.join(parts)}. Run the same command again to resume them "
        f"(finished runs are skipped)")
    return max(codes) if codes else exit_code(received[0])


def tell(line):
    """A line of the queue's report on stdout; after SIGHUP the terminal may be gone, and the queue goes on."""
    try:
        print(line, flush=True)
    except OSError:
        pass


def said(log):
    """The last `error:` or `bug:` line of a run's log, to show beside its FAIL line."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    last = next((line for line in reversed(lines) if line.startswith(("error: ", "bug: "))), None)
    return f"\n    {last}" if last else ""


def launch_slurm(runs, options):
    """Check the runs and their jobs, then submit each unfinished run without a job -> exit code."""
    from engine import slurm

    def error(message):
        raise ConfigError(message)
    slurm.check_runs(runs, options, error)
    try:
        active = slurm.active_jobs(runs) if options.launcher == "slurm" else {}
        check(runs, skip=active)
        for run in runs:
            if run.waiting():
                print(f"waiting: {run.name} (its --relabel-from source has not finished; run this command again "
                      f"when it has)")
        return slurm.launch([run for run in runs if not run.waiting()], options, active)
    except slurm.SlurmError as e:
        raise ConfigError(str(e)) from None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--relabelled" in argv:  # its lines reach the main sweep too, which reports any error once
        with contextlib.redirect_stderr(io.StringIO()):
            return _main(argv)
    return _main(argv)


def _main(argv):
    previous = {}
    try:
        options, extra = parse(argv)
        if options.launcher == "local" and not options.dry_run and not options.relabelled:
            # until the runs start, a stop signal stops at once, nothing started (run_local passes them on)
            previous = {signum: signal.signal(signum, stop_at_once) for signum in STOP_SIGNALS}
        lines = [line for line in sys.stdin.read().splitlines() if line.strip()]
        runs = resolve(lines, extra, options)
        if options.relabelled:  # Table 4's stage 2: each run again, on the labels it predicts
            for line, run in zip(lines, runs):
                print(f"{line.strip()} --relabel-from {shlex.quote(str(run.dir))}")
            return 0
        if options.launcher == "local":
            check(runs, measure=not options.dry_run)  # a dry run measures nothing
        else:
            return launch_slurm(runs, options)
        if options.dry_run:
            for run in runs:
                print(f"skip {run.name} (finished)" if run.finished() else f"{shlex.join(run.command())}  # {run.dir}")
            return 0
        return run_local(runs, options.slots)
    except ConfigError as e:
        return refuse(e)
    except StoppedStarting as e:
        say(f"{e} while checking the runs: stopped before any run started; nothing was started")
        return exit_code(e.signum)
    finally:
        restore(previous)


def stop_at_once(signum, frame):
    raise StoppedStarting(signum)


def restore(handlers):
    """Put back the signal handlers {signal: handler} that signal.signal returned (None: one set outside
    Python, which cannot be put back: the default then)."""
    for signum, handler in handlers.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


if __name__ == "__main__":
    from engine.stopping import entry
    sys.exit(entry(main))
