"""``AdapterExport``: keep an exported adapter next to the checkpoints (on by default in the CLI)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import lightning as L
import torch

from peftlab.export import export_adapter


class AdapterExport(L.Callback):
    """Export the adapter on every checkpoint save (``<dir>/last``) and, at the end of fit, the best one.

    Checkpoints (``.ckpt``) are for resuming: trainable parameters plus optimizer, scheduler and loop state.
    Exported adapters are for use: see :mod:`peftlab.export` for their format. The best adapter is the
    checkpoint callback's best by its ``monitor`` (top-k is ModelCheckpoint's ``save_top_k``).

    Args:
        enabled: export at all.
        dirpath: where to write; default ``<run dir>/adapter``.
    """

    def __init__(self, enabled: bool = True, dirpath: str | None = None):
        self.enabled = enabled
        self.dirpath = dirpath
        self._exported_step = -1

    def _export(self, trainer, module, name, metrics=None):
        # every rank runs this hook and must ask for trainer.log_dir (a collective under a distributed
        # strategy), once; only rank 0 reads the config and writes
        log_dir = trainer.log_dir
        directory = Path(self.dirpath or os.path.join(log_dir or trainer.default_root_dir, "adapter"))
        with full_parameters(trainer):
            if trainer.is_global_zero and hasattr(module, "trainable_count"):
                config = os.path.join(log_dir or "", "config.yaml")
                config_yaml = Path(config).read_text(encoding="utf-8") if log_dir and os.path.isfile(config) else None
                labels = getattr(trainer.datamodule, "label_names", None) if trainer.datamodule is not None else None
                export_adapter(module, directory / name, config_yaml=config_yaml, metrics=metrics,
                               label_names=labels)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # called once per checkpoint file; export once per step
        if self.enabled and trainer.global_step != self._exported_step:
            self._exported_step = trainer.global_step
            self._export(trainer, pl_module, "last")

    def on_fit_end(self, trainer, pl_module):
        if not self.enabled:
            return
        self._export(trainer, pl_module, "last")
        cb = trainer.checkpoint_callback
        with best_weights(trainer, pl_module) as found:
            if found:
                metrics = {cb.monitor: cb.best_model_score} if cb.monitor and cb.best_model_score is not None else {}
                self._export(trainer, pl_module, "best", metrics)


@contextlib.contextmanager
def full_parameters(trainer):
    """Under FSDP, gather the full parameters on rank 0 for the export (a collective: every rank enters).
    Not exercised on this project's CPU machine (torch's FSDP needs an accelerator); see docs/distributed.md."""
    strategy = getattr(trainer, "strategy", None)
    if type(strategy).__name__.endswith("FSDPStrategy"):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(strategy.model, writeback=False, rank0_only=True):
            yield
    else:
        yield


@contextlib.contextmanager
def best_weights(trainer, module):
    """Temporarily load the best checkpoint's trainable weights into ``module``; yields whether there was one."""
    best = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if not best or not os.path.isfile(best):
        yield False
        return
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    current = {n: p.detach().clone() for n, p in params.items()}
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    try:
        with torch.no_grad():
            for name, value in state.items():
                if name in params:
                    params[name].copy_(value)
        yield True
    finally:
        with torch.no_grad():
            for name, value in current.items():
                params[name].copy_(value)
