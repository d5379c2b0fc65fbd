"""``seqnorm compare``, compute: train every norm on every task, several seeds.

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
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ...models import NORMS, Encoder
from ...modules import PowerNorm, SeqBatchNorm
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


def train_one(task: T.Task, norm: str, seed: int, cfg: Config) -> Run:
    """Train the encoder with ``norm`` on ``task`` from ``seed``; the measured :class:`Run`."""
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


def _one_thread_run(job: Tuple[str, float, str, int, Config]) -> Run:
    """One (task, norm, seed) run with one torch thread: the same bits in a worker
    process as in this one (torch's reductions may split differently across threads)."""
    task_name, scale, norm, seed, cfg = job
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_one(T.load(task_name, scale), norm, seed, cfg)
    finally:
        torch.set_num_threads(before)


def run_all(cfg: Config, workers: int = 1, on_done: Optional[Callable[[int, int, Run], None]] = None) -> List[Run]:
    """Every (task, norm, seed) run of ``cfg``, in that order. The runs are
    independent; with ``workers > 1`` they run in that many worker processes
    (spawned, one torch thread each) and give the same results as ``workers=1``.
    ``on_done(k, total, run)`` is called as each run finishes."""
    jobs = [(t, cfg.data_scale, n, s, cfg) for t in cfg.tasks for n in cfg.norms for s in range(cfg.seeds)]
    runs: List[Optional[Run]] = [None] * len(jobs)

    def done(i: int, run: Run) -> None:
        runs[i] = run
        if on_done:
            on_done(sum(r is not None for r in runs), len(jobs), run)

    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            done(i, _one_thread_run(job))
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")   # no fork of a process holding torch's thread pools
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            futures = {pool.submit(_one_thread_run, job): i for i, job in enumerate(jobs)}
            for fut in as_completed(futures):
                done(futures[fut], fut.result())
    return runs


def default_workers() -> int:
    """One worker per CPU this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # not on Linux
        return max(1, os.cpu_count() or 1)


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


