"""The README is a front door to the docs: its links and the docs' links resolve, the docs site
builds strictly, every test the README or the docs name exists, and every reliability guarantee
names its test."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_every_test_the_readme_and_the_docs_name_exists():
    """`test_x` names a test; `test_x_*` any test starting so; `tests/f.py::test_x` one in that file."""
    text = "\n".join(page.read_text() for page in PAGES)
    defined = {p.name: set(re.findall(r"^def (test_\w+)", p.read_text(), re.M)) for p in (REPO / "tests").glob("test_*.py")}
    everywhere = set().union(*defined.values())
    named = re.findall(r"`(?:tests/(\w+\.py)::)?(test_\w+?)(\*?)`", text)
    assert len(named) >= 20
    missing = []
    for file, name, star in named:
        pool = defined.get(file, set()) if file else everywhere
        found = any(d.startswith(name) for d in pool) if star else name in pool
        if not found:
            missing.append(f"{file}::{name}{star}" if file else name + star)
    assert not missing, f"the README or docs name tests that do not exist: {missing}"


def test_every_reliability_guarantee_names_a_test():
    page = (REPO / "docs" / "reliability.md").read_text()
    section = page.split("## Reliability guarantees", 1)[1].split("\n## ", 1)[0]
    bullets = [b for b in section.split("\n- ")[1:]]
    assert len(bullets) >= 8
    for bullet in bullets:
        assert re.search(r"`(?:tests/\w+\.py::)?test_\w+", bullet), f"guarantee without a test: {bullet[:80]}"


def slug(heading: str) -> str:
    """A heading's anchor as mkdocs (Python-Markdown's toc) makes it."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[\s-]+", "-", text).strip("-")


def test_the_readme_links_to_pages_and_anchors_that_exist():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\((docs/[\w-]+\.md)(?:#([\w-]+))?\)", readme)
    assert len({page for page, _ in links}) >= 10, "the README should send readers to the docs' pages"
    for page, anchor in links:
        path = REPO / page
        assert path.is_file(), f"README links to {page}, which does not exist"
        if anchor:
            anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}
            assert anchor in anchors, f"README links to {page}#{anchor}, which has no such heading"


def test_every_docs_page_is_in_the_site():
    nav = (REPO / "mkdocs.yml").read_text()
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    assert pages == set(re.findall(r":\s*([\w-]+\.md)\s*$", nav, re.M)), "mkdocs.yml's nav and docs/ differ"


def test_the_docs_site_builds_in_strict_mode(tmp_path):
    """mkdocs --strict: a broken link or anchor between pages fails."""
    pytest.importorskip("mkdocs", reason="mkdocs is in the dev extra")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "distillation" / "index.html").is_file()


def test_no_page_names_a_key_that_moved():
    """A config key that moved (`fastkd.config.MOVED`) is an error in a user's YAML: no page, config
    or recipe comment may still spell it the old way (`data.dali_device` for `data.dali.device`),
    but where the same line names its new place (saying that it moved)."""
    from fastkd.config import MOVED

    pages = [REPO / "README.md", REPO / "benchmarks" / "README.md", *(REPO / "docs").glob("*.md"),
             *(REPO / "configs").rglob("*.yaml"), *(REPO / "benchmarks" / "results").rglob("experiment.yaml")]
    old = re.compile(r"(?<![\w.])(" + "|".join(re.escape(key) for key in MOVED) + r")(?![\w])")
    found = [f"{page.relative_to(REPO)}:{i}: {m.group(1)}" for page in pages
             for i, line in enumerate(page.read_text().splitlines(), 1) for m in old.finditer(line)
             if MOVED[m.group(1)] not in line]
    assert not found, "moved keys: " + "; ".join(found)
