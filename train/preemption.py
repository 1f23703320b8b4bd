"""Stopping on a scheduler's signal: finish the step, checkpoint, exit to be requeued.

Slurm sends SIGUSR1 some time before a job's time limit (`--signal`), and SIGTERM when it
preempts a job; torchrun passes either on to its workers (`--signals-to-handle`). The
handler only records the signal: the step in flight finishes, the ranks agree at the step's
end (one rank may be signalled before another; the host reads that vote a step late,
train/outcomes.py, so the next step runs too), the trainer writes a checkpoint and the
process exits with REQUEUE_EXIT. A rerun with `checkpoint.resume: auto` continues from it.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

# EX_TEMPFAIL of sysexits.h: "try again later". The Slurm script requeues the job on it.
REQUEUE_EXIT = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """While entered, SIGUSR1 and SIGTERM ask the trainer to stop at the next step boundary
    instead of killing the process. Earlier handlers come back on exit."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # else Python refuses
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:  # the first one names the stop; repeats change nothing
            self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
