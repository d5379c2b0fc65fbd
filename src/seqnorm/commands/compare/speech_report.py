"""``seqnorm compare --tasks speech``, report: the table (text, markdown, JSON), ``speech.csv``
(one row per variant × seed × evaluation) and ``speech.png``."""

from __future__ import annotations

import csv
from typing import Dict, List

import numpy as np

from .report import render_table
from .speech_train import EVALS, VARIANTS, SpeechRun

HEADERS = ["variant", "seeds", "DER alone %", "DER batched %", "DER sorted %", "batched − alone (pts)",
           "changed batched %", "changed sorted %", "train CTC loss", "BN running-μ gap", "BN running-σ² gap"]

#: ``changed_from_alone``: % of test utterances decoded otherwise in this evaluation than alone
CSV_FIELDS = ["variant", "seed", "eval", "der", "changed_from_alone", "train_loss", "rs_mean_gap", "rs_var_gap",
              "seconds", "cpu_seconds"]


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "—"
    m, s = v
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def table_rows(rows: List[Dict]) -> List[List[str]]:
    return [[r["variant"], str(r["seeds"]), _fmt(r["alone"]), _fmt(r["batched"]), _fmt(r["sorted"]),
             _fmt(r["batched_minus_alone"]), _fmt(r["changed_batched"]), _fmt(r["changed_sorted"]),
             _fmt(r["train_loss"], 3), _fmt(r["rs_mean_gap"], 3),
             _fmt(r["rs_var_gap"], 3)] for r in rows]


def render(rows: List[Dict], fmt: str) -> str:
    return render_table(rows, HEADERS, table_rows(rows), fmt)


def write_csv(runs: List[SpeechRun], path: str) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in runs:
            for e in EVALS:
                w.writerow(dict(variant=r.variant, seed=r.seed, eval=e, der=round(r.der[e], 4),
                                changed_from_alone=round(r.changed[e], 4),
                                train_loss=round(r.train_loss, 5),
                                rs_mean_gap=None if r.rs_mean_gap is None else round(r.rs_mean_gap, 5),
                                rs_var_gap=None if r.rs_var_gap is None else round(r.rs_var_gap, 5),
                                seconds=round(r.seconds, 1), cpu_seconds=round(r.cpu_seconds, 1)))


def plot(runs: List[SpeechRun], path: str) -> str:
    """Left: DER per variant and evaluation (bars: mean over seeds; ticks: each seed). Right:
    the training CTC loss (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in VARIANTS if any(r.variant == v for r in runs)]
    fig, (ax, lx) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(EVALS)
    colors = dict(zip(EVALS, ("tab:blue", "tab:red", "tab:green")))
    for k, e in enumerate(EVALS):
        for j, v in enumerate(variants):
            vals = [r.der[e] for r in runs if r.variant == v]
            x = j + (k - (len(EVALS) - 1) / 2) * width
            ax.bar(x, np.mean(vals), width, color=colors[e], alpha=0.7, label=e if j == 0 else None)
            ax.scatter([x] * len(vals), vals, color="black", s=8, zorder=3)
    ax.set_xticks(range(len(variants)), variants, rotation=15)
    ax.set_ylabel("digit error rate % (held-out voices)")
    ax.set_title("DER decoded alone / batched with 2–4× longer / length-sorted")
    ax.legend(fontsize=8)
    cmap = plt.get_cmap("tab10").colors
    for j, v in enumerate(variants):
        rs = [r for r in runs if r.variant == v]
        n = min(len(r.loss_curve) for r in rs)
        lx.plot(rs[0].loss_steps[:n], np.mean([r.loss_curve[:n] for r in rs], 0), label=v, color=cmap[j])
    lx.set_yscale("log")
    lx.set_xlabel("training step")
    lx.set_ylabel("CTC loss (train batches)")
    lx.set_title("training loss, mean over seeds")
    lx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
