"""A griffe extension for the docs site: the reST of seqnorm's docstrings, as Markdown.

The docstrings are Google style (``Args:``) with reST inline roles and literal blocks, which
Sphinx renders and mkdocstrings would print as written. At load time, without touching the
source (pytest still doctests it as it is):

* ``:func:`seqnorm.padding```, ``:class:`~seqnorm.ConversionWarning``` … → a code span
  (``~`` keeps the last name, as in Sphinx);
* a ``.. math::`` block → a fenced block holding the formula;
* a simple table (``====  ====`` borders) → a Markdown table;
* a paragraph ending in ``::`` (``Example::``) → ending in ``:``, its indented block left to
  Markdown (a code block);
* an ``Example:`` section (Google style, indented ``>>>`` lines right below) → ``Examples:``, the
  name griffe parses into code blocks (it renders ``Example:`` as a note, ``>>>`` as quotes).
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|obj|exc|math):`(~?)([^`]+)`")


def _role(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def _math_blocks(lines: list) -> list:
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(".. math::"):
            indent = len(line) - len(line.lstrip())
            body = [stripped[len(".. math::"):].strip()] if stripped != ".. math::" else []
            i += 1
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                body.append(lines[i].strip())
                i += 1
            while body and not body[-1]:
                body.pop()
            pad = " " * indent
            out += [pad + "```text"] + [pad + b for b in body if b] + [pad + "```", ""]
            continue
        out.append(line)
        i += 1
    return out


_BORDER = re.compile(r"^\s*=+(\s+=+)+\s*$")


def _simple_tables(lines: list) -> list:
    out, i = [], 0
    while i < len(lines):
        if not _BORDER.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        border, indent = lines[i], len(lines[i]) - len(lines[i].lstrip())
        starts = [m.start() for m in re.finditer(r"=+", border)]
        groups, rows, i = [], [], i + 1
        while i < len(lines):
            line = lines[i]
            i += 1
            if _BORDER.match(line):
                groups.append(rows)
                rows = []
                if i >= len(lines) or not lines[i].strip():
                    break
                continue
            cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
            # a row goes on where its first cell is blank, or where the line above ended it with ","
            if not rows or (cells[0] and not rows[-1][0].endswith(",")):
                rows.append(cells)
            else:
                rows[-1] = [f"{old} {new}".strip() for old, new in zip(rows[-1], cells)]
        header, body = (groups[0], sum(groups[1:], [])) if len(groups) > 1 else ([[""] * len(starts)], groups[0])
        pad = " " * indent
        cell = lambda c: c.replace("|", "\\|")
        out += [pad + "| " + " | ".join(cell(c) for c in header[0]) + " |",
                pad + "|" + "---|" * len(starts)]
        out += [pad + "| " + " | ".join(cell(c) for c in row) + " |" for row in body]
    return out


def markdown(text: str) -> str:
    """The docstring ``text`` with its reST roles and blocks made Markdown."""
    text = _ROLE.sub(_role, text)
    lines = _simple_tables(_math_blocks(text.splitlines()))
    lines = [re.sub(r"(\S)::$", r"\1:", line) for line in lines]
    for i, line in enumerate(lines[:-1]):
        if line.strip() == "Example:" and lines[i + 1].strip().startswith(">>>"):
            lines[i] = line.replace("Example:", "Examples:")
    return "\n".join(lines)


class ReSTToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
