"""``AdapterExport``: keep an exported adapter next to the checkpoints (on by default in the CLI)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L

from peftlab.callbacks.last import model_checkpoint
from peftlab.export import export_adapter, trainable_state
from peftlab.strategies import is_sharded


class AdapterExport(L.Callback):
    """Export the adapter at every checkpoint save (``<dir>/last``) and whenever the checkpoint callback finds a
    new best (``<dir>/best``), plus the final state at the end of fit.

    Checkpoints (``.ckpt``) are for resuming: trainable parameters plus optimizer, scheduler and loop state.
    Exported adapters are for use: see :mod:`peftlab.export` for their format. The best adapter is written at
    the moment ``ModelCheckpoint`` saves a new best by its ``monitor`` (it updates ``best_model_path`` just
    before saving), from the weights in memory, so nothing has to be read back from a checkpoint (which under
    a sharding strategy is a directory of shards). Under FSDP2 only the trainable parameters are gathered.

    Args:
        enabled: export at all.
        dirpath: where to write; default ``<run dir>/adapter``.
    """

    def __init__(self, enabled: bool = True, dirpath: str | None = None):
        self.enabled = enabled
        self.dirpath = dirpath
        self._exported_step = -1
        self._best_path = ""  # the checkpoint callback's best_model_path when "best" was last exported

    def _export(self, trainer, module, names: list[str], metrics=None):
        # every rank runs this hook: trainer.log_dir and a sharded model's gathering are collectives; only
        # rank 0 reads the config and writes
        log_dir = trainer.log_dir
        directory = Path(self.dirpath or os.path.join(log_dir or trainer.default_root_dir, "adapter"))
        if not hasattr(module, "trainable_count") or module.model is None:
            return
        state = trainable_state(module) if is_sharded(module) else None
        if not trainer.is_global_zero:
            return
        config = os.path.join(log_dir or "", "config.yaml")
        config_yaml = Path(config).read_text(encoding="utf-8") if log_dir and os.path.isfile(config) else None
        labels = getattr(trainer.datamodule, "label_names", None) if trainer.datamodule is not None else None
        for name in names:
            export_adapter(module, directory / name, config_yaml=config_yaml,
                           metrics=metrics if name == "best" else None, label_names=labels, state=state)

    def _best_metrics(self, trainer) -> dict:
        cb = model_checkpoint(trainer)
        score = getattr(cb, "best_model_score", None)
        return {cb.monitor: float(score)} if getattr(cb, "monitor", None) and score is not None else {}

    def setup(self, trainer, pl_module, stage):
        # after a resume the checkpoint callback's best is an earlier save's: not the weights now in memory
        self._best_path = self._best_path or getattr(model_checkpoint(trainer), "best_model_path", "") or ""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # called once per checkpoint file; export once per step
        if not self.enabled:
            return
        names = []
        if trainer.global_step != self._exported_step:  # once per step, whichever checkpoint is saved first
            self._exported_step = trainer.global_step
            names.append("last")
        best = getattr(model_checkpoint(trainer), "best_model_path", "") or ""
        if best and best != self._best_path:  # ModelCheckpoint is saving a new best right now
            self._best_path = best
            names.append("best")
        if names:
            self._export(trainer, pl_module, names, self._best_metrics(trainer))

    def on_fit_end(self, trainer, pl_module):
        if self.enabled and trainer.global_step != self._exported_step:
            self._exported_step = trainer.global_step
            self._export(trainer, pl_module, ["last"])

    def state_dict(self) -> dict:
        return {"best_path": self._best_path}

    def load_state_dict(self, state_dict: dict) -> None:
        self._best_path = state_dict.get("best_path", "")
