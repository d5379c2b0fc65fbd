"""Draw a lesson: one panel per norm, the (B, T, D) tensor as a grid of cells
coloured by the statistic group they share, padding hatched, ``before → after``
written in each cell. Needs matplotlib (``pip install seqnorm[explain]``)."""

from __future__ import annotations

from typing import List, Optional

from .lesson import Lesson
from .render import fmt, title

_CJK_HINTS = ("CJK", "WenQuanYi", "Droid Sans Fallback", "Source Han", "Noto Sans SC", "AR PL")


def _cjk_font() -> Optional[str]:
    from matplotlib import font_manager

    for f in font_manager.fontManager.ttflist:
        if any(h in f.name for h in _CJK_HINTS):
            return f.name
    return None


def _needs_cjk(labels: List[str]) -> bool:
    return any(ord(ch) >= 0x2E80 for s in labels for ch in s)


def draw(lesson: Lesson, path: str, digits: int = 3) -> None:
    """Write the figure to ``path`` (format from the suffix: .png or .svg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    b, t, d = lesson.x.shape
    labels = [lesson.tokens[bi][ti] for bi in range(b) for ti in range(t)]
    family = None
    if _needs_cjk(labels):
        family = _cjk_font()
        if family is None:  # no font can draw these labels: fall back to positions
            labels = [f"{bi}.{ti}" if b > 1 else f"{ti}" for bi in range(b) for ti in range(t)]
    rc = {"font.family": [family, "DejaVu Sans"]} if family else {}

    panels = lesson.norms
    rows = b * t + (b - 1) * 0.4  # a gap between sentences
    with plt.rc_context(rc):
        ncols = min(3, len(panels))
        nrows = -(-len(panels) // ncols)
        fig, axes = plt.subplots(nrows, ncols, squeeze=False,
                                 figsize=(max(4.6, 1.25 * d + 1.4) * ncols, (0.75 * rows + 1.3) * nrows + 0.4))
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        # light colours so that the black numbers stay readable on every cell
        palette = plt.get_cmap("Set3").colors + plt.get_cmap("Pastel1").colors
        for ax, nl in zip(axes.flat, panels):
            group_of = {}
            for gi, g in enumerate(nl.groups):
                for m in g.members:
                    group_of[m] = gi
            yticks, ylabels = [], []
            for bi in range(b):
                for ti in range(t):
                    y0 = bi * (t + 0.4) + ti
                    yticks.append(y0 + 0.5)
                    ylabels.append(labels[bi * t + ti])
                    for di in range(d):
                        padded = bool(lesson.padding_mask[bi, ti])
                        gi = group_of.get((bi, ti, di))
                        face = "#eeeeee" if gi is None else palette[gi % len(palette)]
                        ax.add_patch(Rectangle((di, y0), 1, 1, facecolor=face, edgecolor="white", lw=2,
                                               hatch="///" if padded else None))
                        before = fmt(lesson.x[bi, ti, di], digits)
                        after = fmt(nl.output[bi, ti, di], digits)
                        ax.text(di + 0.5, y0 + 0.5, f"{before}\n→ {after}", ha="center", va="center",
                                fontsize=9, color="#555555" if padded else "black")
            ax.set_xlim(0, d)
            ax.set_ylim(rows, 0)
            ax.set_xticks([di + 0.5 for di in range(d)])
            ax.set_xticklabels([f"d{di}" for di in range(d)])
            ax.set_yticks(yticks)
            ax.set_yticklabels(ylabels, fontsize=11)
            ax.tick_params(length=0)
            for spine in ax.spines.values():
                spine.set_visible(False)
            stats = "; ".join(
                (f"μ={fmt(g.mean, digits)} σ²={fmt(g.var, digits)}" if g.mean is not None
                 else f"ψ²={fmt(g.var, digits)}") for g in nl.groups[:4])
            more = " …" if len(nl.groups) > 4 else ""
            ax.set_title(f"{title(lesson, nl)}\n{stats}{more}", fontsize=10)
        fig.suptitle(f"seqnorm explain — cells of one colour share a statistic; hatched = padding "
                     f"(eps = {fmt(lesson.eps, digits)})", fontsize=11)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
