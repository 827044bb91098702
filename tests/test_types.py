"""A static type check of fastkd/ and pipelines/: the branches no CPU test executes (the GPU
paths) are still read, so a wrong name, attribute or argument there fails here, not on a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_fastkd_and_pipelines_type_check_clean():
    pytest.importorskip("mypy", reason="mypy is in the dev extra")
    # the settings (files, strictness, packages without types) are pyproject.toml's [tool.mypy]
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
