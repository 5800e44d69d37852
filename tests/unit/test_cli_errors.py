"""peftlab/cli_errors.py: jsonargparse's errors (and the other failures a user can act on) in one line.

The inputs are the errors real jsonargparse parsers raise: `peftlab fit`'s own parser (through `main(...,
"--debug")`, which re-raises the original exception) and the parsers of the command table. A jsonargparse
release that rewords an error therefore fails here, with the message it now gives."""

from __future__ import annotations

from typing import Literal

import pytest
from jsonargparse import ArgumentError

from conftest import ROOT
from peftlab import cli_errors
from peftlab.cli import main
from peftlab.errors import PeftLabError

QS = str(ROOT / "configs/quickstart.yaml")


def init_arguments(cls) -> str:
    """The init arguments of ``cls`` and its bases, as the message lists them."""
    import inspect

    names = {p for klass in inspect.getmro(cls) if "__init__" in vars(klass)
             for p in inspect.signature(klass.__init__).parameters if p not in ("self", "args", "kwargs")}
    return ", ".join(sorted(names))


def fit_error(argv: list[str]) -> ArgumentError:
    """The exception `peftlab fit ARGV` raises (before anything is built: parse errors come first)."""
    with pytest.raises(ArgumentError) as info:
        main([*argv, "--debug"])
    return info.value


# ------------------------------------------------------------------------------------------ peftlab fit
FIT = [
    ("misspelt_option", ["--model.init_args.alhpa", "8"],
     "model.init_args.alhpa is not an argument of LoRA Did you mean 'alpha'?; see `peftlab fit --help`"),
    ("bad_type", ["--model.init_args.r", "eight"], "model.init_args.r must be of type int (got 'eight'); see "
                                                   "`peftlab fit --help`"),
    ("bad_literal", ["--data.task", "regression"],
     "data.task must be one of classification, causal_lm, seq2seq, chat (got 'regression'); see `peftlab fit --help`"),
    ("unknown_module", ["--model", "nope.Nope"], "cannot find class 'nope.Nope' (model); see `peftlab fit --help`"),
    ("unrecognized", ["--bogus"], "unknown option(s) --bogus; see `peftlab fit --help`"),
]


@pytest.mark.parametrize("extra, expected", [c[1:] for c in FIT], ids=[c[0] for c in FIT])
def test_fit_parse_errors_in_one_line(extra, expected):
    argv = ["fit", "--config", QS, *extra]
    message = cli_errors.argument_error(fit_error(argv), argv)
    assert isinstance(message, PeftLabError)
    assert str(message) == expected


def test_unknown_option_lists_the_arguments_of_the_class():
    from peftlab.methods import LoRA

    argv = ["fit", "--config", QS, "--model.init_args.rank", "8"]
    assert str(cli_errors.argument_error(fit_error(argv), argv)) == \
        f"model.init_args.rank is not an argument of LoRA (it takes: {init_arguments(LoRA)}); see `peftlab fit --help`"


def test_unknown_class_path_suggests_a_method():
    argv = ["fit", "--config", QS, "--model.class_path", "peftlab.methods.LoRAA"]
    message = str(cli_errors.argument_error(fit_error(argv), argv))
    assert message.startswith("cannot find class 'peftlab.methods.LoRAA' (model) Did you mean 'LoRA'")
    assert message.endswith("?; see `peftlab fit --help`") and "\n" not in message


def test_missing_config_file(tmp_path):
    argv = ["test", "--config", str(tmp_path / "nope.yaml")]
    assert str(cli_errors.argument_error(fit_error(argv), argv)) == \
        f"config file {tmp_path / 'nope.yaml'} does not exist; see `peftlab test --help`"


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_steps: 4\nmodel: [unclosed\n")
    argv = ["fit", "--config", str(broken)]
    message = str(cli_errors.argument_error(fit_error(argv), argv))
    assert message.startswith(f"{broken} (line 4) is not valid YAML (") and "did not find expected ','" in message
    assert message.endswith("; see `peftlab fit --help`") and "\n" not in message
    assert cli_errors.broken_config(argv) == f"{broken} (line 4)"
    assert cli_errors.broken_config(["fit", "--config", QS]) is None


def test_user_error_picks_the_right_translation():
    wrapped = RuntimeError("while instantiating")
    wrapped.__cause__ = PeftLabError("data.batch_size must be >= 1 (got 0)")
    assert str(cli_errors.user_error(wrapped, ["fit"])) == "data.batch_size must be >= 1 (got 0)"
    assert cli_errors.user_error(ValueError("a bug"), ["fit"]) is None  # a bug keeps its traceback
    argv = ["fit", "--config", QS, "--bogus"]
    assert str(cli_errors.user_error(fit_error(argv), argv)).startswith("unknown option(s) --bogus")


def test_out_of_memory_advice():
    import torch

    for err in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), MemoryError()):
        advice = str(cli_errors.out_of_memory(err))
        assert advice.startswith(f"out of memory ({type(err).__name__}") and "data.batch_size" in advice
        assert "estimate-memory" in advice
    chained = RuntimeError("step failed")
    chained.__context__ = torch.OutOfMemoryError("CUDA out of memory")
    assert cli_errors.out_of_memory(chained) is not None
    assert cli_errors.out_of_memory(ValueError("no")) is None


def test_find_user_error_follows_causes_and_stops_on_cycles():
    inner = PeftLabError("the fix")
    outer = RuntimeError("outer")
    outer.__cause__ = inner
    assert cli_errors.find_user_error(outer) is inner
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert cli_errors.find_user_error(a) is None


def test_close_argument():
    assert cli_errors.close_argument("peftlab.methods.LoRA", "alhpa") == " Did you mean 'alpha'?"
    from peftlab.methods import LoRA

    assert cli_errors.close_argument("peftlab.methods.LoRA", "zzz") == f" (it takes: {init_arguments(LoRA)})"
    assert cli_errors.close_argument("nope.Nope", "r") == ""
    assert cli_errors.close_argument(None, "r") == ""


# ------------------------------------------------------------------------------------------ params / estimate-memory
def test_one_line_of_fit_parser_errors_for_params(tmp_path):
    """`peftlab params` parses with fit's parser; one_line keeps the most specific line of its errors."""
    from peftlab.analysis.params import parse_fit_config

    with pytest.raises(PeftLabError) as info:
        parse_fit_config(["--config", QS, "--model.rank", "3"])
    assert str(info.value).startswith("Option 'rank' is not accepted (in the config files or overrides given to "
                                      "peftlab params;")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(PeftLabError) as info:
        parse_fit_config(["--config", str(broken)])
    assert str(info.value).startswith("invalid YAML: Problems parsing config: while parsing a flow sequence in "
                                      "the file, line 1, column 8")
    assert cli_errors.one_line("") == "invalid arguments"


# ------------------------------------------------------------------------------------------ the command table
def example(run: str, /, *, mode: Literal["exact", "linear"] = "exact",
            precision: Literal["fp32", "bf16"] | None = None, count: int | None = None,
            weights: list[float] | None = None, output: str, force: bool = False) -> None:
    """An example command.

    Args:
        run: a run directory
        mode: how
        precision: in what
        count: how many
        weights: one per run
        output: where
        force: whether
    """

@pytest.fixture
def example_parser(monkeypatch):
    from peftlab import commands

    monkeypatch.setitem(commands.COMMANDS, "example", commands.Command(f"{__name__}:example", "An example command."))
    return commands.build_parser("example")


COMMAND = [
    ("literal", ["r", "--output", "o", "--mode", "fast"],
     "argument --mode: invalid choice: 'fast' (choose from exact, linear)"),
    ("optional_literal", ["r", "--output", "o", "--precision", "fp8"],
     "argument --precision: invalid choice: 'fp8' (choose from fp32, bf16)"),
    ("optional_int", ["r", "--output", "o", "--count", "many"], "argument --count: invalid int value: 'many'"),
    ("list_element", ["r", "--output", "o", "--weights", "0.5", "half"], "argument --weights: invalid float value: "
                                                                         "'half'"),
    ("bool", ["r", "--output", "o", "--force", "maybe"], "unknown argument 'maybe'"),
    ("bool_value", ["r", "--output", "o", "--force=maybe"], "argument --force: invalid bool value: 'maybe'"),
    ("required_option", ["r"], "the following arguments are required: --output"),
    ("required_positional", ["--output", "o"], "the following arguments are required: RUN"),
    ("unrecognized", ["r", "--output", "o", "--frobnicate"], "unknown argument '--frobnicate'"),
    ("extra_positional", ["r", "s", "--output", "o"], "unknown argument 's'"),
]


@pytest.mark.parametrize("argv, expected", [c[1:] for c in COMMAND], ids=[c[0] for c in COMMAND])
def test_command_parse_errors_in_argparse_words(example_parser, argv, expected):
    from peftlab.commands import normalize_argv

    with pytest.raises(ArgumentError) as info:
        example_parser.parse_args(normalize_argv(example, argv))
    assert cli_errors.command_error(str(info.value), "example", {"run": "RUN"}) == \
        f"{expected}; see `peftlab example --help`"


def test_command_errors_through_main(capsys):
    """The real commands: one line on stderr, exit status 2."""
    for argv, expected in ((["estimate-memory", "--size", "7b", "--precision", "fp8"],
                            "argument --precision: invalid choice: 'fp8' (choose from fp32, bf16, fp16); see "
                            "`peftlab estimate-memory --help`"),
                           (["compose", "a", "b", "--output", "x"],
                            "the following arguments are required: --weights; see `peftlab compose --help`"),
                           (["compose", "--weights", "1", "--output", "x"],
                            "the following arguments are required: ADAPTER [ADAPTER ...]; see "
                            "`peftlab compose --help`"),
                           (["merge", "--output", "x"], "the following arguments are required: RUN; see "
                                                         "`peftlab merge --help`")):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert capsys.readouterr().err == f"peftlab: error: {expected}\n"
