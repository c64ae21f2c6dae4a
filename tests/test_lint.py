"""Lint and formatting: ``ruff check`` and ``ruff format --check`` (configured in pyproject.toml) on the
project's Python code. ruff is pinned in the ``test`` extra; the tests skip only where it is not installed.
To fix what they report: ``ruff check --fix`` and ``ruff format`` on the same paths."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PATHS = ["pipeline", "tests", "benchmarks", "scripts"]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None,
    reason="ruff is not installed (it is in requirements.lock and the test extra)",
)


def ruff(*args: str) -> subprocess.CompletedProcess:
    # --no-cache: leave no .ruff_cache in the work tree; the whole run takes well under a second.
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache", *PATHS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_ruff_check():
    result = ruff("check")
    if result.returncode != 0:
        pytest.fail(
            f"`ruff check` found problems (`ruff check --fix {' '.join(PATHS)}` fixes some):\n"
            f"{result.stdout}{result.stderr}",
            pytrace=False,
        )


def test_ruff_format():
    result = ruff("format", "--check")
    if result.returncode != 0:
        pytest.fail(
            f"`ruff format --check` would reformat files (`ruff format {' '.join(PATHS)}` does it):\n"
            f"{result.stdout}{result.stderr}",
            pytrace=False,
        )
