"""MkDocs hook: pages include parts of README.md, so that the front page of the repository and the
site say the same (the home page: what and why, the examples, the headline results; the results
index: the headline results).

A line ``--8<-- "README.md:NAME"`` is replaced by the README's lines between the markers
``--8<-- [start:NAME]`` and ``--8<-- [end:NAME]`` (HTML comments there), with the README's links,
written from the repository root (``docs/results/speech.md``), made relative to the page
(``results/speech.md`` from the home page). This runs before pymdownx.snippets and before MkDocs
checks the links. A missing README section fails the build."""

import posixpath
import re
from pathlib import Path

_INCLUDE = re.compile(r'^--8<-- "README\.md:([\w-]+)"$', re.M)
_FROM_ROOT = re.compile(r"\]\(docs/([^)\s]*)\)")


def _section(readme: str, name: str) -> str:
    found = re.search(rf"^[^\n]*--8<-- \[start:{name}\][^\n]*\n(.*?)^[^\n]*--8<-- \[end:{name}\]", readme, re.S | re.M)
    if found is None:
        raise ValueError(f"README.md has no section {name!r} (--8<-- [start:{name}] … [end:{name}])")
    if not found.group(1).strip():
        raise ValueError(f"README.md's section {name!r} is empty")
    return found.group(1).rstrip("\n")


def on_page_markdown(markdown, page, config, **kwargs):
    if "README.md:" not in markdown:
        return markdown
    readme = (Path(config.config_file_path).parent / "README.md").read_text(encoding="utf-8")
    here = posixpath.dirname(page.file.src_uri) or "."

    def include(match):
        text = _section(readme, match.group(1))
        return _FROM_ROOT.sub(lambda m: "](" + posixpath.relpath(m.group(1), here) + ")", text)

    return _INCLUDE.sub(include, markdown)
