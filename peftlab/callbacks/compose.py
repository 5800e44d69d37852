"""``ComposeLoRA``: evaluate or predict with a weighted combination of trained LoRA adapters."""

from __future__ import annotations

import lightning as L

from peftlab.compose import Mode, compose
from peftlab.errors import PeftLabError


class ComposeLoRA(L.Callback):
    """Before validate/test/predict, load ``adapters`` onto the module's LoRA model and activate
    ``sum_i weights[i] * adapter_i`` (see :mod:`peftlab.compose` for the modes).

    Example: ``peftlab test --config configs/causal_lm_lora.yaml --trainer.callbacks+=peftlab.callbacks.ComposeLoRA
    --trainer.callbacks.adapters=[runs/a/version_0/adapter/best,runs/b/version_0/adapter/best]
    --trainer.callbacks.weights=[0.5,0.5]``

    Args:
        adapters: exported LoRA adapter directories.
        weights: one weight per adapter.
        mode: ``exact`` (default) or one of peft's approximate modes.
        density: fraction of entries kept by the ties/dare modes.
    """

    def __init__(self, adapters: list[str], weights: list[float], mode: Mode = "exact", density: float = 0.5):
        self.adapters, self.weights, self.mode, self.density = adapters, weights, mode, density
        self._done = False

    def _apply(self, pl_module):
        from peftlab.export import is_peft_model

        if self._done:
            return
        if not type(pl_module).composable or not is_peft_model(getattr(pl_module, "model", None)):
            raise PeftLabError(f"ComposeLoRA needs a method whose adapters compose by weighted sum (e.g. "
                               f"model.class_path: peftlab.methods.LoRA), not {type(pl_module).__name__}")
        compose(pl_module.model, self.adapters, self.weights, self.mode, self.density)
        self._done = True

    def on_validation_start(self, trainer, pl_module):
        self._apply(pl_module)

    def on_test_start(self, trainer, pl_module):
        self._apply(pl_module)

    def on_predict_start(self, trainer, pl_module):
        self._apply(pl_module)
