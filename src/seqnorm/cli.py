"""``seqnorm`` console script: ``explain`` (the default; ``seqnorm`` alone and
``python -m seqnorm`` run it on the note's example), ``bench``, ``compare`` and ``audit``."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from . import __version__
from .commands import guarded


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 2, never a traceback."""

    def error(self, message):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message}\n")


COMMANDS = {
    "explain": ("seqnorm.commands.explain.command", "show what each norm pools and computes, step by step "
                                                    "(the default command; default input: the note's example)"),
    "bench": ("seqnorm.commands.bench", "time the fused kernels against torch (see benchmarks/RESULTS.md)"),
    "compare": ("seqnorm.commands.compare.command", "train the note's Transformer with every norm and compare "
                                                    "(quick by default, --full for tighter bands)"),
    "audit": ("seqnorm.commands.audit", "find the layer where padding leaks into real steps (batched vs alone, "
                                        "vs more padding), before and after make_padding_safe"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="seqnorm",
        description="Padding-aware LayerNorm / RMSNorm / BatchNorm / PowerNorm for sequence models.",
    )
    parser.add_argument("--version", action="version", version=f"seqnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    for name, (module, help) in COMMANDS.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=help))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["explain"] + argv  # explain is the default command
    args = build_parser().parse_args(argv)
    return guarded(args.command, importlib.import_module(COMMANDS[args.command][0]).run, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
