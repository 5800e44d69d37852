"""BitFit (Ben Zaken et al. 2022): train only the bias terms. A complete peftlab method in one hook.

    peftlab fit --config configs/quickstart.yaml --config examples/bitfit.yaml
"""

from pathlib import Path

from torch import nn

from peftlab.methods import PeftModule


class BitFit(PeftModule):
    """Train every bias of the backbone (and, for classification, the new head); freeze all weights.

    Args:
        include_norms: also train the LayerNorm/RMSNorm scales.
        **kwargs: the PeftModule arguments (backbone, learning_rate, ...).
    """

    name = "bitfit"  # registers it: params, estimate-memory and recommend list it once this file is imported
    preset = str(Path(__file__).with_name("bitfit.yaml"))  # its settings (default: configs/methods/<name>.yaml)

    def __init__(self, include_norms: bool = False, **kwargs):
        super().__init__(**kwargs)  # records every argument in self.hparams; nothing is loaded yet

    def attach(self, backbone: nn.Module) -> nn.Module:
        for name, param in backbone.named_parameters():
            is_norm = "norm" in name.lower()
            param.requires_grad_(name.endswith(".bias") or (self.hparams.include_norms and is_norm))
        return backbone
