"""The ``peftlab`` command: a ``LightningCLI`` with the method chosen by ``model.class_path``.

    peftlab fit --config configs/quickstart.yaml
    peftlab fit --config configs/quickstart.yaml --model.r 16 --trainer.max_epochs 3
    peftlab fit --config configs/quickstart.yaml --print_config > my_run.yaml
    peftlab test --config my_run.yaml --ckpt_path runs/.../checkpoints/best.ckpt

Errors in a config or in the data print one message and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

from peftlab.errors import PeftLabError

DESCRIPTION = (
    "peftlab: parameter-efficient fine-tuning with PyTorch Lightning. Pick a method with "
    "--model.class_path (LoRA, FullFineTuning, ...) and data with --data.*; see configs/ for examples."
)


def _description() -> str:
    extra = f" Other commands: {', '.join('peftlab ' + c for c in EXTRA_COMMANDS)} (each has --help)."
    return DESCRIPTION + (extra if EXTRA_COMMANDS else "")


def _quiet_libraries() -> None:
    # transformers prints a load report for every newly initialised head (expected here) and a progress
    # bar per weight file; peftlab reports what matters (trainable/total parameters) itself.
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # Tokenization happens once in prepare_data, so loader workers buy nothing on small CPU machines.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*is smaller than the logging.*")


def _make_cli_class():
    from lightning.pytorch.cli import LightningCLI

    class PeftLabCLI(LightningCLI):
        """LightningCLI wired for peftlab: one DataModule, any PeftModule subclass, data-derived links."""

        def add_arguments_to_parser(self, parser):
            parser.add_argument("--test_after_fit", type=bool, default=True,
                                help="after fit, run the test split with the best checkpoint and print its metrics")
            parser.add_argument("--predictions_file", type=str | None, default=None,
                                help="predict: where to write predictions, .jsonl or .csv (default: <log_dir>/predictions.jsonl)")
            from peftlab.callbacks import AdapterExport

            # on by default: exported adapters under <run dir>/adapter/{last,best} (--adapter_export.enabled false)
            parser.add_lightning_class_args(AdapterExport, "adapter_export")
            # the model is built for the data's task; the data tokenizes with the backbone's tokenizer
            parser.link_arguments("data.task", "model.init_args.task", apply_on="parse")
            parser.link_arguments("model.init_args.backbone", "data.tokenizer", apply_on="parse")
            # num_labels is read from the data, so it is never written twice
            parser.link_arguments("data.num_labels", "model.init_args.num_labels", apply_on="instantiate")

        def before_fit(self):
            self._started = time.time()

        def after_fit(self):
            trainer, model = self.trainer, self.model
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            results = {}
            if self.config_value("test_after_fit") and not trainer.interrupted and trainer.datamodule is not None:
                results = trainer.test(model, datamodule=self.datamodule, ckpt_path="best" if best else None,
                                       verbose=False)
                results = results[0] if results else {}
            if trainer.is_global_zero:
                _print_summary(model, trainer, best, results, time.time() - self._started)

        def after_predict(self):
            trainer = self.trainer
            if not trainer.is_global_zero or not trainer.predict_loop.predictions:
                return
            path = self.config_value("predictions_file") or os.path.join(trainer.log_dir or ".", "predictions.jsonl")
            n = write_predictions(path, trainer.predict_loop.predictions, self.datamodule)
            print(f"[peftlab] wrote {n} predictions to {path}")

        def config_value(self, key):
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            return cfg.get(key)

    return PeftLabCLI


def write_predictions(path, batches, datamodule) -> int:
    """Write predict_step outputs (atomically) as jsonl, or csv when ``path`` ends in .csv: one row per input."""
    texts = datamodule.predict_texts() if datamodule is not None else None
    names = getattr(datamodule, "label_names", None)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    out = []
    for batch in batches:
        if "probs" in batch:
            rows = [{"label": names[p] if names else int(p),
                     "probs": {(names[i] if names else str(i)): round(float(q), 6) for i, q in enumerate(pr)}}
                    for p, pr in zip(batch["pred"].tolist(), batch["probs"].tolist())]
        else:
            rows = [{"generated": t} for t in batch["text"]]
        for row in rows:
            if texts is not None and len(out) < len(texts):
                row = {"input": texts[len(out)], **row}
            out.append(row)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        if path.endswith(".csv"):  # one column per class probability
            import csv

            flat = [{**{k: v for k, v in r.items() if k != "probs"},
                     **{f"p_{k}": v for k, v in r.get("probs", {}).items()}} for r in out]
            writer = csv.DictWriter(f, fieldnames=list(flat[0]) if flat else ["input"])
            writer.writeheader()
            writer.writerows(flat)
        else:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
    os.replace(tmp, path)
    return len(out)


def _print_summary(model, trainer, best, results, seconds):
    pct = 100.0 * model.trainable_count / model.total_count
    lines = [f"method      {type(model).__name__} on {model.hparams.backbone}",
             f"trainable   {model.trainable_count:,} / {model.total_count:,} parameters ({pct:.4f}%)"]
    cb = trainer.checkpoint_callback
    if cb is not None and cb.monitor and cb.best_model_score is not None:
        lines.append(f"best        {cb.monitor} = {float(cb.best_model_score):.4f}")
    if best:
        lines.append(f"checkpoint  {best}")
    adapter = next((d for d in (os.path.join(trainer.log_dir or "", "adapter", n) for n in ("best", "last"))
                    if trainer.log_dir and os.path.isdir(d)), None)
    if adapter:
        lines.append(f"adapter     {adapter}")
    for key in sorted(results):
        lines.append(f"{key:<11} {results[key]:.4f}")
    if trainer.log_dir:
        lines.append(f"run dir     {trainer.log_dir}")
    lines.append(f"time        {seconds:.0f} s")
    print("\n[peftlab] fit summary\n  " + "\n  ".join(lines), flush=True)


# Commands besides Lightning's fit/validate/test/predict: name -> "module:function(argv)"
EXTRA_COMMANDS: dict[str, str] = {
    "merge": "peftlab.merge:main",
    "compose": "peftlab.compose:main",
    "plot": "peftlab.plot:main",
    "params": "peftlab.analysis.params:main",
    "estimate-memory": "peftlab.analysis.memory:main",
    "recommend": "peftlab.analysis.recommend:main",
}


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``peftlab`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    # like `python -m`, make modules in the working directory importable (class_path: examples.bitfit.BitFit)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            import importlib

            module, function = EXTRA_COMMANDS[argv[0]].split(":")
            return getattr(importlib.import_module(module), function)(argv[1:])
        _quiet_libraries()
        from peftlab.data import PeftDataModule
        from peftlab.methods import PeftModule

        cli_class = _make_cli_class()
        # LightningCLI reads sys.argv (it warns when given both), so hand it argv that way
        saved, sys.argv = sys.argv, [sys.argv[0] if sys.argv else "peftlab", *argv]
        try:
            cli_class(
                PeftModule,
                PeftDataModule,
                subclass_mode_model=True,
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"default_env": False, "prog": "peftlab", "description": _description()},
                auto_configure_optimizers=False,
            )
        finally:
            sys.argv = saved
    except Exception as err:  # noqa: BLE001 - only PeftLabError is turned into a message, the rest re-raises
        user_error = _find_user_error(err)
        if debug or user_error is None:
            raise
        print(f"peftlab: error: {user_error}", file=sys.stderr)
        sys.exit(2)


def _find_user_error(err: BaseException | None) -> PeftLabError | None:
    """The PeftLabError behind ``err``; jsonargparse wraps errors raised while instantiating classes."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, PeftLabError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
