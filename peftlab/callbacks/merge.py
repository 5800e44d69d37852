"""``LoRAMerge``: at the end of fit, save the best LoRA/QLoRA weights merged into a plain transformers model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import lightning as L

from peftlab.errors import PeftLabError
from peftlab.merge import check_mergeable, merge_to_directory, probe_batch
from peftlab.strategies import is_sharded


class LoRAMerge(L.Callback):
    """Merge the trained LoRA (best checkpoint if there is one, else the final weights) into the backbone.

    Writes ``<run dir>/merged`` (or ``dirpath``): ``config.json``, ``model.safetensors`` and the tokenizer,
    loadable with ``AutoModel*.from_pretrained`` without peft, plus ``merge_report.json`` with the largest
    logit difference between the merged and the unmerged model on a probe batch. Refuses, at the start of
    fit, methods that cannot merge.

    Args:
        dirpath: output directory; default ``<run dir>/merged``.
        dtype: dtype to merge and save in (QLoRA: the dtype the 4-bit weights are dequantized to).
    """

    def __init__(self, dirpath: str | None = None, dtype: Literal["float32", "bfloat16", "float16"] = "float32"):
        self.dirpath = dirpath
        self.dtype = dtype

    def on_fit_start(self, trainer, pl_module):
        check_mergeable(pl_module)  # fail before training, not after

    @staticmethod
    def _exported_best(trainer, log_dir):
        from peftlab.callbacks.export import AdapterExport

        for callback in trainer.callbacks:
            if isinstance(callback, AdapterExport) and callback.enabled:
                best = Path(callback.dirpath or os.path.join(log_dir or trainer.default_root_dir, "adapter")) / "best"
                return best if (best / "adapter_config.json").is_file() else None
        return None

    def on_fit_end(self, trainer, pl_module):
        log_dir = trainer.log_dir  # a collective under a distributed strategy: every rank asks, rank 0 writes
        if not trainer.is_global_zero:
            return
        directory = self.dirpath or os.path.join(log_dir or trainer.default_root_dir, "merged")
        # the best weights, as AdapterExport exported them when ModelCheckpoint found them (no checkpoint is read
        # back); without an exported best, the weights in memory
        best = self._exported_best(trainer, log_dir)
        if best is not None:
            from peftlab.api import load_run

            module = load_run(str(best)).module
        elif is_sharded(pl_module):
            raise PeftLabError("LoRAMerge under a sharding strategy merges the exported adapter: keep AdapterExport "
                               "on (--adapter_export.enabled true) with a ModelCheckpoint")
        else:
            module = pl_module
        report = merge_to_directory(module, directory, self.dtype, probe_batch(module))
        with open(os.path.join(directory, "merge_report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        pl_module.print(f"[peftlab] merged model written to {directory} "
                        f"(max |logit difference| {report['max_abs_logit_difference']:.2e})")
