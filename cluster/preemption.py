"""Preemption: SIGTERM to a training job makes every rank stop at the same step, checkpoint there, and exit.

Ray Train runs the training function on a thread of each worker actor, where Python cannot install a signal
handler, and a scheduler's SIGTERM reaches the driver (`kiln pretrain`, a Ray Jobs entrypoint, a SLURM batch
step) rather than the workers. So the request travels through the run's storage: the driver's handler writes
`<out>/STOP` (a file, or an object when `--out` is a URI), rank 0 looks for it after every step (on an object
store at most every few seconds), and the ranks agree with one all-reduce, so all of them leave at the same step
(one rank alone leaving would strand the others in the next gradient all-reduce). The step's checkpoint is written
at that step's end, the point an exact resume continues from. `<out>` is what the driver and rank 0 share on any
cluster (checkpoints and train_summary.json live there too), and a user may create STOP by hand for the same
effect.

A second SIGTERM is not caught: the default action ends the driver at once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from cluster.progress import say

if TYPE_CHECKING:
    from data_pipeline.storage import Location

STOP_FILE = "STOP"
EXIT_PREEMPTED = (
    75  # sysexits' EX_TEMPFAIL: stopped cleanly, run the same command again to continue
)
# How long a scheduler should leave between its SIGTERM and its SIGKILL: the current step plus one checkpoint.
# Ray Jobs waits RAY_JOB_STOP_WAIT_TIME_S (3 s by default) after `ray job stop`; Kiln's heads set this instead,
# and SLURM scripts ask for the signal this long before the time limit.
STOP_GRACE_S = 300


RESUME_HINT = "run the same command with trainer.resume=auto to continue"


class Preempted(Exception):
    """The run stopped early on request and wrote a checkpoint to continue from."""

    def __init__(self, stage: str, step: int, checkpoint: object, hint: str = RESUME_HINT) -> None:
        super().__init__(
            f"[{stage}] preempted: every worker stopped at step {step} and checkpointed to "
            f"{checkpoint}; {hint}"
        )
        self.stage, self.step, self.checkpoint = stage, step, checkpoint


def stop_file(out: str | os.PathLike[str]) -> Location:
    """The stop request of the run whose `--out` is `out` (a path, a URI or a cluster.rundir.RunDir)."""
    from cluster.rundir import (
        out_location,
    )  # pyarrow: not for `kiln --help` (cluster.cli imports us)

    return out_location(out) / STOP_FILE


def clear_stop_request(out: str | os.PathLike[str]) -> None:
    """A STOP left by an earlier, preempted run must not stop the run that resumes it."""
    stop_file(out).delete()


@contextmanager
def stop_on_sigterm(out_dir: str | os.PathLike[str], stage: str) -> Iterator[None]:
    """While inside, the first SIGTERM writes the stop request instead of killing the driver."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return

    def request_stop(signum: int, frame: Any) -> None:
        signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the driver at once
        stop_file(out_dir).write_text(
            f"SIGTERM received by the driver at {time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
        )
        say(
            f"[{stage}] SIGTERM: every worker stops after its current step and checkpoints "
            "(SIGTERM again stops at once, without a checkpoint)"
        )

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
