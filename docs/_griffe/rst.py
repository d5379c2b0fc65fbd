"""A griffe extension for the docs site: the reST of seqnorm's docstrings, as Markdown.

The docstrings are Google style (``Args:``) with reST inline roles and literal blocks, which
Sphinx renders and mkdocstrings would print as written. At load time, without touching the
source (pytest still doctests it as it is):

* ``:func:`seqnorm.padding```, ``:class:`~seqnorm.ConversionWarning``` … → a code span
  (``~`` keeps the last name, as in Sphinx);
* a ``.. math::`` block → a fenced block holding the formula;
* a paragraph ending in ``::`` (``Example::``) → ending in ``:``, its indented block left to
  Markdown (a code block) or, for ``>>>`` lines, to griffe's examples.
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


def markdown(text: str) -> str:
    """The docstring ``text`` with its reST roles and blocks made Markdown."""
    text = _ROLE.sub(_role, text)
    lines = _math_blocks(text.splitlines())
    lines = [re.sub(r"(\S)::$", r"\1:", line) for line in lines]
    return "\n".join(lines)


class ReSTToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
