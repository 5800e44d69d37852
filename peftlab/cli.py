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
from pathlib import Path

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
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    class PeftSaveConfigCallback(SaveConfigCallback):
        """Lightning's SaveConfigCallback, writing ``config.yaml`` once the model is built (at the start of
        fit / validate / test / predict) instead of in ``setup``: the model is built in ``configure_model``,
        after ``setup``, and a config whose model cannot be built must leave no run directory behind."""

        def setup(self, trainer, pl_module, stage):
            pass

        def _save(self, trainer, pl_module, stage):
            super().setup(trainer, pl_module, stage)  # a collective (log_dir, broadcast): every rank calls it

        def on_fit_start(self, trainer, pl_module):
            self._save(trainer, pl_module, "fit")

        def on_validation_start(self, trainer, pl_module):
            self._save(trainer, pl_module, "validate")  # no-op when fit already saved

        def on_test_start(self, trainer, pl_module):
            self._save(trainer, pl_module, "test")

        def on_predict_start(self, trainer, pl_module):
            self._save(trainer, pl_module, "predict")

    class PeftLabCLI(LightningCLI):
        """LightningCLI wired for peftlab: one DataModule, any PeftModule subclass, data-derived links."""

        save_config_class = PeftSaveConfigCallback

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

        def instantiate_trainer(self, **kwargs):
            from lightning.pytorch.callbacks import ProgressBar

            # read before the Trainer exists: Lightning appends its default bar to this very list
            configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
            user_bar = any(isinstance(c, ProgressBar) for c in configured)
            root_dir = self._get(self.config_init, "trainer", default={}).get("default_root_dir")
            trainer = super().instantiate_trainer(**kwargs)
            if not user_bar:
                from peftlab.callbacks.progress import replace_default_progress_bar

                replace_default_progress_bar(trainer)
            if trainer.logger is None and not root_dir:
                self._without_run_directory(trainer)
            return trainer

        def _without_run_directory(self, trainer):
            """With the logger off and no trainer.default_root_dir there is no run directory: Lightning would
            put config.yaml and the exported adapters in the working directory. Write neither, and say so."""
            from lightning.pytorch.cli import SaveConfigCallback

            from peftlab.callbacks import AdapterExport

            trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, SaveConfigCallback)]
            exports = [c for c in trainer.callbacks if isinstance(c, AdapterExport) and c.enabled and not c.dirpath]
            for callback in exports:
                callback.enabled = False
            if self.subcommand == "fit" and trainer.is_global_zero:
                print("[peftlab] trainer.logger is off and trainer.default_root_dir is not set: no run directory, "
                      "so config.yaml and the adapters are not saved (set trainer.default_root_dir to keep them)")

        def _parse_ckpt_path(self):
            # LightningCLI reads the checkpoint's hyperparameters into the config before anything else
            from peftlab.checkpointing import checkpoint_errors

            if not self.config.get("subcommand"):
                return
            path = self.config[self.config.subcommand].get("ckpt_path")
            with checkpoint_errors(path):
                self._check_checkpoint_matches_config(path)
                super()._parse_ckpt_path()

        def _check_checkpoint_matches_config(self, path):
            """Lightning would silently replace the config's model settings with the checkpoint's; refuse instead
            when they differ, so a resumed run is never something other than what the config says."""
            if not path or not Path(path).is_file():
                return
            import torch

            hparams = dict(torch.load(path, weights_only=True, map_location="cpu").get("hyper_parameters") or {})
            model = self.config[self.config.subcommand].get("model")
            if not hparams or model is None:
                return
            saved_class = hparams.pop("_class_path", None)
            if saved_class and saved_class != model.class_path:
                diffs = [f"model.class_path is {model.class_path} here but {saved_class} in the checkpoint"]
            else:
                init_args = model.get("init_args") or {}
                diffs = [f"model.init_args.{k} is {init_args.get(k)!r} here but {v!r} in the checkpoint"
                         for k, v in sorted(hparams.items())
                         if not k.startswith("_") and k not in ("task", "num_labels") and init_args.get(k) is not None
                         and _normalise(init_args.get(k)) != _normalise(v)]
            if diffs:
                raise PeftLabError(
                    f"checkpoint does not match the config ({'; '.join(diffs[:3])}). Resume with the settings the "
                    "checkpoint was trained with, or start a new run without --ckpt_path"
                )

        def before_fit(self):
            self._started = time.time()
            self.model.check()  # settings errors in seconds, before anything is written or loaded
            self._resolve_last_checkpoint()

        def before_validate(self):
            self.model.check()

        def before_test(self):
            self.model.check()

        def before_predict(self):
            self.model.check()

        def _resolve_last_checkpoint(self):
            """``--ckpt_path last`` resumes the newest run of this config: Lightning alone would look only in
            the new run's (empty) version directory, because the logger picks a fresh version per run."""
            cfg = self.config_init[self.subcommand]
            logger = self.trainer.logger
            if cfg.get("ckpt_path") != "last" or logger is None or not hasattr(logger, "root_dir"):
                return
            found = sorted(Path(logger.root_dir).glob("*/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
            if not found:
                print(f"[peftlab] --ckpt_path last: no last.ckpt under {logger.root_dir}; starting a new run")
                cfg["ckpt_path"] = None
                return
            ckpt = found[-1]
            version = ckpt.parent.parent.name
            # log into the resumed run's directory (CSV metrics append; checkpoints continue in place)
            logger._version = int(version[len("version_"):]) if version.startswith("version_") and \
                version[len("version_"):].isdigit() else version
            cfg["ckpt_path"] = str(ckpt)
            # Lightning's CSVLogger appends to metrics.csv here, despite its warning that it would delete it
            warnings.filterwarnings("ignore", message=".*exists and is not empty. Previous log files.*")
            print(f"[peftlab] resuming from {ckpt}")

        def after_fit(self):
            trainer, model = self.trainer, self.model
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            results = {}
            if self.config_value("test_after_fit") and not trainer.interrupted and trainer.datamodule is not None:
                results = trainer.test(model, datamodule=self.datamodule, ckpt_path="best" if best else None,
                                       verbose=False)
                results = results[0] if results else {}
            log_dir = trainer.log_dir  # a collective under a distributed strategy: every rank must ask
            if trainer.is_global_zero:
                _print_summary(model, trainer, log_dir, best, results, time.time() - self._started)

        def after_predict(self):
            trainer = self.trainer
            log_dir = trainer.log_dir  # a collective under a distributed strategy: every rank must ask
            if not trainer.is_global_zero or not trainer.predict_loop.predictions:
                return
            path = self.config_value("predictions_file") or os.path.join(log_dir or ".", "predictions.jsonl")
            n = write_predictions(path, trainer.predict_loop.predictions, self.datamodule)
            print(f"[peftlab] wrote {n} predictions to {path}")

        def config_value(self, key):
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            return cfg.get(key)

    return PeftLabCLI


def _normalise(value):
    return list(value) if isinstance(value, (list, tuple)) else value


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


def _print_summary(model, trainer, log_dir, best, results, seconds):
    pct = 100.0 * model.trainable_count / model.total_count
    lines = [f"method      {type(model).__name__} on {model.hparams.backbone}",
             f"trainable   {model.trainable_count:,} / {model.total_count:,} parameters ({pct:.4f}%)"]
    cb = trainer.checkpoint_callback
    if cb is not None and cb.monitor and cb.best_model_score is not None:
        lines.append(f"best        {cb.monitor} = {float(cb.best_model_score):.4f}")
    if best:
        lines.append(f"checkpoint  {best}")
    adapter = next((d for d in (os.path.join(log_dir or "", "adapter", n) for n in ("best", "last"))
                    if log_dir and os.path.isdir(d)), None)
    if adapter:
        lines.append(f"adapter     {adapter}")
    for key in sorted(results):
        lines.append(f"{key:<11} {results[key]:.4f}")
    if log_dir:
        lines.append(f"run dir     {log_dir}")
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


TOP_LEVEL_HELP = """usage: peftlab [-h] {{fit,validate,test,predict,merge,compose,plot,params,estimate-memory,recommend}} ...

{description}

commands:
  fit                 train a method (then test it with the best checkpoint); --help lists every option
  validate            evaluate on the validation split
  test                evaluate on the test split
  predict             write predictions for the test split (or a file) to .jsonl/.csv
  merge               merge a trained LoRA/QLoRA into a plain transformers model
  compose             combine several LoRAs by weighted sum
  plot                PNG learning curves from a run's metrics
  params              exact trainable/total parameter counts of a config (no weights read)
  estimate-memory     training memory estimate for a config or a model size
  recommend           recommend a method for a backbone, data size and memory budget

examples:
  peftlab fit --config configs/quickstart.yaml
  peftlab fit --config configs/quickstart.yaml --print_config > run.yaml
  peftlab fit --help                  # every option of fit (LightningCLI)
  peftlab fit --model.help LoRA       # the arguments of one method
Errors print one line; add --debug for the traceback. Docs: docs/index.md."""


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``peftlab`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    # like `python -m`, make modules in the working directory importable (class_path: examples.bitfit.BitFit)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    if argv in ([], ["-h"], ["--help"]):
        # the top-level help lists commands only, so it is printed without importing Lightning (2.5 s of
        # torch/_dynamo/torchmetrics imports plus 1.2 s to build LightningCLI's parser, docs/benchmarks.md);
        # `peftlab fit --help` is LightningCLI's own, complete help
        print(TOP_LEVEL_HELP.format(description=DESCRIPTION))
        if not argv:
            sys.exit(2)
        return None
    try:
        from peftlab.compat import unmet_requirements

        problem = unmet_requirements()  # before anything is loaded: a library outside peftlab's declared range
        if problem:
            raise PeftLabError(problem)
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
                save_config_callback=cli_class.save_config_class,
                save_config_kwargs={"overwrite": True},
                # parse errors raise (instead of printing the whole usage), and main() prints one line for them
                parser_kwargs={"default_env": False, "prog": "peftlab", "description": _description(),
                               "exit_on_error": False,
                               **{c: {"exit_on_error": False} for c in ("fit", "validate", "test", "predict")}},
                auto_configure_optimizers=False,
                # peftlab prints trainable / total parameters itself; Lightning's table adds a FLOPs column that
                # reads 0 for every run (--trainer.enable_model_summary true brings it back)
                trainer_defaults={"enable_model_summary": False},
            )
        finally:
            sys.argv = saved
    except Exception as err:  # noqa: BLE001 - only PeftLabError is turned into a message, the rest re-raises
        user_error = _find_user_error(err) or _out_of_memory(err) or _argument_error(err, argv)
        if debug or user_error is None:
            raise
        print(f"peftlab: error: {user_error}", file=sys.stderr)
        sys.exit(2)


def _argument_error(err: BaseException, argv: list[str]) -> PeftLabError | None:
    """One line for a jsonargparse parse error (which would otherwise print the whole usage and a nested
    report of every Union branch it tried), naming the key, what was wrong and what to do."""
    from jsonargparse import ArgumentError

    if not isinstance(err, ArgumentError):
        return None
    subcommand = next((a for a in argv if not a.startswith("-")), "fit")
    hint = f"see `peftlab {subcommand} --help`"
    return PeftLabError(f"{_explain_argument_error(str(err), argv)}; {hint}")


def _broken_config(argv: list[str]) -> str | None:
    """The first ``--config`` file of ``argv`` that YAML cannot parse, with the line of the problem."""
    import yaml

    for flag, value in zip(argv, argv[1:]):
        if flag in ("--config", "-c") and os.path.isfile(value):
            try:
                yaml.safe_load(Path(value).read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError) as err:
                mark = getattr(err, "problem_mark", None)
                return f"{value}" + (f" (line {mark.line + 1})" if mark is not None else "")
    return None


def _explain_argument_error(text: str, argv: list[str]) -> str:
    import re

    keys = re.findall(r'Parser key "([^"]+)"', text)
    class_path = re.search(r"Problem with given class_path '([^']+)':", text)
    key = ".".join(k for k in keys if k)  # "model" + "r" -> model.r, made model.init_args.r below
    if class_path and keys and keys[0] in ("model", "data") and len(keys) > 1:
        key = f"{keys[0]}.init_args.{'.'.join(keys[1:])}"
    method = class_path.group(1).rsplit(".", 1)[-1] if class_path else None
    if m := re.search(r"Option '([^']+)' is not accepted", text):
        where = f"{keys[0]}.init_args" if keys else "the config"
        return f"{where}.{m.group(1)} is not an argument of {method or 'this class'}" + _close_argument(
            class_path.group(1) if class_path else None, m.group(1))
    if m := re.search(r"has no attribute '([^']+)'|No module named '([^']+)'", text):
        from peftlab.errors import did_you_mean
        import peftlab

        name = class_path.group(1) if class_path else (m.group(1) or m.group(2))
        return f"cannot find class {name!r} ({keys[0] if keys else 'class_path'})" + did_you_mean(
            name.rsplit(".", 1)[-1], peftlab.__all__)
    if m := re.search(r"Expected a typing\.Literal\[(.*?)\]\. Got value: (.*)", text):
        choices = m.group(1).replace("'", "")
        return f"{key or 'a value'} must be one of {choices} (got {m.group(2).strip()!r})"
    if m := re.search(r"Expected a <class '(\w+)'>\. Got value: (.*)", text):
        return f"{key or 'a value'} must be of type {m.group(1)} (got {m.group(2).strip()!r})"
    if m := re.search(r"unrecognized arguments: (.*)", text):
        return f"unknown option(s) {m.group(1).strip()}"
    if m := re.search(r"File does not exist: '([^']+)'", text):
        return f"config file {m.group(1)} does not exist"
    if "Problems parsing config" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip() and "<unicode string>" not in line]
        return f"{_broken_config(argv) or 'a --config file'} is not valid YAML ({' '.join(lines)[-120:]})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = next((line for line in reversed(lines) if not line.startswith(("Given value", "- Expected a <class 'NoneType'>",
                                                                            "Subtypes:", "Errors:"))), text)
    return f"{key + ': ' if key else ''}{detail}"


def _close_argument(class_path: str | None, name: str) -> str:
    """' Did you mean ...?' for a misspelt init argument of ``class_path`` (its signature and its bases')."""
    if not class_path:
        return ""
    import importlib
    import inspect

    from peftlab.errors import did_you_mean

    try:
        module, _, cls_name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError, ValueError):
        return ""
    params = {p for klass in inspect.getmro(cls) if "__init__" in vars(klass)
              for p in inspect.signature(klass.__init__).parameters if p not in ("self", "args", "kwargs")}
    close = did_you_mean(name, sorted(params)) if params else ""
    return f" (it takes: {', '.join(sorted(params))})" if params and not close else close


def _out_of_memory(err: BaseException | None) -> PeftLabError | None:
    """Advice for running out of (GPU or host) memory, or None if ``err`` is something else."""
    while err is not None:
        if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or \
                "out of memory" in str(err).lower()[:200]:
            return PeftLabError(
                f"out of memory ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}). "
                "Lower data.batch_size (and raise trainer.accumulate_grad_batches to keep the effective batch), "
                "lower data.max_length, turn on model.gradient_checkpointing (LoRA, QLoRA, adapters, full "
                "fine-tuning), load the backbone with model.dtype bfloat16, or use QLoRA; "
                "`peftlab estimate-memory --config FILE` tells what fits before you start"
            )
        err = err.__cause__ or err.__context__
    return None


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
