"""Render a :class:`~seqnorm.commands.explain.lesson.Lesson` as text, markdown or JSON."""

from __future__ import annotations

import json
from typing import List

import numpy as np

from .lesson import Group, Lesson, NormLesson

TITLES = {
    "layer": "LayerNorm",
    "masked_batch": "BatchNorm, padding excluded (seqnorm.SeqBatchNorm)",
    "pooled_batch": "BatchNorm, padding pooled (torch-style, as in the note)",
    "rms": "RMSNorm",
    "power": "PowerNorm",
}


def title(lesson: Lesson, nl: NormLesson) -> str:
    """The panel/section title; BN is only "padding excluded" when there is padding."""
    return TITLES[nl.norm] if nl.norm != "masked_batch" or lesson.has_padding else "BatchNorm"


def fmt(v: float, digits: int = 4) -> str:
    """``digits`` significant digits, no trailing zeros, a true minus sign: 1.75, 0.8292, −1."""
    s = f"{v:.{digits}g}"
    if s in ("-0", "-0.0"):
        s = "0"
    return s.replace("-", "−")


class _Style:
    def __init__(self, color: bool):
        self.color = color

    def _wrap(self, code: str, s: str) -> str:
        return f"\033[{code}m{s}\033[0m" if self.color else s

    def title(self, s: str) -> str:
        return self._wrap("1", s)

    def stat(self, s: str) -> str:
        return self._wrap("36", s)

    def dim(self, s: str) -> str:
        return self._wrap("2", s)


def _stats_text(g: Group, digits: int) -> str:
    if g.mean is None:
        return f"ψ² = mean(x²) = {fmt(g.var, digits)}, ψ = {fmt(g.std, digits)}"
    return f"μ = {fmt(g.mean, digits)}, σ² = {fmt(g.var, digits)}, σ = {fmt(g.std, digits)}"


def _denominator(g: Group, eps: float, digits: int) -> str:
    inside = fmt(g.var, digits) if eps == 0 else f"({fmt(g.var, digits)} + {fmt(eps, digits)})"
    return f"√{inside}"


def substitutions(g: Group, eps: float, digits: int) -> List[str]:
    """Each value's substitution, the note's way: ``(1 − 1.5)/√0.25 = −1``."""
    den = _denominator(g, eps, digits)
    out = []
    for v, o in zip(g.inputs, g.outputs):
        num = fmt(v, digits) if g.mean is None else f"({fmt(v, digits)} − {fmt(g.mean, digits)})"
        out.append(f"{num}/{den} = {fmt(o, digits)}")
    return out


def _matrix_lines(lesson: Lesson, y: np.ndarray, digits: int, indent: str) -> List[str]:
    b, t, _ = y.shape
    labels = [lesson.tokens[bi][ti] for bi in range(b) for ti in range(t)]
    width = max((len(s) for s in labels), default=1)
    cells = [[fmt(v, digits) for v in y[bi, ti]] for bi in range(b) for ti in range(t)]
    cw = max((len(c) for row in cells for c in row), default=1)
    lines = []
    for k, (bi, ti) in enumerate((bi, ti) for bi in range(b) for ti in range(t)):
        row = "[" + ", ".join(c.rjust(cw) for c in cells[k]) + "]"
        pad = "  (padding)" if lesson.padding_mask[bi, ti] else ""
        head = f"sentence {bi} " if b > 1 and ti == 0 else (" " * len(f"sentence {bi} ") if b > 1 else "")
        lines.append(f"{indent}{head}{labels[k].ljust(width)}  {row}{pad}")
    return lines


def render_text(lesson: Lesson, digits: int = 4, color: bool = False) -> str:
    st = _Style(color)
    b, t, d = lesson.x.shape
    lines = [st.title(f"Input: {b} sentence(s) × {t} tokens × {d} features, eps = {fmt(lesson.eps, digits)}")]
    lines += _matrix_lines(lesson, lesson.x, digits, "  ")
    for nl in lesson.norms:
        lines += ["", st.title(title(lesson, nl)) + st.dim(" — " + nl.description.split(": ", 1)[-1])]
        for g in nl.groups:
            lines.append(f"  {g.label}: {st.stat(_stats_text(g, digits))}")
            lines.append("      " + "   ".join(substitutions(g, lesson.eps, digits)))
        lines.append("  output:")
        lines += _matrix_lines(lesson, nl.output, digits, "    ")
    lines += _moved_lines(lesson, digits)
    return "\n".join(lines)


def _moved_lines(lesson: Lesson, digits: int) -> List[str]:
    moved = lesson.moved()
    if moved is None:
        return []
    b, t, _ = moved.shape
    parts = [f"{lesson.tokens[bi][ti]} {fmt(moved[bi, ti].max(), digits)}"
             for bi in range(b) for ti in range(t) if not lesson.padding_mask[bi, ti]]
    return ["", "How far pooling the padding moved each real token's BatchNorm output (max |Δ| over features):",
            "  " + ", ".join(parts)]


def render_markdown(lesson: Lesson, digits: int = 4) -> str:
    b, t, d = lesson.x.shape
    out = [f"**Input**: {b} sentence(s) × {t} tokens × {d} features, eps = {fmt(lesson.eps, digits)}", ""]
    out += _markdown_table(lesson, lesson.x, digits)
    for nl in lesson.norms:
        out += ["", f"### {title(lesson, nl)}", "", nl.description + ".", "",
                "| group | statistics | substitutions |", "|---|---|---|"]
        for g in nl.groups:
            subs = "<br>".join(substitutions(g, lesson.eps, digits))
            out.append(f"| {g.label} | {_stats_text(g, digits)} | {subs} |")
        out += ["", "Output:", ""] + _markdown_table(lesson, nl.output, digits)
    moved = _moved_lines(lesson, digits)
    if moved:
        out += ["", moved[1], "", moved[2].strip()]
    return "\n".join(out)


def _markdown_table(lesson: Lesson, y: np.ndarray, digits: int) -> List[str]:
    b, t, d = y.shape
    rows = ["| token | " + " | ".join(f"d{j}" for j in range(d)) + " |",
            "|---|" + "---|" * d]
    for bi in range(b):
        for ti in range(t):
            label = lesson.tokens[bi][ti] + (" (pad)" if lesson.padding_mask[bi, ti] else "")
            rows.append(f"| {label} | " + " | ".join(fmt(v, digits) for v in y[bi, ti]) + " |")
    return rows


def lesson_dict(lesson: Lesson) -> dict:
    """Machine-readable form: groups, members, μ, σ², σ, outputs."""
    def group(g: Group) -> dict:
        return dict(label=g.label, members=[list(m) for m in g.members], mean=g.mean, var=g.var,
                    std=g.std, inputs=g.inputs, outputs=g.outputs)

    def norm(nl: NormLesson) -> dict:
        return dict(norm=nl.norm, description=nl.description, groups=[group(g) for g in nl.groups],
                    output=nl.output.tolist())

    moved = lesson.moved()
    return dict(
        input=lesson.x.tolist(),
        padding_mask=lesson.padding_mask.tolist(),
        tokens=lesson.tokens,
        eps=lesson.eps,
        norms=[norm(nl) for nl in lesson.norms],
        padding_moved=None if moved is None else moved.tolist(),
    )


def render_json(lesson: Lesson) -> str:
    return json.dumps(lesson_dict(lesson), ensure_ascii=False, indent=2)
