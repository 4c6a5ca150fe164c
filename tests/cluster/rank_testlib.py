"""Helpers of the tests that run Lightning + Kiln's strategies on CPU ranks without Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class RequestStopAt(Callback):
    """Rank 0 asks for a stop (cluster/preemption.py's STOP file) once step `step` is done."""

    def __init__(self, stop_file: Path, step: int) -> None:
        self.stop_file, self.step = stop_file, step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_rank == 0 and trainer.global_step == self.step:
            self.stop_file.touch()
