"""A method class owns its capabilities: merge, compose, preset scaling, stacking and its description follow from
the class's attributes, for a method written outside peftlab, with no edit in peftlab/."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from peftlab.errors import PeftLabError

METHOD_FILE = '''
"""Three methods written outside peftlab."""
from peftlab.methods import LoRA
from peftlab.methods.peft_backed import PEFT_TASK, PeftBackedMethod


class TinyLoRA(PeftBackedMethod):
    """A LoRA without an alpha argument: its rank is its one size knob.

    Args:
        r: rank.
        **kwargs: the PeftModule arguments.
    """

    name = "cap_tiny_lora"
    peft_type = "LORA"
    mergeable = True  # peft's merge_and_unload, shared by every mergeable peft-backed method
    composable = True
    scaled_knobs = ("r",)  # --r sets r; no alpha_per_r: nothing else is touched

    def __init__(self, r: int = 2, **kwargs):
        super().__init__(**kwargs)

    def peft_config(self, backbone):
        from peft import LoraConfig

        # B starts random, not zero, so that the merged weights differ from the backbone's
        return LoraConfig(task_type=PEFT_TASK[self.task], r=self.hparams.r, lora_alpha=4,
                          target_modules=["q_proj", "v_proj"], init_lora_weights=False)


class PlainLoRA(LoRA):
    """LoRA that declares itself neither composable, stackable nor scalable."""

    name = "cap_plain_lora"
    composable = False
    stack_role = None
    scaled_knobs = ()


class StackLoRA(LoRA):
    """LoRA under another name: a stack may use it as its additive part (inherited stack_role)."""

    name = "cap_stack_lora"
'''


@pytest.fixture
def methods(tmp_path, monkeypatch):
    (tmp_path / "cap_methods.py").write_text(textwrap.dedent(METHOD_FILE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import cap_methods

    yield cap_methods
    from peftlab.methods import METHODS

    for name in ("cap_tiny_lora", "cap_plain_lora", "cap_stack_lora"):
        METHODS.pop(name, None)
    sys.modules.pop("cap_methods", None)


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_merge_comes_from_the_mergeable_attribute(methods, tiny_llama):
    from transformers import AutoModelForCausalLM

    from peftlab.merge import merged_model

    module = methods.TinyLoRA(backbone=tiny_llama, task="causal_lm").build()
    batch = dict(module.tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt"))
    merged = merged_model(module)
    assert not any("lora" in n for n, _ in merged.named_parameters())  # a plain transformers model
    torch.testing.assert_close(logits(merged, batch), logits(module, batch), atol=1e-5, rtol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert (logits(base, batch) - logits(merged, batch)).abs().max() > 1e-3  # the update was folded in
    methods.TinyLoRA.mergeable = False  # the same class, declared otherwise: refused in one line
    try:
        with pytest.raises(PeftLabError, match="TinyLoRA cannot be merged into the backbone"):
            merged_model(module)
    finally:
        methods.TinyLoRA.mergeable = True


def test_compose_asks_the_adapters_class(methods, tiny_llama, tmp_path):
    from peftlab.compose import check_compatible
    from peftlab.export import export_adapter

    for name, cls in (("a", methods.TinyLoRA), ("b", methods.TinyLoRA), ("p", methods.PlainLoRA)):
        kw = {"target_modules": ["q_proj", "v_proj"]} if cls is methods.PlainLoRA else {}
        export_adapter(cls(backbone=tiny_llama, task="causal_lm", **kw).build(), tmp_path / name)
    assert len(check_compatible([str(tmp_path / "a"), str(tmp_path / "b")], [0.5, 0.5])) == 2
    with pytest.raises(PeftLabError, match=r"/p is a PlainLoRA adapter, which does not compose by weighted sum"):
        check_compatible([str(tmp_path / "a"), str(tmp_path / "p")], [0.5, 0.5])
    assert methods.TinyLoRA.compose_refusal({}, "classification").startswith("is a classification adapter")
    assert methods.StackLoRA.compose_refusal({"use_dora": True}, "causal_lm").startswith("is a DoRA adapter")


def test_presets_scale_only_what_the_class_declares(methods, tiny_llama, tmp_path, monkeypatch):
    from peftlab.analysis.memory import preset_spec
    from peftlab.analysis.params import build_meta

    preset = tmp_path / "tiny.yaml"
    preset.write_text("model:\n  class_path: cap_methods.TinyLoRA\n  init_args:\n    r: 2\n")
    monkeypatch.setattr(methods.TinyLoRA, "preset", str(preset))
    spec = preset_spec("cap_tiny_lora", tiny_llama, "causal_lm", r=8, num_virtual_tokens=5)
    assert spec.init_args == {"r": 8, "backbone": tiny_llama, "task": "causal_lm"}  # no alpha, no tokens
    module = build_meta(spec)
    assert module.trainable_count == 2 * 8 * ((64 + 64) + (64 + 32))  # 2 layers x r (d_in + d_out) of q_proj, v_proj

    assert methods.PlainLoRA.scaled_preset({"r": 2, "alpha": 4}, r=8) == {"r": 2, "alpha": 4}
    assert methods.StackLoRA.scaled_preset({"r": 2, "alpha": 4, "target_modules": ["q"]}, lambda t: ["x"], r=8) == \
        {"r": 8, "alpha": 16, "target_modules": ["x"]}  # LoRA's: alpha = 2r, targets fitted to the backbone


def test_stack_parts_come_from_stack_role(methods, tiny_bert):
    from peftlab.methods import Stack

    stack = Stack(backbone=tiny_bert, num_labels=2, additive={"method": "cap_stack_lora", "r": 2},
                  prompt={"method": "prefix_tuning", "num_virtual_tokens": 2})
    assert stack.merge_refusal() is None  # its additive part merges
    assert stack.build().trainable_count > 0
    with pytest.raises(PeftLabError, match="'cap_plain_lora' is not a stackable additive method"):
        Stack(backbone=tiny_bert, num_labels=2, additive={"method": "cap_plain_lora"})
    scaled = Stack.scaled_preset({"additive": {"method": "cap_stack_lora", "r": 2, "alpha": 4},
                                  "prompt": {"method": "prefix_tuning", "num_virtual_tokens": 10}},
                                 r=4, num_virtual_tokens=3)
    assert scaled["additive"] == {"method": "cap_stack_lora", "r": 4, "alpha": 8}
    assert scaled["prompt"] == {"method": "prefix_tuning", "num_virtual_tokens": 3}


def test_describe_is_the_methods_own(methods):
    from peftlab.analysis.recommend import Recommendation
    from peftlab.methods import BottleneckAdapter, PTuningV2

    rec = Recommendation("rule", "StackLoRA", "cap_methods.StackLoRA", {"r": 4, "alpha": 8}, "why")
    assert rec.summary == "StackLoRA r=4, alpha=8"
    assert methods.TinyLoRA.describe({"r": 2}) == "TinyLoRA"
    assert PTuningV2.describe({"num_virtual_tokens": 8}) == "PTuningV2 with 8 virtual tokens"
    assert BottleneckAdapter.describe({"bottleneck": 64, "placement": "ffn"}) == "BottleneckAdapter (bottleneck 64, ffn)"
