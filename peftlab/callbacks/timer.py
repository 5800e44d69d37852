"""``EpochTimer``: log the wall time of each training epoch (``time/train_epoch_s``)."""

from __future__ import annotations

import time

import lightning as L


class EpochTimer(L.Callback):
    """Logs ``time/train_epoch_s`` (training only, validation excluded) at the end of every training epoch."""

    def __init__(self):
        self._start = 0.0
        self._val = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._start, self._val = time.perf_counter(), 0.0

    def on_validation_start(self, trainer, pl_module):
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if trainer.training or trainer.state.fn == "fit":
            self._val += time.perf_counter() - getattr(self, "_val_start", time.perf_counter())

    def on_train_epoch_end(self, trainer, pl_module):
        pl_module.log("time/train_epoch_s", time.perf_counter() - self._start - self._val)
