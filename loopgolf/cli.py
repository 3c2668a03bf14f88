"""The `loopgolf` command: one entry point and a table of subcommands.

Each subcommand lives in a module of :mod:`loopgolf.commands` with ``DESCRIPTION`` (per
command, optional) and ``register(name, parser)``, which adds the command's arguments and sets its
function; its one-line summary is in :data:`SUMMARIES`. Only the module of the command being run is imported (``loopgolf eval`` loads
no training code, ``loopgolf run`` no server); ``loopgolf --help`` lists the table. Tests call
:func:`main` with an argv list, or a command's function directly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
from collections.abc import Sequence

from loopgolf.commands.args import EXIT_BAD_INPUT

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a program its pipe's reader closed

# command -> module of loopgolf.commands that implements it, in the order `--help` lists them.
COMMANDS: dict[str, str] = {
    "run": "run",
    "train": "run",
    "eval": "eval",
    "convert": "convert",
    "submission": "submission",
    "data": "data",
    "params": "info",
    "presets": "info",
    "bench": "bench",
    "budget": "budget",
    "sweep": "lab",
    "runs": "lab",
    "report": "lab",
    "fit": "lab",
    "generate": "serve",
    "serve": "serve",
}
ALIASES = {"plan": "budget"}  # old names that still work
# One line per command for `loopgolf --help` (listed without importing the command modules).
SUMMARIES: dict[str, str] = {
    "run": "data -> train -> export -> roundtrip eval -> summary",
    "train": "data -> train -> checkpoint (no export); resume or finish with `run --resume`",
    "eval": "score a model (artifact, run or convert directory, checkpoint) on a validation split (official val_bpb)",
    "convert": "tie a trained model's layers into a recursive one (Stepwise/Average/... init, SVD LoRA)",
    "submission": "finished runs (seeds of one config) -> a Parameter Golf records folder with a generated train_gpt.py",
    "data": "build, fetch and inspect datasets (official shard format)",
    "params": "unique/effective params, FLOPs/token and the virtual-layer map (no training)",
    "presets": "list the named presets",
    "bench": "benchmarks: training throughput and MFU (bench train), serving engines and early exit (bench serve)",
    "budget": "predict artifact bytes before training; list the widest configurations that fit a cap",
    "sweep": "run a ledger's variants x seeds (resumable, parallel, into the results store)",
    "runs": "query the results store (or `runs add RUN_DIR` to add runs made outside a sweep)",
    "report": "a ledger's runs -> markdown report with significance tests and PNG plots",
    "fit": "fit the loss model (val_bpb in stored/effective params and tokens) on a dataset's runs in the store",
    "generate": "generate text from a model (KV cache per virtual layer, optional early exit)",
    "serve": "an OpenAI-style completions server (localhost) on a continuous-batching engine",
}


class HelpFormatter(argparse.HelpFormatter):
    """argparse's wrapping, except that it never breaks a line inside a hyphenated name (a preset,
    a ledger, an option such as ``record-ablation``), so help text can be searched for them."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """Argument errors as one line on stderr and exit 2, like every other bad input (argparse
    would print the whole usage first); ``--help`` shows the usage."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)  # subcommands' parsers are Parsers too
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def command_module(name: str):
    return importlib.import_module(f"loopgolf.commands.{COMMANDS[name]}")


def _chosen(argv: Sequence[str]) -> str | None:
    """The command ``argv`` runs (the first word that is not an option), if it is one."""
    for word in argv:
        if not word.startswith("-"):
            word = ALIASES.get(word, word)
            return word if word in COMMANDS else None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser with every command listed and the arguments of the command in ``argv`` (of
    every command when ``argv`` is None)."""
    from loopgolf import __version__

    parser = Parser(prog="loopgolf", description="Build, train, compress and score the best language model per stored byte.")
    parser.add_argument("--version", action="version", version=f"loopgolf {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else _chosen(argv)
    for name in COMMANDS:
        aliases = [a for a, target in ALIASES.items() if target == name]
        if argv is not None and name != chosen:
            sub.add_parser(name, help=SUMMARIES[name], aliases=aliases, add_help=False)
            continue
        module = command_module(name)
        p = sub.add_parser(name, help=SUMMARIES[name], description=module.DESCRIPTION.get(name) or SUMMARIES[name], aliases=aliases)
        module.register(name, p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not in the exit's flush
        return code
    except BrokenPipeError:
        # The reader went away (`loopgolf runs | head`): stop as a killed-by-SIGPIPE program does,
        # quietly, with stdout pointed at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (ValueError, OSError, FloatingPointError) as e:
        # User mistakes and bad inputs (bad values and files, a diverged run, a full or read-only
        # disk): one clear line, no traceback; --debug shows it.
        if args.debug:
            raise
        print(f"loopgolf {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
