"""``seqnorm`` console script."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqnorm",
        description="Padding-aware LayerNorm / RMSNorm / BatchNorm / PowerNorm for sequence models.",
    )
    parser.add_argument("--version", action="version", version=f"seqnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("demo", help="print the note's worked example (the default command)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in (None, "demo"):
        from .demo import main as demo_main

        return demo_main()
    return 2  # pragma: no cover - argparse rejects unknown commands first


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
