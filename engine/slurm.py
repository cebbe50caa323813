"""The sweeps' SLURM launcher (engine/sweep.py --launcher slurm), through submitit: one job per run;
`--launcher slurm-local` runs the same jobs through submitit's local executor (the same code path
minus sbatch, for a laptop or a test).

Each attempt of a job runs train.py in a child process (under torchrun with --gpus-per-run > 1),
continuing the run from its checkpoint when there is one; a finished run is left alone. Before a
preempted or timed-out job is killed, SLURM signals it (submitit asks for SIGUSR2 90 s before the
time limit; preemption sends SIGTERM): train.py checkpoints the step in flight and exits, and
submitit requeues the job, whose next attempt resumes from that step. Logs: <run>/slurm/."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import submitit

from engine.stopping import INTERRUPTED, STOPPED

REPO = Path(__file__).resolve().parents[1]
MAX_TIMEOUTS = 100  # requeues after a time-out (preemptions are not counted): a 200-epoch run on 4-hour slots
STOP_WAIT_S = 80    # how long a stopping train.py may take to checkpoint (submitit's signal comes 90 s early)


class TrainJob(submitit.helpers.Checkpointable):
    """One run as a submitit job: `python train.py ARGS [--resume]`, resumed on every attempt."""

    def __init__(self, name, run_dir, args, gpus=1):
        self.name, self.run_dir, self.args, self.gpus = name, str(run_dir), list(args), gpus
        self.proc = self.waiter = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("proc", "waiter")}

    def __setstate__(self, state):
        self.__dict__.update(state, proc=None, waiter=None)

    def command(self):
        resume = ["--resume"] if (Path(self.run_dir) / "last.pt").is_file() else []
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.gpus}"] \
            if self.gpus > 1 else [sys.executable]
        return [*launcher, "train.py", *self.args, *resume]

    def __call__(self):
        if (Path(self.run_dir) / "results.json").is_file():
            return f"{self.name}: finished"
        command = self.command()
        print(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command)}", flush=True)
        # torchrun's agent dies of SIGUSR1/2; ignored there, they still reach train.py (which handles them)
        self.proc = subprocess.Popen(command, cwd=REPO, preexec_fn=_ignore_user_signals if self.gpus > 1 else None)
        self.waiter = threading.Thread(target=self.proc.wait, daemon=True)
        self.waiter.start()
        while self.waiter.is_alive():  # joined in slices: submitit's signal handler runs in between
            self.waiter.join(1.0)
        code = self.proc.returncode
        if code == 0:
            return f"{self.name}: finished"
        if code in (STOPPED, INTERRUPTED):  # a signal (SLURM's SIGTERM): the step is checkpointed; requeue
            print(f"train.py stopped by a signal (exit {code}); requeueing", flush=True)
            os.kill(os.getpid(), getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG))  # submitit's own path
            time.sleep(STOP_WAIT_S)
        raise RuntimeError(f"train.py exited with code {code}; see the log in {Path(self.run_dir) / 'slurm'}")

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on its signal (preemption or time-out): train.py checkpoints the step
        in flight and exits, then the job is requeued with a fresh TrainJob (which resumes)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            self.waiter.join(STOP_WAIT_S)
        return submitit.helpers.DelayedSubmission(TrainJob(self.name, self.run_dir, self.args, self.gpus))


def _ignore_user_signals():
    for signum in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


def parameters(options, name):
    """submitit's parameters of one job (AutoExecutor names: generic, or slurm_ for SLURM only)."""
    params = {"name": name, "timeout_min": options.time or 1440, "gpus_per_node": options.gpus_per_run or 1,
              "nodes": 1, "tasks_per_node": 1}
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
    if (options.gpus_per_run is not None and options.gpus_per_run < 1) or (options.time is not None and options.time < 1):
        error("--gpus-per-run and --time take whole numbers >= 1")
    if options.cpus_per_run is not None and options.cpus_per_run < 1:
        error("--cpus-per-run takes a whole number >= 1")
    bad = [arg for arg in options.slurm_arg or [] if "=" not in arg or not arg.split("=", 1)[0]]
    if bad:
        error(f"--slurm-arg takes KEY=VALUE (an sbatch option without its dashes), got {bad[0]!r}")
    if options.launcher == "slurm" and not options.dry_run and not shutil.which("sbatch"):
        error("no sbatch here: this machine is not a SLURM login node; use --launcher slurm-local to try the "
              "jobs locally, or --dry-run to see them")


def launch(runs, options):
    """Submit each unfinished run (engine/sweep.py's Run) -> exit code; slurm-local waits for them."""
    skipped = sum(run.finished() for run in runs)
    submitted = submit([(run.name, run.args) for run in runs], options)
    if options.launcher == "slurm-local" and not options.dry_run:
        return wait(submitted, skipped)
    return 0


def submit(runs, options):
    """Submit each unfinished run of [(name, train.py args)] -> [(name, job)]; prints what it does."""
    cluster = "slurm" if options.launcher == "slurm" else "local"
    submitted = []
    for name, args in runs:
        run_dir = Path(options.out_dir) / name
        if (run_dir / "results.json").is_file():
            print(f"skip {name} (finished)", flush=True)
            continue
        job_fn = TrainJob(name, run_dir, args, options.gpus_per_run or 1)
        if options.dry_run:
            print(json.dumps({"run": name, "folder": str(run_dir / "slurm"), "command": job_fn.command(),
                              "submitit": parameters(options, name)}))
            continue
        executor = submitit.AutoExecutor(folder=run_dir / "slurm", cluster=cluster,
                                         slurm_max_num_timeout=MAX_TIMEOUTS)
        executor.update_parameters(**parameters(options, name))
        job = executor.submit(job_fn)
        print(f"submitted {name}: job {job.job_id}, logs in {run_dir / 'slurm'}", flush=True)
        submitted.append((name, job))
    return submitted


def wait(submitted, skipped):
    """slurm-local: wait for the jobs and report as the local queue does -> exit code."""
    failed = []
    for name, job in submitted:
        try:
            job.result()
        except Exception as e:  # the job's own error, already in its log
            failed.append(name)
            print(f"FAIL  {name} ({str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__})")
    print(f"finished: {len(submitted) - len(failed)} run(s), skipped (already finished): {skipped}, "
          f"failed: {len(failed)}")
    for name in failed:
        print(f"  failed: {name}")
    if failed:
        print("re-run the same command to retry the failed runs (finished ones are skipped)")
    return 1 if failed else 0
