"""Stopping a run cleanly: a cluster's preemption signal, Ctrl-C, a closed terminal, a checkpoint
that is due, or a model that is no longer finite.

SLURM sends SIGTERM (or the signal of `--signal`, often SIGUSR1; submitit uses SIGUSR2) some seconds
before it kills a preempted or timed-out job; a closing SSH session sends SIGHUP; Ctrl-\\ SIGQUIT; a
CPU-time limit SIGXCPU. The first of any such signal (STOP_SIGNALS) sets a flag and says at once what
it waits for: the training loop finishes the step in flight, writes a checkpoint of that exact step
and exits with STOPPED (SIGINT: INTERRUPTED, as a shell expects after Ctrl-C). A second SIGINT ends the process at once; the last
checkpoint on disk stays intact, it is written atomically.

"At once" even inside a minutes-long step: Python runs signal handlers only between bytecodes, and a
backward pass of a WideResNet on a CPU is one call into torch. So the signals are also written to a
pipe (signal.set_wakeup_fd, by the C-level handler, one byte per signal) that a watcher thread reads:
it answers the first and ends the process on a second Ctrl-C, whatever the main thread is doing.

Under torchrun the ranks must stop (and checkpoint) at the same step: they agree once per step
through a small all-reduce on the CPU (a gloo group), which never waits for the GPU."""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

# Every signal another process (a terminal, a scheduler, kill, a CPU-time limit) may send whose default
# would end the process with the step in flight lost: all that end it by default and can be caught, but
# the faults a process raises on itself (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS, SIGABRT) and
# SIGPIPE (which Python ignores). SIGKILL cannot be caught; SIGSTOP and SIGTSTP only pause.
STOP_SIGNALS = tuple(sorted({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                             signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGXCPU,
                             signal.SIGXFSZ, signal.SIGIO, signal.SIGPWR, signal.SIGSTKFLT,
                             *range(signal.SIGRTMIN, signal.SIGRTMAX + 1)}))
STOPPED = 75       # EX_TEMPFAIL: stopped by a signal after checkpointing; `--resume` continues the run
INTERRUPTED = 130  # Ctrl-C (SIGINT), likewise checkpointed


def signal_name(signum):
    """SIGTERM, ..., and SIGRTMIN+3 for the real-time signals between SIGRTMIN and SIGRTMAX."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"


def exit_code(signum):
    return INTERRUPTED if signum == signal.SIGINT else STOPPED


def ignore_stop_signals(_worker_id=None):
    """For DataLoader workers: the main process decides when to stop (a terminal's Ctrl-C and
    SLURM's signals reach every process of the job)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class StoppedStarting(BaseException):
    """A stop signal while the run was starting: nothing was written but the lock, so it stops at once.
    A BaseException, as KeyboardInterrupt: no `except Exception` on the way may take it for an error."""

    def __init__(self, signum):
        super().__init__(signal_name(signum))
        self.signum = signum


class Stopper:
    """Within `with Stopper()`: a stop signal while starting raises StoppedStarting at once; once
    `training(...)` is called, the stop signals set `signum` and `poll()` says, once per step and the
    same on every rank, whether to stop now and whether a time-based checkpoint is due."""

    def __init__(self):
        self.signum, self.every_s, self.control, self.starting = None, 0.0, None, True
        self.last_save = self.last_poll = time.monotonic()
        self.step_s = None  # how long the last step took (between two polls)
        self.interrupted = None  # -> the line a second Ctrl-C prints as it ends the process
        self.saved_step = None  # the step last.pt holds, once known
        self._previous, self._seen, self._answered = {}, [], threading.Event()

    def training(self, every_min=0.0, control=None, interrupted=None):
        """From here on a signal stops the run after the step in flight, which is checkpointed."""
        self.every_s, self.control, self.interrupted, self.starting = 60 * every_min, control, interrupted, False
        self.last_save = self.last_poll = time.monotonic()
        return self

    def __enter__(self):
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        read, self._wakeup = os.pipe()
        os.set_blocking(self._wakeup, False)
        self._previous_fd = signal.set_wakeup_fd(self._wakeup, warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, args=(read,), daemon=True, name="stop-signals")
        self._watcher.start()
        return self

    def __exit__(self, *exc):
        signal.set_wakeup_fd(self._previous_fd)
        os.write(self._wakeup, b"\0")  # no signal's number: the watcher ends (a forked worker may hold the pipe)
        self._watcher.join()
        os.close(self._wakeup)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def _handle(self, signum, frame):  # in the main thread, between two bytecodes
        if self.starting:
            self._answered.set()
            raise StoppedStarting(signum)
        if self.signum is None:
            self.signum = signum

    def _watch(self, read):  # in the watcher thread, as the signal arrives
        with os.fdopen(read, "rb", buffering=0) as pipe:
            while (byte := pipe.read(1)) not in (b"", b"\0"):
                if byte[0] not in STOP_SIGNALS:
                    continue
                if self.starting:
                    self._starting(byte[0])
                else:
                    self._arrived(byte[0])

    def _starting(self, signum):
        """While starting the main thread answers (StoppedStarting) as soon as it runs Python again; when it
        waits in one long call (torchrun peers that never come, a measurement), the process ends from here."""
        if not self._answered.wait(2) and self.starting:
            say(f"\n{StoppedStarting(signum)} while starting: stopped before the first step; nothing was written")
            os._exit(exit_code(signum))

    def _arrived(self, signum):
        self._seen.append(signum)
        main = os.environ.get("RANK", "0") == "0"
        if len(self._seen) > 1 and signum == signal.SIGINT:  # a second Ctrl-C: now, the step in flight lost
            if main:
                say(self.interrupted() if self.interrupted else "\ninterrupted by Ctrl-C: stopped at once")
            os._exit(INTERRUPTED)
        if len(self._seen) == 1 and main:
            pace = f"a step takes about {self.step_s:.1f} s here" if self.step_s else "no step has ended yet"
            say(f"\n{signal_name(signum)}: stopping after the step in flight ({pace}), which is then checkpointed"
                + ("; press Ctrl-C again to stop now without it" if signum == signal.SIGINT else ""))

    def saved(self, step):
        self.last_save, self.saved_step = time.monotonic(), step

    def poll(self, after_step=True):
        """-> (stop, checkpoint due), agreed by all ranks: any rank's signal stops them all; rank 0's
        clock decides when a time-based checkpoint is due. After a step: how long it took, for the
        line that answers a signal."""
        now = time.monotonic()
        self.step_s, self.last_poll = (now - self.last_poll) if after_step else self.step_s, now
        stop = self.signum is not None
        due = bool(self.every_s) and time.monotonic() - self.last_save >= self.every_s
        if self.control is None:
            return stop, due
        flags = torch.tensor([int(stop), int(due and torch.distributed.get_rank() == 0),
                              self.signum or 0], dtype=torch.int64)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self.control)
        if flags[0] and self.signum is None:
            self.signum = int(flags[2])  # another rank's signal: stop with its exit code
        return bool(flags[0]), bool(flags[1])


def say(line):
    """A line on stderr that cannot fail: after SIGHUP the terminal may be gone."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def stopped(run, tracker, stopper):
    """A signal stopped the run; its last step is checkpointed. One line, and the documented exit code."""
    name = signal_name(stopper.signum)
    if run.dist.main:
        if (run.dir / "last.pt").is_file():
            say(f"stopped by {name} after step {run.step} ({position(run)}); {run.dir / 'last.pt'} holds that step. "
                f"Continue with: python train.py --resume {run.dir}")
        else:
            say(f"stopped by {name} before the first step; nothing to checkpoint. Start it with the same command again")
        tracker.finish(exit_code=exit_code(stopper.signum))
    if run.dist.enabled:
        torch.distributed.destroy_process_group()
    return exit_code(stopper.signum)


def position(run):
    """Where a run stands, as the stop and resume lines say it: "epoch 2, batch 3 of 6" or "the end of epoch 1"."""
    return f"epoch {run.epoch + 1}, batch {run.batch} of {len(run.train_loader)}" if run.batch else \
        f"the end of epoch {run.epoch}"


def stop_if_not_finite(run, first_bad, tracker):
    bad = first_bad.clone()
    if run.dist.enabled:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if int(bad) >= 0:
        stop(run, f"the training loss became non-finite at step {int(bad)}; {saved_note(run)}. {fix_hint(run)}",
             tracker)


def stop(run, message, tracker):
    if run.dist.main:
        from engine.config import printable  # here: engine.config imports data.loaders, which imports this module
        print(f"error: {printable(message)}", file=sys.stderr)
        if tracker:
            tracker.finish(exit_code=1)
    sys.exit(1)


def saved_note(run, step=None):
    if not (run.dir / "last.pt").is_file():
        return "no step was checkpointed, so nothing was saved"
    if step is None:
        return f"the last good checkpoint {run.dir / 'last.pt'} is intact"
    lost = (f" (steps {step + 1}-{run.step} are lost)" if run.step > step + 1 else
            f" (step {run.step} is lost)" if run.step > step else "")
    return f"the last good checkpoint {run.dir / 'last.pt'} is intact and holds step {step}{lost}"


def fix_hint(run):
    fixes = "lower --lr or --rho" + (", or use --precision fp32" if run.runtime.precision != "fp32" else "")
    return f"To fix: {fixes}, and start a new run"


def entry(main, *args):
    """How every tool runs and ends (`sys.exit(entry(main))`): the folders the environment names for its
    files checked first ($WANDB_DIR, $TMPDIR); then what main returns; Ctrl-C in one line, exit 130
    (the tools write their files at the end or atomically, so nothing half-written is left behind);
    and any exception no check turned into an `error:` line, which is a bug, in one line naming the
    file that holds its traceback, exit 1. Bad input never gets here: each tool refuses it first."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # imports done (a tool's main set SIG_DFL for them)
    try:
        from analysis.figures import OutputError, check_environment_places
        try:
            check_environment_places()
        except OutputError as e:
            from engine.config import refuse
            return refuse(e)
        return main(*args)
    except KeyboardInterrupt:
        say("\ninterrupted by Ctrl-C: stopped at once; nothing more was written")
        return INTERRUPTED
    except BrokenPipeError:  # `tool | head`: the reader has gone, so has the need to print
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (Python's flush at exit must not raise again)
        return 0
    except Exception as e:
        from engine.config import printable
        first = (str(e).splitlines() or ["-"])[0][:200]
        say(f"bug: {Path(sys.argv[0]).name} failed ({type(e).__name__}: "
            f"{printable(first)}) where no check expected it; the traceback "
            f"is saved in {bug_report(e)}: please report it with that file")
        return 1


def bug_report(e):
    """The traceback of an unexpected exception, with the command and versions, in a new file in the
    system's temporary folder (never in a run's folder) -> its path."""
    import platform
    import tempfile
    import traceback
    text = (f"command: {' '.join(sys.argv)}\npython {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.platform()}\n\n" + "".join(traceback.format_exception(e)))
    try:
        fd, path = tempfile.mkstemp(prefix=f"sam-bug-{Path(sys.argv[0]).stem}-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path
    except OSError:  # no writable temporary folder: the traceback goes to stderr after all
        say(text)
        return "(nowhere: no writable temporary folder; it is printed above)"
