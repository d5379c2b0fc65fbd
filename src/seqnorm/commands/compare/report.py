"""``seqnorm compare``, report: the summary as a table (text, markdown, JSON),
the runs as CSV, the curves as PNG figures."""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Dict, List

import numpy as np

from ...models import NORMS
from .compute import Run


def _fmt(v, pct=True):
    if v is None:
        return "—"
    m, s = v
    return f"{100 * m:.1f} ± {100 * s:.1f}" if pct else f"{m:.3g} ± {s:.2g}"


HEADERS = ["task", "norm", "val acc %", "train-mode acc %", "gap (pts)", "bucketed %", "shuffled %",
           "batch size 1 %", "‖μ_B−μ‖/d", "‖σ²_B−σ²‖/d", "‖σ²_B−σ²‖/‖σ²‖"]


def table_rows(rows: List[Dict]) -> List[List[str]]:
    out = []
    for r in rows:
        out.append([r["task"], r["norm"], _fmt(r["val_acc"]), _fmt(r["train_mode_acc"]), _fmt(r["gap"]),
                    _fmt(r["acc_bucketed"]), _fmt(r["acc_shuffled"]), _fmt(r["acc_bs1"]),
                    _fmt(r["fluct_mean"], False), _fmt(r["fluct_var"], False), _fmt(r["fluct_rel"], False)])
    return out


def render_table(rows: List[Dict], headers: List[str], body: List[List[str]], fmt: str) -> str:
    """``rows`` as JSON, or ``body`` under ``headers`` as a markdown or an aligned text table
    (shared by every ``seqnorm compare`` task)."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "markdown":
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def render(rows: List[Dict], fmt: str) -> str:
    return render_table(rows, HEADERS, table_rows(rows), fmt)


def rounded(obj, digits: int = 5):
    """``obj`` with every float cut to ``digits`` significant digits (the curves are long)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def write_csv(runs: List[Run], path: str) -> None:
    fields = ["task", "norm", "seed", "val_acc", "train_mode_acc", "gap", "acc_bucketed", "acc_shuffled",
              "acc_bs1", "fluct_mean", "fluct_var", "fluct_rel", "seconds"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in runs:
            w.writerow({k: getattr(r, k) for k in fields})


def plot(runs: List[Run], out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    task_names = sorted({r.task for r in runs})
    colors = dict(zip(NORMS, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, len(task_names), figsize=(6 * len(task_names), 4), squeeze=False)
    for ax, task in zip(axes[0], task_names):
        for norm in NORMS:
            rs = [r for r in runs if r.task == task and r.norm == norm]
            if not rs:
                continue
            acc = np.array([r.curve_acc for r in rs]) * 100
            steps = rs[0].curve_steps
            mean, std = acc.mean(0), acc.std(0)
            ax.plot(steps, mean, label=norm, color=colors[norm])
            ax.fill_between(steps, mean - std, mean + std, color=colors[norm], alpha=0.2)
        ax.set_title(f"{task}: validation accuracy (eval mode), mean ± std over seeds")
        ax.set_xlabel("training step")
        ax.set_ylabel("accuracy %")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)

    panels = (("fluct_mean_curve", "(1/d)‖μ_B − μ‖  (paper's Fig. 2, left)", ("pooled_batch", "masked_batch")),
              ("fluct_var_curve", "(1/d)‖σ²_B − σ²‖  (paper's Fig. 2, right)", ("pooled_batch", "masked_batch")),
              ("fluct_rel_curve", "‖σ²_B − σ²‖ / ‖σ²‖  (PowerNorm: ψ²)", ("pooled_batch", "masked_batch", "power")))
    fig, axes = plt.subplots(len(panels), len(task_names), figsize=(6 * len(task_names), 10), squeeze=False)
    for col, task in enumerate(task_names):
        for row, (attr, title, norms) in enumerate(panels):
            ax = axes[row][col]
            for norm in norms:
                rs = [r for r in runs if r.task == task and r.norm == norm and r.fluct_steps]
                if not rs:
                    continue
                n = min(len(r.fluct_steps) for r in rs)
                vals = np.array([getattr(r, attr)[:n] for r in rs]).mean(0)   # mean over seeds
                ax.plot(rs[0].fluct_steps[:n], vals, label=norm, color=colors[norm], lw=1)
            ax.set_title(f"{task}: {title}", fontsize=10)
            ax.set_yscale("log")
            ax.set_xlabel("training step")
            if ax.lines:
                ax.legend(fontsize=8)
    fig.suptitle("batch statistics vs running statistics during training (mean over layers and seeds)")
    fig.tight_layout()
    path = os.path.join(out_dir, "fluctuation.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths


