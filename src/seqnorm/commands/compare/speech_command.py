"""``seqnorm compare --tasks speech``: synthesize (or read back) the data, train every
(variant, seed) in parallel workers, print the table, write ``speech.csv``, ``speech.json``
and ``speech.png`` under ``--out``."""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import asdict

from .. import CommandError
from . import speech_data as D
from . import speech_report as R
from . import speech_train as S
from .report import rounded


def speech_config(args) -> S.SpeechConfig:
    """The speech run's config from the compare flags: ``--full``, ``--seeds``, ``--steps``
    (both families), ``--data-scale`` (fraction of the utterances), ``--variants``."""
    cfg = copy.deepcopy(S.FULL if args.full else S.QUICK)
    if getattr(args, "variants", None):
        names = [v for v in args.variants.split(",") if v]
        bad = [v for v in names if v not in S.VARIANTS]
        if bad or not names:
            raise CommandError(f"--variants: unknown speech variant {', '.join(bad) if bad else '(none)'}; "
                               f"choose from {', '.join(S.VARIANTS)}")
        cfg.variants = names
    cfg.seeds = args.seeds or cfg.seeds
    if args.steps:
        cfg.parakeet_steps = cfg.wav2vec2_steps = args.steps
        cfg.log_every = min(cfg.log_every, args.steps)
    if args.data_scale:
        cfg.n_train = max(cfg.batch_size, round(cfg.n_train * args.data_scale))
        cfg.n_test = max(2, round(cfg.n_test * args.data_scale))
        cfg.stat_utterances = min(cfg.stat_utterances, cfg.n_train)
    return cfg


def _progress(k: int, total: int, run: S.SpeechRun) -> None:
    ders = ", ".join(f"{e} {run.der[e]:.1f}" for e in S.EVALS)
    print(f"[{k}/{total}] speech/{run.variant} seed {run.seed}: DER % {ders} ({run.seconds:.0f} s)",
          file=sys.stderr, flush=True)


def run_speech(args, workers: int) -> int:
    D.require_espeak()   # before anything is written: exit 2 naming the package
    cfg = speech_config(args)
    t0 = time.perf_counter()
    cache = os.path.join(args.out, "speech-data")
    train, test, synth_s = D.load_splits(cfg.n_train, cfg.n_test, cfg.data_seed, cache)
    hours = (train.seconds.sum() + test.seconds.sum()) / 3600
    print(f"speech data: {len(train)} training utterances ({len(D.TRAIN_VOICES)} voices), {len(test)} test "
          f"({len(D.TEST_VOICES)} held-out voices), {hours:.2f} h of audio, "
          + (f"synthesized in {synth_s:.0f} s" if synth_s else f"read from {cache}"), file=sys.stderr, flush=True)
    runs = S.run_all(cfg, cache, workers, _progress)
    rows = S.summarize(runs)
    for r in runs:   # a padding-safe model must decode every utterance as it does alone
        if r.variant.endswith("-safe") and any(r.changed.values()):
            print(f"warning: {r.variant} seed {r.seed} decoded "
                  + ", ".join(f"{v:.1f} % {e}" for e, v in r.changed.items() if v)
                  + " of the test utterances otherwise than alone: padding leaked", file=sys.stderr)
    print(R.render(rows, args.format))
    R.write_csv(runs, os.path.join(args.out, "speech.csv"))
    seconds = time.perf_counter() - t0
    with open(os.path.join(args.out, "speech.json"), "w", encoding="utf-8") as fh:
        json.dump(rounded(dict(config=asdict(cfg), synthesis_seconds=synth_s, total_seconds=seconds,
                               load_average=os.getloadavg(), rows=rows,
                               runs=[asdict(r) for r in runs])), fh)
    R.plot(runs, os.path.join(args.out, "speech.png"))
    cpu = sum(r.cpu_seconds for r in runs)
    print(f"\n{len(runs)} speech runs in {seconds:.0f} s (synthesis {synth_s:.0f} s, {workers} workers; the runs' "
          f"CPU time {cpu:.0f} s, load average {os.getloadavg()[0]:.1f}); wrote "
          f"speech.csv, speech.json, speech.png to {args.out}", file=sys.stderr)
    return 0
