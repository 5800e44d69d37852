"""IA3 (Liu et al. 2022) through peft: learned per-channel rescaling of keys, values and FFN activations.

A method that is a peft config takes one method: ``peft_config``.

    peftlab fit --config configs/quickstart.yaml --config examples/ia3.yaml
"""

from pathlib import Path

from torch import nn

from peftlab.methods.peft_backed import PEFT_TASK, PeftBackedMethod


class IA3(PeftBackedMethod):
    """Learned vectors that rescale the outputs of ``target_modules`` (the inputs of ``feedforward_modules``).

    Args:
        target_modules: layers whose activations are rescaled: name suffixes, or one regular expression
            matched against full names (the default picks BERT's keys, values and FFN output layers).
        feedforward_modules: the feed-forward layers among them (rescaled at their input), same forms.
        **kwargs: the PeftModule arguments.
    """

    name = "ia3"
    preset = str(Path(__file__).with_name("ia3.yaml"))

    def __init__(self, target_modules: list[str] | str = r".*\.(key|value)$|.*layer\.\d+\.output\.dense$",
                 feedforward_modules: list[str] | str = r".*layer\.\d+\.output\.dense$", **kwargs):
        super().__init__(**kwargs)

    def peft_config(self, backbone: nn.Module):
        from peft import IA3Config

        h = self.hparams
        return IA3Config(task_type=PEFT_TASK[self.task], target_modules=h.target_modules,
                         feedforward_modules=h.feedforward_modules)
