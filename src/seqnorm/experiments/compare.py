"""``seqnorm compare``: every norm on every task, several seeds, one table.

For each (task, norm, seed) the note's Transformer (:mod:`seqnorm.models`) is
trained with Adam on shuffled mini-batches, and we record:

* ``val_acc``: validation accuracy in eval mode (running statistics), and its
  curve over training;
* ``train_mode_acc``: the same validation batches with the model in *train*
  mode (batch statistics, on a copy so no statistic moves); ``gap`` =
  ``val_acc − train_mode_acc`` — what a batch-statistic norm pays for the
  difference between the batches it trained on and the running statistics;
* composition sensitivity, in train mode: accuracy with length-bucketed
  batches, shuffled batches and batch size 1 (row-wise norms do not depend on
  the batch, so their three numbers coincide);
* batch-statistic fluctuation, as the PowerNorm paper measures it (its
  Figure 2: "average Euclidean distance" ``(1/d)‖μ_B − μ‖`` and
  ``(1/d)‖σ²_B − σ²‖`` between the batch's statistics and the running ones),
  for every SeqBatchNorm module, before each training step's update, averaged
  over modules; and, scale-free so that BatchNorm and PowerNorm can be set side
  by side, ``‖σ²_B − σ²‖ / ‖σ²‖`` (PowerNorm: its quadratic mean ψ² in place of
  σ²). Table values average the second half of training.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..models import NORMS, Encoder
from ..modules import PowerNorm, SeqBatchNorm
from . import tasks as T


@dataclass
class Config:
    tasks: List[str] = field(default_factory=lambda: list(T.TASKS))
    norms: List[str] = field(default_factory=lambda: list(NORMS))
    seeds: int = 2
    steps: int = 150
    batch_size: int = 32
    d_model: int = 32
    n_heads: int = 2
    d_ff: int = 64
    n_layers: int = 2
    prenorm: bool = False
    lr: float = 3e-3
    data_scale: float = 0.5
    eval_every: int = 25


QUICK = Config(tasks=["majority", "wordorder"], steps=400)
FULL = Config(seeds=5, steps=600, data_scale=1.0, eval_every=50)   # all tasks, the fixed-length control too


@dataclass
class Run:
    task: str
    norm: str
    seed: int
    val_acc: float
    train_mode_acc: float
    gap: float
    acc_bucketed: float
    acc_shuffled: float
    acc_bs1: float
    fluct_mean: Optional[float]
    fluct_var: Optional[float]
    fluct_rel: Optional[float]
    seconds: float
    curve_steps: List[int]
    curve_acc: List[float]
    fluct_steps: List[int]
    fluct_mean_curve: List[float]
    fluct_var_curve: List[float]
    fluct_rel_curve: List[float]


class _StatProbe:
    """Forward pre-hooks measuring how far each batch's statistics are from the
    running statistics (read before the module updates them)."""

    def __init__(self, model: nn.Module):
        self.mean_d: List[float] = []
        self.var_d: List[float] = []
        self.rel_d: List[float] = []
        self.handles = []
        for m in model.modules():
            if isinstance(m, (SeqBatchNorm, PowerNorm)):
                self.handles.append(m.register_forward_pre_hook(self._hook, with_kwargs=True))

    def _hook(self, module, args, kwargs):
        if not module.training:
            return
        x = args[0].detach()
        mask = kwargs.get("padding_mask")
        x2 = x.reshape(-1, x.shape[-1]).double()
        rows = x2 if mask is None else x2[~mask.reshape(-1)]
        if rows.shape[0] < 2:
            return
        d = x.shape[-1]
        if isinstance(module, PowerNorm):   # no mean kept: only ψ², relative, is compared
            running = module.running_phi.double()
            self.rel_d.append(float(((rows * rows).mean(0) - running).norm() / running.norm().clamp_min(1e-12)))
        else:
            running = module.running_var.double()
            var_b = rows.var(0)   # unbiased, as the running variance is kept
            self.mean_d.append(float((rows.mean(0) - module.running_mean.double()).norm() / d))
            self.var_d.append(float((var_b - running).norm() / d))
            self.rel_d.append(float((var_b - running).norm() / running.norm().clamp_min(1e-12)))

    def take(self):
        """(mean distance, variance distance, relative variance distance), each averaged over
        modules since the last call; None when nothing was measured (no batch-statistic module,
        or a batch with fewer than 2 real tokens), NaN for what PowerNorm does not keep."""
        def avg(v):
            return float(np.mean(v)) if v else float("nan")

        out = (avg(self.mean_d), avg(self.var_d), avg(self.rel_d)) if self.rel_d else None
        self.mean_d, self.var_d, self.rel_d = [], [], []
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def accuracy(model: nn.Module, batches, train_mode: bool = False) -> float:
    """Accuracy over ``batches``; in train mode on a copy (batch statistics, no update kept)."""
    m = copy.deepcopy(model) if train_mode else model
    m.train(train_mode)
    correct = total = 0
    for tokens, mask, labels in batches:
        pred = m(tokens, mask).argmax(-1)
        correct += int((pred == labels).sum())
        total += labels.numel()
    model.eval()
    return correct / max(total, 1)


def train_one(task: T.Task, norm: str, seed: int, cfg: Config, progress=None) -> Run:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Encoder(task.vocab_size, cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers, norm=norm,
                    prenorm=cfg.prenorm, num_classes=task.num_classes,
                    max_len=int(task.train.tokens.shape[1]))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # linear warm-up over the first 5 % of steps, then cosine decay to 10 %: the usual Transformer
    # recipe, and it keeps the final accuracies from jittering with the last few updates
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, max(0, i - warm) / max(1, cfg.steps - warm))))))
    loss_fn = nn.CrossEntropyLoss()
    val_batches = T.batches(task.val, cfg.batch_size, "shuffled", np.random.default_rng(1000 + seed))
    probe = _StatProbe(model)
    curve_steps, curve_acc, fl_steps, fl_mean, fl_var, fl_rel = [], [], [], [], [], []
    step = 0
    while step < cfg.steps:
        for tokens, mask, labels in T.batches(task.train, cfg.batch_size, "shuffled", rng):
            if step >= cfg.steps:
                break
            model.train()
            loss = loss_fn(model(tokens, mask), labels)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            measured = probe.take()
            if measured is not None:
                fl_steps.append(step)
                fl_mean.append(measured[0])
                fl_var.append(measured[1])
                fl_rel.append(measured[2])
            if step % cfg.eval_every == 0 or step == cfg.steps:
                curve_steps.append(step)
                curve_acc.append(accuracy(model, val_batches))
            if progress:
                progress(step)
    probe.remove()
    val_acc = curve_acc[-1]
    train_mode = accuracy(model, val_batches, train_mode=True)
    bucketed = accuracy(model, T.batches(task.val, cfg.batch_size, "bucketed", rng), train_mode=True)
    bs1 = accuracy(model, T.batches(task.val, 1, "bucketed", rng), train_mode=True)   # every val example alone

    def late(curve):   # second half of training; None when never measured
        vals = [v for v in curve[len(curve) // 2:] if not np.isnan(v)]
        return float(np.mean(vals)) if vals else None

    return Run(task.name, norm, seed, val_acc, train_mode, val_acc - train_mode, bucketed, train_mode, bs1,
               late(fl_mean), late(fl_var), late(fl_rel), time.perf_counter() - t0, curve_steps, curve_acc,
               fl_steps, fl_mean, fl_var, fl_rel)


class _Progress:
    def __init__(self, total_runs: int, steps: int, stream=sys.stderr):
        self.total, self.steps, self.stream = total_runs, steps, stream
        self.tty = stream.isatty()
        self.run = 0
        self.label = ""

    def start(self, label: str):
        self.run += 1
        self.label = label
        if not self.tty:
            print(f"[{self.run}/{self.total}] {label}", file=self.stream, flush=True)

    def __call__(self, step: int):
        if self.tty and (step % 5 == 0 or step == self.steps):
            done = int(20 * step / self.steps)
            print(f"\r[{self.run}/{self.total}] {self.label:28s} [{'#' * done}{'.' * (20 - done)}] "
                  f"step {step}/{self.steps}", end="", file=self.stream, flush=True)
            if step == self.steps:
                print(file=self.stream)


def run_all(cfg: Config, stream=sys.stderr) -> List[Run]:
    runs = []
    progress = _Progress(len(cfg.tasks) * len(cfg.norms) * cfg.seeds, cfg.steps, stream)
    for task_name in cfg.tasks:
        task = T.load(task_name, cfg.data_scale)
        for norm in cfg.norms:
            for seed in range(cfg.seeds):
                progress.start(f"{task_name}/{norm} seed {seed}")
                runs.append(train_one(task, norm, seed, cfg, progress))
    return runs


COLUMNS = ["task", "norm", "val_acc", "train_mode_acc", "gap", "acc_bucketed", "acc_shuffled", "acc_bs1",
           "fluct_mean", "fluct_var", "fluct_rel"]


def summarize(runs: List[Run]) -> List[Dict]:
    """One row per (task, norm): mean ± std over seeds."""
    rows = []
    keys = sorted({(r.task, r.norm) for r in runs}, key=lambda k: (k[0], NORMS.index(k[1])))
    for task, norm in keys:
        rs = [r for r in runs if r.task == task and r.norm == norm]
        row = dict(task=task, norm=norm, seeds=len(rs))
        for col in COLUMNS[2:]:
            vals = [getattr(r, col) for r in rs if getattr(r, col) is not None]
            row[col] = (float(np.mean(vals)), float(np.std(vals))) if vals else None
        rows.append(row)
    return rows


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


def render(rows: List[Dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    body = table_rows(rows)
    if fmt == "markdown":
        lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(HEADERS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADERS, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def _rounded(obj, digits: int = 5):
    """``obj`` with every float cut to ``digits`` significant digits (the curves are long)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
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

    panels = (("fluct_mean_curve", "(1/d)‖μ_B − μ‖  (paper's Fig. 2, left)", ("batch", "masked_batch")),
              ("fluct_var_curve", "(1/d)‖σ²_B − σ²‖  (paper's Fig. 2, right)", ("batch", "masked_batch")),
              ("fluct_rel_curve", "‖σ²_B − σ²‖ / ‖σ²‖  (PowerNorm: ψ²)", ("batch", "masked_batch", "power")))
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


def add_arguments(p) -> None:
    p.add_argument("--full", action="store_true", help=f"longer runs on all the data, {FULL.seeds} seeds (tighter bands; about 11 min on 2 cores)")
    p.add_argument("--tasks", help=f"comma list of {', '.join(T.TASKS)} (quick: {', '.join(QUICK.tasks)}; "
                                   f"full: all)")
    p.add_argument("--norms", default=",".join(NORMS), help=f"comma list of {', '.join(NORMS)}")
    p.add_argument("--seeds", type=int, help=f"seeds per (task, norm) (quick: {QUICK.seeds}, full: {FULL.seeds})")
    p.add_argument("--steps", type=int, help=f"training steps per run (quick: {QUICK.steps}, full: {FULL.steps})")
    p.add_argument("--data-scale", type=float, help=f"fraction of each task's examples (quick: {QUICK.data_scale}, full: {FULL.data_scale})")
    p.add_argument("--d-model", type=int, help=f"model width (default {QUICK.d_model}; heads: {QUICK.n_heads}, "
                                                 f"FFN: 2 × width)")
    p.add_argument("--layers", type=int, help=f"encoder layers (default {QUICK.n_layers})")
    p.add_argument("--prenorm", action="store_true", help="pre-norm layers (default: post-norm, as the note)")
    p.add_argument("--out", default="seqnorm-compare", help="output folder (default: ./seqnorm-compare)")
    p.add_argument("--format", choices=("text", "markdown", "json"), default="text")


def run(args) -> int:
    def fail(msg):
        print(f"seqnorm compare: error: {msg}", file=sys.stderr)
        return 2

    cfg = copy.deepcopy(FULL if args.full else QUICK)
    if args.tasks is not None:
        cfg.tasks = [t for t in args.tasks.split(",") if t]
    cfg.norms = [n for n in args.norms.split(",") if n]
    bad = [t for t in cfg.tasks if t not in T.TASKS]
    if bad or not cfg.tasks:
        return fail(f"--tasks: unknown task {bad or cfg.tasks}; choose from {', '.join(T.TASKS)}")
    bad = [n for n in cfg.norms if n not in NORMS]
    if bad or not cfg.norms:
        return fail(f"--norms: unknown norm {', '.join(bad) if bad else '(none)'}; choose from {', '.join(NORMS)}")
    for name, value, low in (("--seeds", args.seeds, 1), ("--steps", args.steps, 1), ("--layers", args.layers, 1),
                             ("--d-model", args.d_model, cfg.n_heads)):
        if value is not None and value < low:
            return fail(f"{name}: must be at least {low}, got {value}")
    if args.d_model is not None and args.d_model % cfg.n_heads:
        return fail(f"--d-model: must be a multiple of the {cfg.n_heads} heads, got {args.d_model}")
    if args.d_model is not None:
        cfg.d_model, cfg.d_ff = args.d_model, 2 * args.d_model
    cfg.n_layers = args.layers or cfg.n_layers
    if args.data_scale is not None and not 0 < args.data_scale <= 1:
        return fail(f"--data-scale: must lie in (0, 1], got {args.data_scale}")
    cfg.seeds = args.seeds or cfg.seeds
    cfg.steps = args.steps or cfg.steps
    cfg.data_scale = args.data_scale or cfg.data_scale
    cfg.eval_every = min(cfg.eval_every, cfg.steps)
    cfg.prenorm = args.prenorm
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, ".seqnorm-write-test")
        with open(probe, "w") as fh:
            fh.write("")
        os.remove(probe)
    except OSError as e:
        return fail(f"--out: cannot write to {args.out}: {e.strerror or e}")
    t0 = time.perf_counter()
    runs = run_all(cfg)
    rows = summarize(runs)
    print(render(rows, args.format))
    write_csv(runs, os.path.join(args.out, "runs.csv"))
    with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as fh:
        fh.write(render(rows, "markdown") + "\n")
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(_rounded(dict(config=asdict(cfg), rows=rows, runs=[asdict(r) for r in runs])), fh)
    plots = plot(runs, args.out)
    print(f"\n{len(runs)} runs in {time.perf_counter() - t0:.0f} s; wrote runs.csv, summary.md, summary.json, "
          f"{', '.join(os.path.basename(p) for p in plots)} to {args.out}", file=sys.stderr)
    return 0
