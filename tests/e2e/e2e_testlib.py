"""Helpers the e2e tests share."""

from __future__ import annotations

import re
import signal
import subprocess

# Lines of Ray's and W&B's internals seen on the console of a run before issue 13: a run whose output is not a
# terminal prints none of them (they go to <out>/logs/ray.log), nor escape codes.
CONSOLE_NOISE = (
    "\x1b[",
    "PlacementGroupCleaner",
    "core_worker",
    "RayTrainWorker pid=",
    "TrainController pid=",
    "wandb: WARNING",
    "Token authentication",
    "token authentication",
    "Started a local Ray instance",
    "GPU available",
)

# A run whose console the tests read: 4 steps on 2 workers, logged and validated every 2, no checkpoint but the last
CONSOLE_RUN = (
    "trainer.max_steps=4",
    "cluster.num_workers=2",
    "trainer.batch_size=8",
    "trainer.log_every=2",
    "trainer.val_every=2",
    "trainer.limit_val_batches=1",
    "trainer.checkpoint_every=0",
)


def sigterm_after_step(proc: subprocess.Popen, step: int, lines: list[str]) -> None:
    """Reads the run's output; SIGTERMs the driver (only it, as a scheduler or `ray job stop`
    would) once a progress line shows `step` done."""
    sent = False
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        done = re.search(r"\] step (\d+)/", line)
        if not sent and done and int(done.group(1)) >= step:
            proc.send_signal(signal.SIGTERM)
            sent = True
