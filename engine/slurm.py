"""The sweeps' SLURM launcher (engine/sweep.py --launcher slurm), through submitit: one job per run;
`--launcher slurm-local` runs the same jobs through submitit's local executor (the same code path
minus sbatch, for a laptop or a test).

Each attempt of a job runs train.py in a child process (under torchrun with --gpus-per-run > 1),
continuing the run from its checkpoint when there is one; a finished run is left alone. When the
job is signalled, train.py checkpoints the step in flight and exits, and the job decides from what
SLURM says about it who, if anyone, requeues it (`after_stop`):
- SLURM requeued it already (`scontrol requeue`, a preemption with PreemptMode=REQUEUE): nothing to do;
- its time limit is near (SLURM's warning, SIGNAL_S before the limit): the job requeues itself, once
  per attempt that reached a checkpoint, so a limit too short to make progress cannot loop;
- anything else is a person's cancel (`scancel`, with whatever signal): final, the run stays stopped
  at its checkpoint until the same sweep command is given again.
Logs: <run>/slurm/."""

import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIGNAL_S = 90       # SLURM warns a job this long before its time limit (sbatch --signal=USR2@90)
MIN_TIME_MIN = 5    # the shortest --time: starting, one step and a checkpoint must fit before the warning
STOP_WAIT_S = 80    # how long a stopping train.py may take to checkpoint
ACTIVE = "PENDING RUNNING SUSPENDED COMPLETING CONFIGURING REQUEUED REQUEUE_HOLD REQUEUE_FED RESIZING SIGNALING " \
         "STAGE_OUT STOPPED RESV_DEL_HOLD SPECIAL_EXIT".split()  # squeue lists these; a job in one still runs
# sbatch options the launcher sets itself, or that a first-class option sets: not for --slurm-arg
OWN = {**dict.fromkeys(("gpus", "gres", "gpus-per-node", "gpus-per-task", "gpus-per-socket"),
                       "the GPUs a job asks for follow from its run: --gpus-per-run N, and none for --device cpu"),
       **{key: f"use --{key}" for key in ("partition", "account", "constraint", "time")},
       "cpus-per-task": "use --cpus-per-run",
       **dict.fromkeys(("job-name", "output", "error", "open-mode", "signal", "nodes", "ntasks-per-node", "ntasks",
                        "array", "requeue", "no-requeue", "wckey"), "the launcher sets it for every job")}


class TrainJob:
    """One run as a submitit job: `python train.py ARGS [--resume]`, resumed on every attempt."""

    def __init__(self, name, run_dir, args, gpus=1):
        self.name, self.run_dir, self.args, self.gpus = name, str(run_dir), list(args), gpus
        self.proc, self.facts = None, None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("proc", "facts")}

    def __setstate__(self, state):
        self.__dict__.update(state, proc=None, facts=None)

    def command(self):
        resume = ["--resume"] if (Path(self.run_dir) / "last.pt").is_file() else []
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.gpus}"] \
            if self.gpus > 1 else [sys.executable]
        return [*launcher, "train.py", *self.args, *resume]

    def __call__(self):
        checkpoint = Path(self.run_dir) / "last.pt"
        from engine.checkpoint import finished
        if finished(self.run_dir):
            return f"{self.name}: finished"
        started = time.time()
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, self._stop)  # in place of submitit's handlers: the job decides (after_stop)
        signal.signal(signal.SIGCONT, signal.SIG_DFL)
        command = self.command()
        say(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command)}")
        # torchrun's agent dies of SIGUSR1/2; ignored there, they still reach train.py (which handles them)
        self.proc = subprocess.Popen(command, cwd=REPO, preexec_fn=_ignore_user_signals if self.gpus > 1 else None)
        waiter = threading.Thread(target=self.proc.wait, daemon=True)
        waiter.start()
        while waiter.is_alive():  # joined in slices: the signal handler runs in between
            waiter.join(1.0)
        code = self.proc.returncode
        if code == 0:
            return f"{self.name}: finished"
        if self.facts is None:  # train.py failed by itself: its traceback is in the log above
            raise RuntimeError(f"train.py exited with code {code}; see the log in {Path(self.run_dir) / 'slurm'}")
        progressed = checkpoint.is_file() and checkpoint.stat().st_mtime >= started
        decision = after_stop(self.facts, progressed)
        say(f"train.py stopped (exit {code}): {decision[1]}")
        if decision[0] == "requeue":
            subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True, timeout=60)
        if decision[0] in ("requeue", "requeued"):
            sys.exit(0)  # no result: this attempt is not the job's end, the next one writes it
        return f"{self.name}: stopped, not requeued ({decision[1]})"

    def _stop(self, signum, frame):
        if self.facts is not None:  # SLURM signals every process of the job, often more than once
            return
        self.facts = job_facts()  # what SLURM says at the first signal decides, before the job's state moves on
        self.facts["signal"] = signal.Signals(signum).name
        say(f"{self.facts['signal']}: asking train.py to checkpoint the step in flight and stop")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # SLURM signals train.py too; a repeated signal changes nothing


def job_facts():
    """What SLURM says about this job now -> {state, restarts, seconds_left}; {} outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return {}
    for attempt in range(10):  # slurmctld may be busy with the very preemption that signalled the job
        try:
            done = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            done = subprocess.CompletedProcess([], 1, "", str(e))
        if "JobState=" in done.stdout:
            break
        say(f"scontrol show job {job} (try {attempt + 1}): {(done.stderr or done.stdout).strip()[-300:] or 'no answer'}")
        time.sleep(1)
    out = done.stdout
    fields = dict(re.findall(r"(\w+)=(\S*)", out))
    try:
        left = (datetime.strptime(fields["EndTime"], "%Y-%m-%dT%H:%M:%S") - datetime.now()).total_seconds()
    except (KeyError, ValueError):
        left = None
    return {"state": fields.get("JobState"), "restarts": int(fields.get("Restarts", "0") or 0),
            "restarts_at_start": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0), "seconds_left": left}


def after_stop(facts, progressed):
    """Who requeues a job whose train.py a signal stopped -> (what, why): "requeued" (SLURM did),
    "requeue" (the job must: its time limit), or "final" (a person's cancel, or nothing to requeue to)."""
    if facts.get("state") is None:
        return "final", ("not under SLURM, or SLURM did not answer: not requeued by the job (SLURM still requeues "
                         "it if it meant to); the same sweep command resumes the run")
    if facts["restarts"] > facts["restarts_at_start"]:
        return "requeued", "SLURM requeued the job (a requeue or a preemption); its next attempt resumes the run"
    if facts["state"] == "RUNNING" and facts["seconds_left"] is not None and facts["seconds_left"] <= SIGNAL_S + 60:
        if not progressed:
            return "final", ("its time limit came before this attempt reached a checkpoint, so a requeue would not "
                             "progress: give the sweep a longer --time and run its command again")
        return "requeue", "its time limit is near; requeued, the next attempt resumes the run"
    return "final", (f"cancelled ({facts['signal']}, job {facts['state']}): the run stays stopped at its checkpoint; "
                     f"the same sweep command resumes it")


def say(line):
    print(line, flush=True)


def _ignore_user_signals():
    for signum in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


def gpus(options, run):
    """The GPUs the job of a run asks for: none for --device cpu, else --gpus-per-run (default 1)."""
    return 0 if run.config["device"] == "cpu" else options.gpus_per_run or 1


def parameters(options, run):
    """submitit's parameters of one job (AutoExecutor names: generic, or slurm_ for SLURM only)."""
    params = {"name": run.name, "timeout_min": options.time or 1440, "nodes": 1, "tasks_per_node": 1,
              "slurm_signal_delay_s": SIGNAL_S}
    if gpus(options, run):
        params["gpus_per_node"] = gpus(options, run)
    for key in ("partition", "account", "constraint"):
        if getattr(options, key):
            params[f"slurm_{key}"] = getattr(options, key)
    if options.cpus_per_run:
        params["cpus_per_task"] = options.cpus_per_run
    if options.slurm_arg:
        params["slurm_additional_parameters"] = dict(arg.split("=", 1) for arg in options.slurm_arg)
    return params


def check_options(options, error):
    """The SLURM options of a sweep (engine/sweep.py), before any run is checked: error(message) exits."""
    if options.gpus_per_run is not None and options.gpus_per_run < 1:
        error("--gpus-per-run takes a whole number >= 1 (a run with --device cpu asks for no GPU by itself)")
    if options.time is not None and options.time < MIN_TIME_MIN:
        error(f"--time {options.time} is too short: SLURM warns a job {SIGNAL_S} s before its limit, and starting, "
              f"one step and a checkpoint must fit before that; give --time {MIN_TIME_MIN} or more (minutes)")
    if options.time is not None and options.time > 525600:
        error(f"--time {options.time} is more than a year of minutes; give the job's limit in minutes")
    for key in ("partition", "account", "constraint"):
        if getattr(options, key) is not None and not getattr(options, key).strip():
            error(f"--{key} is empty; name one, or leave it out for the cluster's default")
    if options.cpus_per_run is not None and options.cpus_per_run < 1:
        error("--cpus-per-run takes a whole number >= 1")
    keys = []
    for arg in options.slurm_arg or []:
        key = arg.split("=", 1)[0].lstrip("-").replace("_", "-")
        if "=" not in arg or not re.fullmatch(r"[a-z][a-z0-9-]*", key) or not arg.split("=", 1)[1].strip():
            error(f"--slurm-arg takes KEY=VALUE (an sbatch option without its dashes), got {arg!r}")
        if key in OWN:
            error(f"--slurm-arg {arg}: {OWN[key]}")
        if key in keys:
            error(f"--slurm-arg {key} is given twice; give it once")
        keys.append(key)
    if options.launcher == "slurm" and not options.dry_run and not shutil.which("sbatch"):
        error("no sbatch here: this machine is not a SLURM login node; use --launcher slurm-local to try the "
              "jobs locally, or --dry-run to see them")


def check_runs(runs, options, error):
    """The jobs of these runs (engine/sweep.py's Run), before any is submitted: error(message) exits."""
    for run in runs:
        if options.gpus_per_run is not None and run.config["device"] == "cpu":
            error(f"--gpus-per-run would do nothing for a run with --device cpu ({run.name}): its job asks for "
                  f"no GPU; drop one of them")


def job_ids(run):
    """The ids of the jobs submitted for a run, from submitit's files in RUN/slurm/."""
    return sorted({p.name.split("_")[0] for p in (run.dir / "slurm").glob("*_submitted.pkl")})


def active_jobs(runs):
    """{run folder: (job id, state)} of the runs whose job SLURM still holds (queued, running, waiting
    for a requeue, held): one job per run folder, whoever submitted it and whenever."""
    ids = {job: run.dir for run in runs for job in job_ids(run)}
    if not ids:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-u", str(os.getuid())], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        raise SlurmError(f"squeue failed, so the jobs already queued for these runs are unknown: "
                           f"{detail.strip().splitlines()[-1] if detail.strip() else type(e).__name__}") from None
    active = {}
    for line in out.splitlines():
        job, state = line.split()[:2]
        if job in ids and state in ACTIVE:
            active[ids[job]] = (job, state)
    return active


def launch(runs, options, active=None):
    """Submit each unfinished run without a job (engine/sweep.py's Run) -> exit code; slurm-local
    waits for them."""
    import submitit
    import json
    active = active or {}
    todo = []
    for run in runs:
        if run.finished():
            print(f"skip {run.name} (finished)", flush=True)
        elif run.dir in active:
            print(f"skip {run.name} (job {active[run.dir][0]} is {active[run.dir][1]})", flush=True)
        else:
            todo.append(run)
    if options.dry_run:
        for run in todo:
            job = TrainJob(run.name, run.dir, run.args, max(1, gpus(options, run)))
            print(json.dumps({"run": run.name, "folder": str(run.dir / "slurm"), "command": job.command(),
                              "submitit": parameters(options, run)}))
        return 0
    submitted, made = [], []
    for run in todo:
        made += [p for p in (*reversed((run.dir / "slurm").parents), run.dir / "slurm") if not p.exists()][:1]
        executor = submitit.AutoExecutor(folder=run.dir / "slurm", cluster="slurm" if options.launcher == "slurm"
                                         else "local")
        executor.update_parameters(**parameters(options, run))
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr: it is in e
                job = executor.submit(TrainJob(run.name, run.dir, run.args, max(1, gpus(options, run))))
        except Exception as e:  # sbatch's refusal: one line, and this call's jobs and folders undone
            undo(submitted, made)
            lines = [line.strip() for line in str(e).splitlines() if "error" in line.lower()] or [str(e).strip()]
            reason = re.sub(r"^(sbatch: error: )?(Batch job submission failed: )?", "", lines[-1])
            raise SlurmError(f"sbatch refused the job of {run.name} ({reason}); nothing was submitted: check the "
                             f"SLURM options (sinfo lists the partitions)") from None
        print(f"submitted {run.name}: job {job.job_id}, logs in {run.dir / 'slurm'}", flush=True)
        submitted.append((run, job))
    if options.launcher == "slurm-local":
        return wait(submitted, sum(run.finished() for run in runs))
    return 0


class SlurmError(Exception):
    """SLURM refused a job, or could not say which are queued: the sweep's error line."""


def undo(submitted, made):
    """Cancel the jobs of a failed submission and remove the folders it made."""
    for _, job in submitted:
        job.cancel(check=False)
    for path in made:  # each the first folder of its path that this call made
        shutil.rmtree(path, ignore_errors=True)


def wait(submitted, skipped):
    """slurm-local: wait for the jobs and report as the local queue does -> exit code."""
    failed = []
    for run, job in submitted:
        try:
            result = job.result()
        except Exception as e:  # the job's own error, already in its log
            result = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        if not run.finished():
            failed.append(run.name)
            print(f"FAIL  {run.name} ({result})")
    print(f"finished: {len(submitted) - len(failed)} run(s), skipped (already finished): {skipped}, "
          f"failed: {len(failed)}")
    for name in failed:
        print(f"  failed: {name}")
    if failed:
        print("re-run the same command to retry the failed runs (finished ones are skipped)")
    return 1 if failed else 0
