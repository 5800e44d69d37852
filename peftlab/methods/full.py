"""Full fine-tuning: the baseline every PEFT method is compared against."""

from torch import nn

from peftlab.methods.base import PeftModule


class FullFineTuning(PeftModule):
    """Train every backbone parameter (nothing frozen). Use a smaller learning rate than for adapters (e.g. 2e-5)."""

    def attach(self, backbone: nn.Module) -> nn.Module:
        backbone.requires_grad_(True)
        return backbone
