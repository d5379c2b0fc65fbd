"""The ``seqnorm compare`` command: parse, run (in parallel workers), report."""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import asdict

from ... import kinds
from .. import CommandError
from . import tasks as T
from .compute import FULL, NORMS, QUICK, default_workers, run_all, summarize
from .report import rounded, plot, render, write_csv
from .speech_train import VARIANTS as SPEECH_VARIANTS


def add_arguments(p) -> None:
    p.add_argument("--full", action="store_true", help=f"longer runs on all the data, {FULL.seeds} seeds (tighter bands; about 11 min on 2 cores)")
    p.add_argument("--tasks", help=f"comma list of {', '.join(T.TASKS)} (quick: {', '.join(QUICK.tasks)}; "
                                   f"full: all), or speech: CTC speech models on espeak-ng digits, "
                                   f"stock vs padding-safe (needs espeak-ng)")
    p.add_argument("--variants", help=f"speech: comma list of {', '.join(SPEECH_VARIANTS)} (default: all; "
                                      f"quick: 2 seeds, 300 Parakeet / 600 wav2vec2 steps; full: 3 seeds, 800 / 1200)")
    p.add_argument("--norms", default=",".join(NORMS), help=f"comma list of {', '.join(NORMS)} ('batch' = pooled_batch, as before)")
    p.add_argument("--seeds", type=int, help=f"seeds per (task, norm) (quick: {QUICK.seeds}, full: {FULL.seeds})")
    p.add_argument("--steps", type=int, help=f"training steps per run (quick: {QUICK.steps}, full: {FULL.steps})")
    p.add_argument("--data-scale", type=float, help=f"fraction of each task's examples (quick: {QUICK.data_scale}, full: {FULL.data_scale})")
    p.add_argument("--d-model", type=int, help=f"model width (default {QUICK.d_model}; heads: {QUICK.n_heads}, "
                                                 f"FFN: 2 × width)")
    p.add_argument("--layers", type=int, help=f"encoder layers (default {QUICK.n_layers})")
    p.add_argument("--prenorm", action="store_true", help="pre-norm layers (default: post-norm, as the note)")
    p.add_argument("--out", default="seqnorm-compare", help="output folder (default: ./seqnorm-compare)")
    p.add_argument("--format", choices=("text", "markdown", "json"), default="text")
    p.add_argument("--workers", type=int, help="runs trained at once, each a process with one torch thread "
                                               "(default: one per CPU); results do not depend on it")


def _config(args):
    """The run's :class:`~.compute.Config` from the flags; CommandError on a bad one."""
    cfg = copy.deepcopy(FULL if args.full else QUICK)
    if args.tasks is not None:
        cfg.tasks = [t for t in args.tasks.split(",") if t and t != "speech"]
    speech_alone = not cfg.tasks and "speech" in (args.tasks or "").split(",")   # its own config: speech_command
    bad = [t for t in cfg.tasks if t not in T.TASKS]
    if bad or (not cfg.tasks and not speech_alone):
        raise CommandError(f"--tasks: unknown task {bad or cfg.tasks}; choose from {', '.join(T.TASKS)}, speech")
    names = [n for n in args.norms.split(",") if n]
    aliases = kinds.ALIASES["models"]
    bad = [n for n in names if n not in NORMS and n not in aliases]
    if bad or not names:
        raise CommandError(f"--norms: unknown norm {', '.join(bad) if bad else '(none)'}; choose from "
                           f"{', '.join(NORMS)}")
    cfg.norms = [aliases.get(n, n) for n in names]
    for name, value, low in (("--seeds", args.seeds, 1), ("--steps", args.steps, 1), ("--layers", args.layers, 1),
                             ("--d-model", args.d_model, cfg.n_heads), ("--workers", args.workers, 1)):
        if value is not None and value < low:
            raise CommandError(f"{name}: must be at least {low}, got {value}")
    if args.d_model is not None and args.d_model % cfg.n_heads:
        raise CommandError(f"--d-model: must be a multiple of the {cfg.n_heads} heads, got {args.d_model}")
    if args.d_model is not None:
        cfg.d_model, cfg.d_ff = args.d_model, 2 * args.d_model
    cfg.n_layers = args.layers or cfg.n_layers
    if args.data_scale is not None and not 0 < args.data_scale <= 1:
        raise CommandError(f"--data-scale: must lie in (0, 1], got {args.data_scale}")
    cfg.seeds = args.seeds or cfg.seeds
    cfg.steps = args.steps or cfg.steps
    cfg.data_scale = args.data_scale or cfg.data_scale
    cfg.eval_every = min(cfg.eval_every, cfg.steps)
    cfg.prenorm = args.prenorm
    return cfg


def _progress(k: int, total: int, run) -> None:
    print(f"[{k}/{total}] {run.task}/{run.norm} seed {run.seed}: val acc {100 * run.val_acc:.1f} % "
          f"({run.seconds:.0f} s)", file=sys.stderr, flush=True)


def run(args) -> int:
    cfg = _config(args)
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, ".seqnorm-write-test")
        with open(probe, "w") as fh:
            fh.write("")
        os.remove(probe)
    except OSError as e:
        raise CommandError(f"--out: cannot write to {args.out}: {e.strerror or e}") from None
    workers = args.workers or default_workers()
    speech = args.tasks is not None and "speech" in args.tasks.split(",")
    if speech:
        from .speech_command import run_speech

        if not cfg.tasks:
            return run_speech(args, workers)
        status = run_speech(args, workers)
        if status:
            return status
    t0 = time.perf_counter()
    runs = run_all(cfg, workers, _progress)
    rows = summarize(runs)
    print(render(rows, args.format))
    write_csv(runs, os.path.join(args.out, "runs.csv"))
    with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as fh:
        fh.write(render(rows, "markdown") + "\n")
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(rounded(dict(config=asdict(cfg), rows=rows, runs=[asdict(r) for r in runs])), fh)
    plots = plot(runs, args.out)
    print(f"\n{len(runs)} runs in {time.perf_counter() - t0:.0f} s; wrote runs.csv, summary.md, summary.json, "
          f"{', '.join(os.path.basename(p) for p in plots)} to {args.out}", file=sys.stderr)
    return 0
