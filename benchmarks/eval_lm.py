"""peftlab's lm-eval wrapper against lm-eval's own HFLM on the same merged LoRA SmolLM2 (issue #31: >= 0.9x).

    python benchmarks/eval_lm.py            # 120 multiple-choice + 32 generation examples, 3 interleaved repeats
    python benchmarks/eval_lm.py --smoke    # a few examples (CI: tests/integration/test_benchmarks.py)

A LoRA (r 8 on q_proj/v_proj, its B matrices drawn at random so the update is not zero: no training is needed to
time scoring) on packaged:SmolLM2-135M-Instruct is merged into a plain transformers model once. That one model is
wrapped twice, as ``peftlab.eval_lm.PeftLabLM`` and as ``lm_eval.models.huggingface.HFLM``, and both run the
shipped tasks ``peftlab_rotten_tomatoes_mc`` (log-likelihood) and ``peftlab_rotten_tomatoes_gen`` (generation)
through ``lm_eval.simple_evaluate`` with the same batch size, repeats interleaved (peftlab, HFLM, peftlab, ...).
Throughput is requests per second spent inside the LM's ``loglikelihood`` / ``generate_until`` (task building is
the same code for both and is left out). Scores must be equal: the metrics, and every request's log-likelihood
(max difference reported). Writes ``benchmarks/eval_lm.json`` (``_smoke.json`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import SEED, log, machine, quiet, ratio_summary, summary  # noqa: E402

HERE = Path(__file__).resolve().parent
BACKBONE = "packaged:SmolLM2-135M-Instruct"
TASKS = {"mc": "peftlab_rotten_tomatoes_mc", "gen": "peftlab_rotten_tomatoes_gen"}


def merged_lora():
    """(merged plain transformers model, tokenizer) of a LoRA with random B on SmolLM2."""
    from peftlab.methods import LoRA

    module = LoRA(backbone=BACKBONE, task="causal_lm", r=8, alpha=16, target_modules=["q_proj", "v_proj"]).build()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return module.merged_model().eval(), module.tokenizer


class Timed:
    """Seconds and requests spent in an LM's request methods (instance attributes shadow the class's)."""

    def __init__(self, lm):
        self.seconds = {"loglikelihood": 0.0, "generate_until": 0.0}
        self.requests = {"loglikelihood": 0, "generate_until": 0}
        for kind in self.seconds:
            setattr(lm, kind, self._wrap(kind, getattr(lm, kind)))

    def _wrap(self, kind, fn):
        def timed(requests, *args, **kwargs):
            start = time.perf_counter()
            out = fn(requests, *args, **kwargs)
            self.seconds[kind] += time.perf_counter() - start
            self.requests[kind] += len(requests)
            return out

        return timed


def one_pass(lm, specs, manager, limits: dict) -> tuple[dict, dict, dict]:
    """(requests per second by kind, metrics by task, log-likelihoods of the MC task's requests)."""
    import lm_eval

    timer = Timed(lm)
    metrics, lls = {}, []
    for key, spec in specs.items():
        out = lm_eval.simple_evaluate(model=lm, tasks=[spec], task_manager=manager, limit=limits[key],
                                      log_samples=True, random_seed=SEED, numpy_random_seed=SEED,
                                      torch_random_seed=SEED, fewshot_random_seed=SEED, bootstrap_iters=0)
        metrics[TASKS[key]] = {k: v for k, v in out["results"][TASKS[key]].items() if isinstance(v, float)}
        if key == "mc":
            lls = [float(r[0][0]) for s in out["samples"][TASKS[key]] for r in s["resps"]]
    speed = {k: timer.requests[k] / timer.seconds[k] for k in timer.seconds if timer.seconds[k]}
    return speed, metrics, lls


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (as benchmarks/run.py)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    quiet()
    torch.manual_seed(SEED)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM

    from peftlab.eval_lm import PeftLabLM
    from peftlab.evaluate import check_lm_eval, resolve_tasks

    limits = {"mc": 8, "gen": 4} if args.smoke else {"mc": 120, "gen": 32}
    repeats = args.repeats or (1 if args.smoke else 3)
    model, tok = merged_lora()
    specs, manager = resolve_tasks(list(TASKS.values()))
    specs = dict(zip(TASKS, specs))
    lms = {"peftlab": PeftLabLM(model, tok, batch_size=args.batch_size),
           "hflm": HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, device="cpu")}
    speeds = {name: {"loglikelihood": [], "generate_until": []} for name in lms}
    metrics, lls = {}, {}
    for repeat in range(repeats):
        for name, lm in lms.items():
            speed, metrics[name], lls[name] = one_pass(lm, specs, manager, limits)
            for kind, value in speed.items():
                speeds[name][kind].append(value)
            log(f"repeat {repeat + 1}/{repeats} {name}: " + ", ".join(f"{k} {v:.1f} req/s" for k, v in speed.items()))
    result = {
        "setting": {"backbone": BACKBONE, "lora": "r 8, alpha 16, q_proj/v_proj, random B, merged",
                    "tasks": TASKS, "limits": limits, "batch_size": args.batch_size, "repeats": repeats,
                    "threads": torch.get_num_threads(), "device": "cpu"},
        "requests_per_s": {name: {k: summary(v) for k, v in s.items()} for name, s in speeds.items()},
        "ratios": {f"peftlab/hflm {k}": ratio_summary(speeds["peftlab"][k], speeds["hflm"][k])
                   for k in ("loglikelihood", "generate_until")},
        "metrics": metrics,
        "same_metrics": metrics["peftlab"] == metrics["hflm"],
        "max_loglikelihood_difference": max(abs(a - b) for a, b in zip(lls["peftlab"], lls["hflm"])),
        "requests_compared": len(lls["peftlab"]),
        "machine": machine(),
        "lm_eval": check_lm_eval(),
        "command": "python benchmarks/eval_lm.py" + (" --smoke" if args.smoke else ""),
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out = Path(args.out) if args.out else HERE / f"eval_lm{'_smoke' if args.smoke else ''}.json"
    out.write_text(json.dumps(result, indent=1))
    log(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
