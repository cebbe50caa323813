"""Stopping a run cleanly: a cluster's preemption signal, Ctrl-C, or a checkpoint that is due.

SLURM sends SIGTERM (or the signal of `--signal`, often SIGUSR1; submitit uses SIGUSR2) some seconds
before it kills a preempted or timed-out job. The first SIGTERM, SIGUSR1, SIGUSR2 or SIGINT only
sets a flag: the training loop finishes the step in flight, writes a checkpoint of that exact step
and exits with STOPPED (SIGINT: INTERRUPTED, as a shell expects after Ctrl-C). A second SIGINT raises
KeyboardInterrupt at once; the last checkpoint on disk stays intact, it is written atomically.

Under torchrun the ranks must stop (and checkpoint) at the same step: they agree once per step
through a small all-reduce on the CPU (a gloo group), which never waits for the GPU."""

import signal
import time

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
STOPPED = 75       # EX_TEMPFAIL: stopped by a signal after checkpointing; `--resume` continues the run
INTERRUPTED = 130  # Ctrl-C (SIGINT), likewise checkpointed


def exit_code(signum):
    return INTERRUPTED if signum == signal.SIGINT else STOPPED


def ignore_stop_signals(_worker_id=None):
    """For DataLoader workers: the main process decides when to stop (a terminal's Ctrl-C and
    SLURM's signals reach every process of the job)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class Stopper:
    """Within `with Stopper(...)`: the stop signals set `signum`; `poll()` says, once per step and the
    same on every rank, whether to stop now and whether a time-based checkpoint is due."""

    def __init__(self, every_min=0.0, control=None):
        self.signum, self.every_s, self.control = None, 60 * every_min, control
        self.last_save = time.monotonic()
        self._previous = {}

    def __enter__(self):
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum

    def saved(self):
        self.last_save = time.monotonic()

    def poll(self):
        """-> (stop, checkpoint due), agreed by all ranks: any rank's signal stops them all; rank 0's
        clock decides when a time-based checkpoint is due."""
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
