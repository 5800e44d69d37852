"""The progress display of ``peftlab`` runs: Lightning's bar in a terminal, plain lines in a log.

Lightning shows ``v_num`` (the logger's version number) beside the metrics, rendered by the rich bar as
``v_num: 0.000``; the run directory, which peftlab prints at the end of fit, already names the version.
A bar redraws one line in place, which a log file (nohup, SLURM, CI) receives as nothing until the run ends
(rich) or as thousands of carriage returns (tqdm): with stdout not a terminal, :class:`PlainProgress` prints a
line every few steps or seconds instead.
"""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar


class _WithoutVersion:
    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class PeftRichProgressBar(_WithoutVersion, RichProgressBar):
    """``RichProgressBar`` without ``v_num``."""


class PeftTQDMProgressBar(_WithoutVersion, TQDMProgressBar):
    """``TQDMProgressBar`` without ``v_num``."""


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class PlainProgress(_WithoutVersion, ProgressBar):
    """One plain line of training progress every ``every_n_steps`` optimizer steps or ``every_seconds`` seconds,
    whichever comes first, and on the last step; plus a line per validation with its metrics::

        [peftlab] step 40/536 (7%)  epoch 1/2  train/loss 0.6812  2.41 steps/s  ETA 3m26s

    Args:
        every_n_steps: print every this many optimizer steps (0: about every 5% of the run, at least every step).
        every_seconds: print at least this often, in seconds (0: only by steps).
    """

    def __init__(self, every_n_steps: int = 0, every_seconds: float = 30.0):
        super().__init__()
        self.every_n_steps = every_n_steps
        self.every_seconds = every_seconds
        self._enabled = True
        self._started = self._last_time = 0.0
        self._last_step = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer, pl_module):
        self._started = self._last_time = time.monotonic()
        self._first_step = trainer.global_step  # a resumed run counts its rate from here

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not self._enabled or not trainer.is_global_zero or step == self._last_step or step == 0:
            return
        total = trainer.estimated_stepping_batches  # inf when neither max_steps nor max_epochs bounds it
        every = self.every_n_steps or max(1, int(total // 20) if total != float("inf") else 50)
        now = time.monotonic()
        due = step % every == 0 or step >= total or (self.every_seconds and now - self._last_time >= self.every_seconds)
        if not due:
            return
        self._last_step, self._last_time = step, now
        rate = (step - self._first_step) / max(now - self._started, 1e-9)
        parts = [f"step {step}/{int(total)} ({100 * step / total:.0f}%)" if total != float("inf") else f"step {step}"]
        if trainer.max_epochs not in (None, -1):
            parts.append(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")
        else:
            parts.append(f"epoch {trainer.current_epoch + 1}")
        parts += [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                  for k, v in self.get_metrics(trainer, pl_module).items() if k.startswith("train")]
        parts.append(f"{rate:.2f} steps/s" if rate >= 1 else f"{1 / rate:.1f} s/step" if rate > 0 else "")
        if total != float("inf") and rate > 0:
            parts.append(f"ETA {_duration((total - step) / rate)}")
        print("[peftlab] " + "  ".join(p for p in parts if p), flush=True)

    def on_validation_end(self, trainer, pl_module):
        if not self._enabled or not trainer.is_global_zero or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        if metrics:
            shown = "  ".join(f"{k} {float(v):.4f}" for k, v in sorted(metrics.items()))
            print(f"[peftlab] validation at step {trainer.global_step}: {shown}", flush=True)


def replace_default_progress_bar(trainer, stream=None) -> None:
    """Swap the progress bar Lightning added by default (not one the user configured) for peftlab's: the bar
    without ``v_num`` in a terminal, :class:`PlainProgress` lines when ``stream`` (stdout) is not one."""
    stream = sys.stdout if stream is None else stream
    terminal = hasattr(stream, "isatty") and stream.isatty()
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) in (RichProgressBar, TQDMProgressBar) and not terminal:
            trainer.callbacks[i] = PlainProgress()
        elif type(callback) is RichProgressBar:
            trainer.callbacks[i] = PeftRichProgressBar()
        elif type(callback) is TQDMProgressBar:
            trainer.callbacks[i] = PeftTQDMProgressBar()
