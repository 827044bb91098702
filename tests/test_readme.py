"""The README's claims point at tests that exist."""

from __future__ import annotations

import re

from tests.test_train import REPO


def test_every_test_the_readme_names_exists():
    readme = (REPO / "README.md").read_text()
    named = set(re.findall(r"`(?:tests/\w+\.py::)?(test_\w+?)_?\*?`", readme))
    defined = set(re.findall(r"^def (test_\w+)", "\n".join(p.read_text() for p in (REPO / "tests").glob("test_*.py")),
                             re.M))
    assert len(named) >= 20
    missing = [name for name in named if not any(d.startswith(name) for d in defined)]
    assert not missing, f"README names tests that do not exist: {missing}"
