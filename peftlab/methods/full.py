"""Full fine-tuning: the baseline every PEFT method is compared against."""

from torch import nn

from peftlab.methods.base import PeftModule
from peftlab.methods.registry import PRESETS_DIR


class FullFineTuning(PeftModule):
    """Train every backbone parameter (nothing frozen). Use a smaller learning rate than for adapters (e.g. 2e-5)."""

    name = "full"
    family = "baseline"
    preset = str(PRESETS_DIR.parent / "full_finetune.yaml")
    trainable_dtype = "precision"
    advice = ("a higher learning rate (5e-5) or more epochs", "a lower learning rate; weight decay; fewer epochs; "
              "or a PEFT method, which has far fewer parameters to overfit with")

    def attach(self, backbone: nn.Module) -> nn.Module:
        backbone.requires_grad_(True)
        return backbone

    def adapter_set_refusal(self) -> str | None:
        return ("full fine-tuning trains every weight of the backbone: its run is a whole model, not an adapter that "
                "can share a backbone with others; load it alone with peftlab.api.load_run")
