"""``seqnorm`` console script: ``explain`` (the default; ``seqnorm`` alone and
``python -m seqnorm`` run it on the note's example), ``bench`` and ``compare``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import __version__


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 2, never a traceback."""

    def error(self, message):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .explain.command import add_arguments

    parser = _OneLineParser(
        prog="seqnorm",
        description="Padding-aware LayerNorm / RMSNorm / BatchNorm / PowerNorm for sequence models.",
    )
    parser.add_argument("--version", action="version", version=f"seqnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    explain = sub.add_parser("explain", help="show what each norm pools and computes, step by step "
                                             "(the default command; default input: the note's example)")
    add_arguments(explain)
    from .bench import add_arguments as bench_arguments

    bench = sub.add_parser("bench", help="time the fused kernels against torch (see benchmarks/RESULTS.md)")
    bench_arguments(bench)
    from .experiments.compare import add_arguments as compare_arguments

    compare = sub.add_parser("compare", help="train the note's Transformer with every norm and compare "
                                             "(quick by default, --full for tighter bands)")
    compare_arguments(compare)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["explain"] + argv  # explain is the default command
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from .bench import run as run_bench

        return run_bench(args)
    if args.command == "compare":
        from .experiments.compare import run as run_compare

        return run_compare(args)
    from .explain.command import run

    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
