"""The progress bar of ``peftlab`` runs: Lightning's, without the logger version column.

Lightning shows ``v_num`` (the logger's version number) beside the metrics, rendered by the rich bar as
``v_num: 0.000``; the run directory, which peftlab prints at the end of fit, already names the version.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


class _WithoutVersion:
    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class PeftRichProgressBar(_WithoutVersion, RichProgressBar):
    """``RichProgressBar`` without ``v_num``."""


class PeftTQDMProgressBar(_WithoutVersion, TQDMProgressBar):
    """``TQDMProgressBar`` without ``v_num``."""


def replace_default_progress_bar(trainer) -> None:
    """Swap the progress bar Lightning added by default (not one the user configured) for peftlab's."""
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) is RichProgressBar:
            trainer.callbacks[i] = PeftRichProgressBar()
        elif type(callback) is TQDMProgressBar:
            trainer.callbacks[i] = PeftTQDMProgressBar()
