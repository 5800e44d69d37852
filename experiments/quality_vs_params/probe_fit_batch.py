"""Can prefix tuning with and without the reparameterizing MLP fit one batch? (a mechanics check)

    python experiments/quality_vs_params/probe_fit_batch.py

Part (a)'s prefix+mlp and P-tuning v2 stay at the majority class within the CPU budget at every learning rate
tried. This trains each on the same 16 real reviews for 30 AdamW steps and prints the loss, to tell "slow to
learn from the data stream" from "gradients do not reach the prefixes". (They fit the batch. The cause turned
out to be the new classification head, trained at the methods' own 3e-4: MiniLM's pooled features are ~0.05 in
size, so that head's logits barely depend on the input after 250 steps; with the head at 1e-2 both learn, see
part (a') of docs/results/quality_vs_params.md.)
"""

from __future__ import annotations

import torch

from peftlab.data.sources import load_source
from peftlab.methods import PrefixTuning, PTuningV2

CASES = [  # (label, class, kwargs, learning rate): prefix at its CLS_LR rate, the MLP variants at 1e-3 (piloted)
    ("prefix", PrefixTuning, {}, 3e-2),
    ("prefix+mlp", PrefixTuning, {"prefix_projection": True, "prefix_hidden_size": 512}, 1e-3),
    ("p-tuning v2", PTuningV2, {"prefix_hidden_size": 512}, 1e-3),
]


def main() -> None:
    rows = load_source("packaged:rotten_tomatoes")["train"]
    fresh = [r for r in rows if r["label"] == "fresh"][:8]
    rotten = [r for r in rows if r["label"] == "rotten"][:8]
    batch_rows = [r for pair in zip(fresh, rotten) for r in pair]
    labels = torch.tensor([int(r["label"] == "fresh") for r in batch_rows])
    for label, cls, kwargs, lr in CASES:
        torch.manual_seed(0)
        module = cls(backbone="packaged:all-MiniLM-L6-v2", num_labels=2, num_virtual_tokens=20, **kwargs).build().train()
        inputs = module.tokenizer([r["text"] for r in batch_rows], return_tensors="pt", padding=True,
                                  truncation=True, max_length=64)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
        losses = []
        for _ in range(30):
            loss = module(**inputs, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        print(f"{label:12s} lr {lr:g}: loss {losses[0]:.3f} -> {losses[-1]:.3f} after 30 steps on one batch")


if __name__ == "__main__":
    main()
