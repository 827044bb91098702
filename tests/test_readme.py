"""The README's claims point at tests that exist."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_every_test_the_readme_names_exists():
    """`test_x` names a test; `test_x_*` any test starting so; `tests/f.py::test_x` one in that file."""
    readme = (REPO / "README.md").read_text()
    defined = {p.name: set(re.findall(r"^def (test_\w+)", p.read_text(), re.M)) for p in (REPO / "tests").glob("test_*.py")}
    everywhere = set().union(*defined.values())
    named = re.findall(r"`(?:tests/(\w+\.py)::)?(test_\w+?)(\*?)`", readme)
    assert len(named) >= 20
    missing = []
    for file, name, star in named:
        pool = defined.get(file, set()) if file else everywhere
        found = any(d.startswith(name) for d in pool) if star else name in pool
        if not found:
            missing.append(f"{file}::{name}{star}" if file else name + star)
    assert not missing, f"README names tests that do not exist: {missing}"


def test_every_reliability_guarantee_names_a_test():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Reliability guarantees", 1)[1].split("\n## ", 1)[0]
    bullets = [b for b in section.split("\n- ")[1:]]
    assert len(bullets) >= 8
    for bullet in bullets:
        assert re.search(r"`(?:tests/\w+\.py::)?test_\w+", bullet), f"guarantee without a test: {bullet[:80]}"
