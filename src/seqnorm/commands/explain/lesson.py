"""Compute the lesson: which values each norm pools, their statistics, the outputs.

The lesson is plain data (dataclasses of floats and index lists); rendering it
as text, markdown, JSON or a figure is :mod:`seqnorm.commands.explain.render` and
:mod:`seqnorm.commands.explain.figure`. Every number comes from :mod:`seqnorm.reference`;
nothing here normalizes anything itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ... import kinds, reference

#: the kinds explained (:mod:`seqnorm.kinds`); with padding, ``masked_batch`` is
#: preceded by ``pooled_batch``, the note's BatchNorm, to show what the pads move
NORMS = ("layer", "masked_batch", "rms", "power")

DESCRIPTIONS = {name: kinds.kind(name).description for name in NORMS + ("pooled_batch",)}
DESCRIPTIONS["power"] += "; in training ψ² is a running average, here it is this batch's own ψ_B²"


@dataclass
class Group:
    """One set of values that share a statistic."""

    label: str
    members: List[Tuple[int, int, int]]     # (b, t, d) positions pooled
    mean: Optional[float]                   # None for the uncentred norms (RMS, Power)
    var: float                              # σ², or the quadratic mean ψ² / mean(x²)
    inputs: List[float]
    outputs: List[float]

    @property
    def std(self) -> float:
        return float(np.sqrt(self.var))


@dataclass
class NormLesson:
    norm: str                               # a kind: layer | masked_batch | pooled_batch | rms | power
    description: str
    groups: List[Group]
    output: np.ndarray                      # (B, T, D)


@dataclass
class Lesson:
    x: np.ndarray                           # (B, T, D) float64
    padding_mask: np.ndarray                # (B, T) bool, True = padding
    tokens: List[List[str]]                 # (B, T) labels
    eps: float
    norms: List[NormLesson] = field(default_factory=list)

    @property
    def has_padding(self) -> bool:
        return bool(self.padding_mask.any())

    def moved(self) -> Optional[np.ndarray]:
        """|pooled BN − masked BN| at every real token (the note's argument), or None."""
        by = {n.norm: n.output for n in self.norms}
        if "masked_batch" not in by or "pooled_batch" not in by:
            return None
        return np.abs(by["pooled_batch"] - by["masked_batch"]) * (~self.padding_mask)[..., None]


def default_tokens(b: int, t: int) -> List[List[str]]:
    return [[f"{i}" if b == 1 else f"{bi}.{i}" for i in range(t)] for bi in range(b)]


def _rowwise_groups(x, mask, tokens, out, stats_mean, stats_var) -> List[Group]:
    groups = []
    b, t, d = x.shape
    for bi in range(b):
        for ti in range(t):
            if mask[bi, ti]:
                continue
            members = [(bi, ti, di) for di in range(d)]
            groups.append(Group(
                label=f"token {tokens[bi][ti]}",
                members=members,
                mean=None if stats_mean is None else float(stats_mean[bi, ti, 0]),
                var=float(stats_var[bi, ti, 0]),
                inputs=[float(x[m]) for m in members],
                outputs=[float(out[m]) for m in members],
            ))
    return groups


def _featurewise_groups(x, pool, out, mean, var, tokens) -> List[Group]:
    groups = []
    b, t, d = x.shape
    for di in range(d):
        members = [(bi, ti, di) for bi in range(b) for ti in range(t) if pool[bi, ti]]
        names = " ".join(tokens[bi][ti] for bi, ti, _ in members)
        groups.append(Group(
            label=f"feature {di} pools {len(members)} tokens ({names})",
            members=members,
            mean=None if mean is None else float(mean[di]),
            var=float(var[di]),
            inputs=[float(x[m]) for m in members],
            outputs=[float(out[m]) for m in members],
        ))
    return groups


def compute_lesson(x, padding_mask=None, tokens=None, norms: Sequence[str] = NORMS,
                   eps: float = 0.0) -> Lesson:
    """The lesson for ``x`` of shape ``(T, D)`` or ``(B, T, D)``."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
        padding_mask = None if padding_mask is None else np.asarray(padding_mask, bool)[None]
        tokens = None if tokens is None else [list(tokens)]
    b, t, d = x.shape
    mask = np.zeros((b, t), bool) if padding_mask is None else np.asarray(padding_mask, bool)
    tokens = tokens or default_tokens(b, t)
    lesson = Lesson(x=x, padding_mask=mask, tokens=tokens, eps=eps)
    real = ~mask
    for norm in norms:
        norm = kinds.resolve(norm, NORMS, "explain", "norm")
        if norm == "layer":
            y, c = reference.layer_norm_forward(x, eps=eps, padding_mask=mask)
            groups = _rowwise_groups(x, mask, tokens, y, c["mean"], c["var"])
        elif norm == "rms":
            y, c = reference.rms_norm_forward(x, eps=eps, padding_mask=mask)
            groups = _rowwise_groups(x, mask, tokens, y, None, c["var"])
        elif norm == "masked_batch":
            if lesson.has_padding:  # the note's BN first: pads pooled like tokens
                y, c = reference.seq_batch_norm_forward(x, eps=eps)
                pooled = _featurewise_groups(x, np.ones_like(mask), y, c["batch_mean"], c["batch_var"], tokens)
                lesson.norms.append(NormLesson("pooled_batch", DESCRIPTIONS["pooled_batch"], pooled, y))
            y, c = reference.seq_batch_norm_forward(x, eps=eps, padding_mask=mask)
            groups = _featurewise_groups(x, real, y, c["batch_mean"], c["batch_var"], tokens)
        elif norm == "power":
            _, c = reference.power_norm_forward(x, np.ones(d), eps=eps, padding_mask=mask)
            y, _ = reference.power_norm_forward(x, c["batch_phi"], eps=eps, padding_mask=mask)
            groups = _featurewise_groups(x, real, y, None, c["batch_phi"], tokens)
        lesson.norms.append(NormLesson(norm, DESCRIPTIONS[norm], groups, y))
    return lesson
