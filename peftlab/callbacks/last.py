"""``LastCheckpoint``: ``last.ckpt`` is always the newest training state (on by default in the CLI).

Lightning's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only in a step where a top-k checkpoint was
also written (Lightning 2.6, ``ModelCheckpoint.on_validation_end``): with a ``monitor``, ``last.ckpt`` is the
last *improvement*, and ``--ckpt_path last`` after a crash silently drops everything since. This callback keeps
the two jobs apart: ``ModelCheckpoint`` selects the best k, ``LastCheckpoint`` saves the newest state

* at the end of every validation during fit (``val_check_interval`` or epoch end),
* at the end of every training epoch and of training,
* every ``every_n_train_steps`` optimizer steps and every ``train_time_interval`` seconds, for long runs,

always at an optimizer-step boundary (a validation in the middle of a gradient-accumulation window defers the
save to the window's end: the partial gradients are not part of a checkpoint), so that resuming from it
continues exactly where the run stopped (docs/reliability.md).
"""

from __future__ import annotations

import os
import time

from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint


class LastCheckpoint(Checkpoint):
    """Keep ``last.ckpt`` the newest training state, apart from best-k selection (see the module docstring).

    Args:
        enabled: save ``last.ckpt`` at all.
        every_n_train_steps: also save every N optimizer steps (0: only at validation and epoch ends).
        train_time_interval: also save when this many seconds of training passed since the last save (0: off).
        dirpath: directory of ``last.ckpt``; default ``<run dir>/checkpoints``.
    """

    FILENAME = "last.ckpt"

    def __init__(self, enabled: bool = True, every_n_train_steps: int = 0, train_time_interval: float = 0.0,
                 dirpath: str | None = None):
        if every_n_train_steps < 0 or train_time_interval < 0:
            from peftlab.errors import PeftLabError

            raise PeftLabError("last_checkpoint.every_n_train_steps and .train_time_interval must be >= 0")
        self.enabled = enabled
        self.every_n_train_steps = every_n_train_steps
        self.train_time_interval = train_time_interval
        self.dirpath = dirpath
        self.last_model_path = ""
        self._saved_step = -1
        self._pending = False
        self._last_time = time.monotonic()

    # ------------------------------------------------------------------ where
    def _path(self, trainer) -> str:
        # trainer.log_dir is a collective under a distributed strategy: every rank asks (these hooks run on all)
        directory = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        return os.path.join(directory, self.FILENAME)

    def setup(self, trainer, pl_module, stage):
        if not self.enabled or stage != "fit":
            return
        for callback in trainer.checkpoint_callbacks:
            # ModelCheckpoint(save_last=True) would overwrite last.ckpt with its last improvement: this callback owns it
            if isinstance(callback, ModelCheckpoint) and callback.save_last:
                callback.save_last = False
                if trainer.is_global_zero:
                    print("[peftlab] last.ckpt is written by peftlab's LastCheckpoint (the newest state, not the last "
                          "improvement); ModelCheckpoint(save_last) is turned off")

    # ------------------------------------------------------------------ when
    def _at_step_boundary(self, trainer, batch_idx: int) -> bool:
        accumulate = trainer.accumulate_grad_batches
        return (batch_idx + 1) % accumulate == 0 or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch

    def _save(self, trainer) -> None:
        if trainer.global_step == self._saved_step or trainer.sanity_checking:
            return
        path = self._path(trainer)
        self.last_model_path = path
        self._saved_step = trainer.global_step  # part of this callback's state, so set before saving
        self._last_time = time.monotonic()
        self._pending = False
        trainer.save_checkpoint(path, weights_only=False)  # the full state: a resume needs the optimizer

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.enabled or not self._at_step_boundary(trainer, batch_idx):
            return
        due_steps = self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0
        due_time = self.train_time_interval and time.monotonic() - self._last_time >= self.train_time_interval
        if self.train_time_interval and trainer.world_size > 1:  # every rank must agree to save (a collective)
            due_time = trainer.strategy.reduce_boolean_decision(bool(due_time), all=False)
        if self._pending or due_steps or due_time:
            self._save(trainer)

    def on_validation_end(self, trainer, pl_module):
        if not self.enabled or trainer.sanity_checking or trainer.state.fn != "fit":  # validation inside fit only
            return
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if progress.is_last_batch:
            # the epoch's last validation: save in on_train_epoch_end instead, after ModelCheckpoint's epoch-end
            # save (it saves there when validation runs once per epoch); a checkpoint taken before the epoch-end
            # hooks would make a resumed run replay them, and ModelCheckpoint would then save a second time
            return
        if self._at_step_boundary(trainer, progress.current.completed - 1):
            self._save(trainer)
        else:
            self._pending = True  # mid accumulation window: save at its end

    def on_train_epoch_end(self, trainer, pl_module):
        if self.enabled:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module):
        if self.enabled:
            self._save(trainer)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"last_model_path": self.last_model_path, "saved_step": self._saved_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_model_path = state_dict.get("last_model_path", "")
        self._saved_step = state_dict.get("saved_step", -1)


def model_checkpoint(trainer) -> ModelCheckpoint | None:
    """The trainer's first ``ModelCheckpoint`` (best-k selection), or None. ``trainer.checkpoint_callback`` would
    be any ``Checkpoint``, :class:`LastCheckpoint` included."""
    return next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
