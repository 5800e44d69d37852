"""A run shorter than ``trainer.log_every_n_steps`` still logs its training loss."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class ShortRunLogging(Callback):
    """Lower ``log_every_n_steps`` to the run's step budget when the run is shorter than it: Lightning logs on
    the steps that are multiples of the interval only, so 4 steps with an interval of 20 would log no loss."""

    def on_train_start(self, trainer, pl_module):
        total = trainer.estimated_stepping_batches
        if total != float("inf") and 0 < total < trainer.log_every_n_steps:
            trainer.log_every_n_steps = max(1, int(total))
