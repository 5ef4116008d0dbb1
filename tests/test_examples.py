"""Every example under examples/ runs and checks itself (its asserts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*/main.py"))


def test_there_are_examples() -> None:
    assert EXAMPLES, "no examples/*/main.py found"


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.parent.name for p in EXAMPLES])
def test_example_runs(script: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip(), f"{script} printed nothing"
