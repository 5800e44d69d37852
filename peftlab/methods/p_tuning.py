"""P-tuning (Liu et al. 2021, "GPT Understands, Too") through peft: virtual tokens from a prompt encoder."""

from __future__ import annotations

from typing import Literal

from torch import nn

from peftlab.errors import PeftLabError
from peftlab.methods.peft_backed import PEFT_TASK, PeftBackedMethod
from peftlab.methods.prompt_tuning import check_virtual_tokens


class PTuning(PeftBackedMethod):
    """Virtual input tokens produced by a trainable prompt encoder (MLP or LSTM) from N embeddings.

    The encoder reparameterizes the prompt during training only; its output is a fixed N x hidden
    prompt at inference. Parameters: N x hidden embeddings plus the encoder
    (MLP: hidden->h->h->hidden; LSTM: bidirectional LSTM of size h plus an MLP head).

    Args:
        num_virtual_tokens: number of virtual tokens N.
        encoder: ``mlp`` or ``lstm``.
        encoder_hidden_size: hidden size h of the prompt encoder.
        encoder_num_layers: LSTM layers (the MLP always has two hidden layers).
        encoder_dropout: dropout inside the prompt encoder.
        **kwargs: the :class:`PeftModule` arguments.
    """

    name = "p_tuning"
    family = "soft prompt"
    scaled_knobs = ("num_virtual_tokens",)
    supports_packing = False  # virtual tokens per row
    pads_exactly = False  # virtual positions ahead of the padding
    advice = ("more virtual tokens (50-100) or a larger encoder_hidden_size; or graduate to LoRA",
              "fewer virtual tokens; encoder_dropout 0.1; train fewer epochs")

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        encoder: Literal["mlp", "lstm"] = "mlp",
        encoder_hidden_size: int = 128,
        encoder_num_layers: int = 2,
        encoder_dropout: float = 0.0,
        **kwargs,
    ):
        check_virtual_tokens(num_virtual_tokens)
        if encoder_hidden_size < 1 or encoder_num_layers < 1:
            raise PeftLabError("model.encoder_hidden_size and model.encoder_num_layers must be >= 1")
        super().__init__(**kwargs)

    def peft_config(self, backbone: nn.Module):
        import warnings

        from peft import PromptEncoderConfig

        with warnings.catch_warnings():  # peft warns that the MLP ignores encoder_num_layers: documented above
            warnings.simplefilter("ignore")
            h = self.hparams
            return PromptEncoderConfig(task_type=PEFT_TASK[self.task], num_virtual_tokens=h.num_virtual_tokens,
                                       encoder_reparameterization_type=h.encoder.upper(),
                                       encoder_hidden_size=h.encoder_hidden_size,
                                       encoder_num_layers=h.encoder_num_layers, encoder_dropout=h.encoder_dropout)
