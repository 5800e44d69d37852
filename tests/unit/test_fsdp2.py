"""FSDP2 (``peftlab.strategies.FSDP2Strategy``) on 2 CPU processes over gloo: every method trains the same adapter
as 1 process with the same global batch, checkpoints hold only the trainable parameters and optimizer state,
exports gather only the trainable parameters and load with plain peft, and a SIGKILLed run resumes exactly.

This file holds the in-process tests; those that start processes or load a packaged model are in
tests/integration/test_fsdp2_runs.py."""

from __future__ import annotations

import pytest
import torch


def test_packed_weights_a_mixed_precision_policy_would_cast_are_refused_in_one_line():
    """QLoRA's 4-bit values stored as uint8 (or any dtype but the policy's) would be cast by mixed_precision: bf16."""
    from peftlab.errors import PeftLabError
    from peftlab.strategies import FSDP2Strategy

    class Packed:
        model = torch.nn.Linear(2, 2).requires_grad_(False)

        def quantized_weights(self):
            return {id(self.model.weight): 2}

    Packed.model.weight.data = Packed.model.weight.data.to(torch.uint8)
    FSDP2Strategy().check_packed_weights(Packed(), Packed.model)  # no policy: the bytes are moved as they are
    with pytest.raises(PeftLabError, match=r"Packed's quantized weights are stored as torch.uint8 and mixed_precision: "
                                           r"bf16 would cast .* \(model.quant_storage: bfloat16\) or set the strategy's "
                                           r"mixed_precision: null"):
        FSDP2Strategy(mixed_precision="bf16").check_packed_weights(Packed(), Packed.model)
    Packed.model.weight.data = Packed.model.weight.data.to(torch.bfloat16)
    FSDP2Strategy(mixed_precision="bf16").check_packed_weights(Packed(), Packed.model)  # stored in the policy's dtype
