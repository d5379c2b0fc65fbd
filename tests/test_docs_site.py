"""The documentation site (mkdocs.yml, docs/) builds with ``mkdocs build --strict``, and the
README stays a front page: at most 12 KB, the set-up commands first, no broken relative link."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import seqnorm

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_is_short_and_starts_with_the_setup_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) <= 12 * 1024, "README.md is over 12 KB: move the detail into docs/"
    lines = text.splitlines()
    assert lines[:5] == [
        "# seqnorm",
        "",
        "```bash",
        'pip install torch==2.13.0 && pip install -e ".[explain,test]" && seqnorm explain   '
        "# install (CPU torch) + the note, computed",
        "python -m pytest -q                                                                 # the tests",
    ]


def test_readme_relative_links_exist():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets, "the README links into the site"
    missing = [t for t in targets
               if "://" not in t and not t.startswith("#") and not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]' builds the site")
    site = tmp_path / "site"
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    api = "\n".join(p.read_text(encoding="utf-8") for p in (site / "api").glob("*.html"))
    for name in seqnorm.__all__:
        if name == "__version__":
            continue
        if name in ("functional", "reference", "distributed"):
            assert (site / "api" / f"{name}.html").exists(), name
            continue
        # rendered under its top-level name, or under the module that defines it
        assert re.search(rf'id="seqnorm(\.\w+)?\.{name}"', api), f"seqnorm.{name} has no API entry"
    # a result table is included from its committed file, not retyped
    zoo_totals = next(line for line in (ROOT / "docs" / "zoo.md").read_text(encoding="utf-8").splitlines()
                      if line.startswith("**Totals:**"))
    zoo_page = (site / "results" / "zoo.html").read_text(encoding="utf-8")
    assert re.sub(r"\W+", " ", zoo_totals.split("**", 2)[2])[:60] in re.sub(r"<[^>]+>|\W+", " ", zoo_page)
