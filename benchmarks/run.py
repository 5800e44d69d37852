"""Run peftlab's benchmarks (issue #8) and write docs/benchmarks.md.

    python benchmarks/run.py                    # default budget, about 25 min on a 2-core CPU
    python benchmarks/run.py --smoke            # a few steps each (what CI runs); results_smoke.json only
    python benchmarks/run.py --only padding,startup
    python benchmarks/run.py --report           # re-render docs/benchmarks.md from benchmarks/results.json

Benchmarks (each compares peftlab with its reference in the same process, interleaved, and reports ratios):
throughput (LoRA; includes the step-time breakdown), methods (prompt/prefix tuning, QLoRA), padding,
inference, memory, startup, multi_adapter (adapter sets and peftlab serve), multitask_fit (one multi-task fit vs
separate fits). The default run writes benchmarks/results.json and docs/benchmarks.md; with
--only, the new entries are merged into the existing results.json before rendering.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks.common import ROOT, SEED, log, machine, quiet  # noqa: E402

NAMES = ["throughput", "methods", "padding", "inference", "memory", "startup", "multi_adapter", "multitask_fit"]


def benchmark(name: str):
    if name == "throughput":
        from benchmarks.throughput import bench_throughput as fn
    elif name == "methods":
        from benchmarks.throughput import bench_methods as fn
    elif name == "padding":
        from benchmarks.padding import bench_padding as fn
    elif name == "inference":
        from benchmarks.inference import bench_inference as fn
    elif name == "memory":
        from benchmarks.memory import bench_memory as fn
    elif name == "multi_adapter":
        from benchmarks.multi_adapter import bench_multi_adapter as fn
    elif name == "multitask_fit":
        from benchmarks.multi_adapter import bench_multitask_fit as fn
    else:
        from benchmarks.startup import bench_startup as fn
    return fn


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few steps per benchmark (seconds; what CI runs)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(NAMES)}")
    parser.add_argument("--results", default=None,
                        help="results JSON (default benchmarks/results.json, or results_smoke.json with --smoke)")
    parser.add_argument("--docs", default=None,
                        help="markdown to write (default docs/benchmarks.md; not written with --smoke unless given)")
    parser.add_argument("--report", action="store_true", help="only re-render the markdown from the results JSON")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for the in-process benchmarks (default 1: on a shared 2-core "
                             "machine two threads stall whenever another process takes a core; 0 = torch's default)")
    args = parser.parse_args(argv)
    names = NAMES if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(NAMES)}")
    results_path = Path(args.results) if args.results else HERE / f"results{'_smoke' if args.smoke else ''}.json"
    docs_path = Path(args.docs) if args.docs else (None if args.smoke else ROOT / "docs" / "benchmarks.md")

    if args.report:
        results = json.loads(results_path.read_text())
    else:
        results = json.loads(results_path.read_text()) if args.only and results_path.is_file() else {}
        quiet()
        import torch

        torch.manual_seed(SEED)
        if args.threads:
            torch.set_num_threads(args.threads)
        command = "python benchmarks/run.py" + (" --smoke" if args.smoke else "") + \
            (f" --only {','.join(names)}" if args.only else "") + (f" --threads {args.threads}" if args.threads != 1 else "")
        results.setdefault("meta", {}).update({"machine": machine(), "smoke": args.smoke, "seed": SEED,
                                               "threads": torch.get_num_threads(),
                                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        results["meta"].setdefault("commands", {})
        for name in names:
            log(f"=== {name} ===")
            start = time.time()
            results[name] = benchmark(name)(args.smoke)
            results["meta"].setdefault("seconds", {})[name] = time.time() - start
            results["meta"]["commands"][name] = command
            # --only merges into older results: each benchmark keeps the date and machine it was measured on
            results["meta"].setdefault("measured", {})[name] = {"date": results["meta"]["date"],
                                                               "machine": results["meta"]["machine"]}
            log(f"=== {name} done in {time.time() - start:.0f} s ===")
            results_path.write_text(json.dumps(results, indent=1))  # keep what finished if a later one fails
        results_path.write_text(json.dumps(results, indent=1))
        log(f"wrote {results_path}")
    if docs_path is not None:
        from benchmarks.report import render

        docs_path.write_text(render(results))
        log(f"wrote {docs_path}")
    return results


if __name__ == "__main__":
    main()
