"""The ``seqnorm explain`` command: parse, compute, render, draw."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import List

import numpy as np

from .. import CommandError, fail
from .inputs import check_number, load_mask, load_tensor, load_tokens
from .lesson import NORMS, Lesson, compute_lesson
from .render import lesson_dict, render_markdown, render_text

NOTE_MATRIX = [[1.0, 2.0], [3.0, 4.0]]
NOTE_BATCH = [[[1.0, 2.0], [3.0, 4.0]], [[2.0, 3.0], [1.0, 4.0]]]
NOTE_TOKENS = [["你", "好"], ["谢", "谢"]]

#: past this many tokens or features the step-by-step text is no longer readable
#: (a 300 × 300 matrix prints 18 MB): say how to slice, unless --no-limit
MAX_TOKENS, MAX_FEATURES = 64, 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("input (default: the note's example)")
    src.add_argument("--x", metavar="JSON", help="nested list: 2-D (T, D) one sentence, 3-D (B, T, D) a batch")
    src.add_argument("--file", metavar="PATH", help=".json, .npy or .csv (2-D) file holding the tensor")
    src.add_argument("--padding-mask", metavar="JSON", help="bools of shape (T,) or (B, T), true = padding")
    src.add_argument("--lengths", metavar="N,N", help="real tokens per sentence, e.g. 3,2")
    src.add_argument("--tokens", metavar="LABELS", help="token labels: '你 好 / 谢 谢' or JSON")
    p.add_argument("--norm", choices=NORMS + ("batch", "all"), default="all",
                   help="which norm to explain (default: all; 'batch' = masked_batch)")
    p.add_argument("--eps", type=float, default=0.0, help="added to the variance; 0 by default, as in the note")
    p.add_argument("--digits", type=int, default=4, help="significant digits (default: 4)")
    p.add_argument("--format", choices=("text", "markdown", "json"), default="text")
    p.add_argument("--png", metavar="FILE", help="also draw the lesson to a PNG file")
    p.add_argument("--svg", metavar="FILE", help="also draw the lesson to an SVG file")
    p.add_argument("--no-limit", action="store_true",
                   help=f"explain inputs larger than {MAX_TOKENS} tokens × {MAX_FEATURES} features too")


def _lessons(args) -> List[Lesson]:
    eps = check_number(args.eps, "--eps")
    if not 1 <= args.digits <= 12:
        raise CommandError(f"--digits: expected 1 to 12, got {args.digits}")
    norms = NORMS if args.norm == "all" else (args.norm,)
    if args.x is None and args.file is None:
        if args.padding_mask or args.lengths or args.tokens:
            raise CommandError("--padding-mask, --lengths and --tokens need --x or --file")
        # The note: one sentence under BN and LN, then the batch of two sentences.
        note_norms = ("masked_batch", "layer") if args.norm == "all" else norms
        # Then the note's point: the same batch with a padding token at the end of each
        # sentence (the note's masked last row), so that BN's pooled statistics shift.
        padded = [sentence + [[0.0, 0.0]] for sentence in NOTE_BATCH]
        padded_tokens = [row + ["PAD"] for row in NOTE_TOKENS]
        pad_mask = [[False, False, True], [False, False, True]]
        return [compute_lesson(NOTE_MATRIX, norms=note_norms, eps=eps),
                compute_lesson(NOTE_BATCH, tokens=NOTE_TOKENS, norms=norms, eps=eps),
                compute_lesson(padded, pad_mask, padded_tokens, norms=norms, eps=eps)]
    x = load_tensor(args.x, args.file)
    tokens_n, features = int(np.prod(x.shape[:-1])), x.shape[-1]
    if not args.no_limit and (tokens_n > MAX_TOKENS or features > MAX_FEATURES):
        raise CommandError(f"{'--x' if args.x is not None else '--file'}: {tokens_n} tokens × {features} features is "
                           f"too large to explain readably (at most {MAX_TOKENS} × {MAX_FEATURES}); pass a slice "
                           f"(a few sentences, tokens and features) or add --no-limit")
    token_shape = x.shape[:-1]
    mask = load_mask(args.padding_mask, args.lengths, token_shape)
    tokens = load_tokens(args.tokens, token_shape)
    if tokens is not None and x.ndim == 2:
        tokens = tokens[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        lesson = compute_lesson(x, mask, tokens, norms=norms, eps=eps)
    for nl in lesson.norms:
        if not np.all(np.isfinite(nl.output)):
            raise CommandError(f"--eps: a {nl.norm} group has zero variance, so eps = 0 divides by zero; "
                             f"pass e.g. --eps 1e-5")
    return [lesson]


def _check_outputs(args) -> None:
    """Fail before computing anything if a figure cannot be written."""
    for path in (args.png, args.svg):
        if path:
            if importlib.util.find_spec("matplotlib") is None:
                raise CommandError("--png/--svg need matplotlib: pip install 'seqnorm[explain]'")
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise CommandError(f"cannot write {path}: no such directory {parent}")


def run(args) -> int:
    _check_outputs(args)
    lessons = _lessons(args)
    if args.format == "json":
        import json

        print(json.dumps({"lessons": [lesson_dict(l) for l in lessons]}, ensure_ascii=False, indent=2))
    elif args.format == "markdown":
        print("\n\n---\n\n".join(render_markdown(l, args.digits) for l in lessons))
    else:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        print("\n\n".join(render_text(l, args.digits, color=color) for l in lessons))
    for path in (args.png, args.svg):
        if path:
            from .figure import draw

            try:
                draw(lessons[-1], path, digits=min(args.digits, 3))
            except OSError as e:
                return fail("explain", f"cannot write {path}: {e.strerror or e}")
    return 0
