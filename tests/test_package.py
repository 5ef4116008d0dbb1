"""The package as a whole: the build message, the public names, the bundled data, the demo's books."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import numpy as np
import pytest

import loyalty_engine
from loyalty_engine.datasets import load_cdnow, parse_cdnow
from loyalty_engine.demo import run_demo
from loyalty_engine.errors import (
    LoyaltyError,
    NotFoundError,
    StorageError,
    ValidationError,
)

SRC = Path(loyalty_engine.__file__).parent


def test_import_without_the_compiled_core_says_how_to_build(tmp_path: Path) -> None:
    """A checkout whose _core was not compiled fails at import with build instructions."""
    copy = tmp_path / "loyalty_engine"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("_core*.so", "_core*.pyd", "__pycache__"))
    assert not list(copy.glob("_core*.so"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", "import loyalty_engine"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "BuildError" in proc.stderr
    assert "pip install -e ." in proc.stderr
    assert "no pure-Python fallback" in proc.stderr


COMPILED_PY = ("engine", "ledger", "store", "types")     # setup.py's PY_MODULES


def _compiled_build() -> bool:
    return os.environ.get("LOYALTY_ENGINE_PURE_PYTHON", "") in ("", "0")


def test_the_engine_and_the_ledger_run_compiled() -> None:
    """setup.py compiles the Python modules a purchase runs through, and lists their source hashes."""
    if not _compiled_build():
        pytest.skip("built with LOYALTY_ENGINE_PURE_PYTHON=1")
    import importlib

    listing = (SRC / "_compiled.txt").read_text().split()
    assert listing[::2] == list(COMPILED_PY)
    for name in COMPILED_PY:
        module = importlib.import_module(f"loyalty_engine.{name}")
        assert module.__file__ is not None
        assert any(module.__file__.endswith(s) for s in EXTENSION_SUFFIXES), module.__file__


def _import_copy(tmp_path: Path, edit: str | None, listing: str | None = None) -> subprocess.CompletedProcess[str]:
    copy = tmp_path / "loyalty_engine"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    if edit is not None:
        with open(copy / f"{edit}.py", "a") as f:
            f.write("\n# an edit after the build\n")
    if listing is not None:
        (copy / "_compiled.txt").write_text(listing)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.run([sys.executable, "-c", "import loyalty_engine.engine; print(loyalty_engine.engine.__file__)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)


def test_a_module_edited_after_the_build_is_refused(tmp_path: Path) -> None:
    """A compiled module whose .py changed since the build would run the old code: import says to rebuild."""
    if not _compiled_build():
        pytest.skip("built with LOYALTY_ENGINE_PURE_PYTHON=1")
    same = _import_copy(tmp_path / "same", None)
    assert same.returncode == 0, same.stderr
    assert str(tmp_path / "same") in same.stdout
    edited = _import_copy(tmp_path / "edited", "ledger")
    assert edited.returncode != 0
    assert "BuildError" in edited.stderr
    assert "ledger.py changed after it was compiled" in edited.stderr
    assert "pip install -e ." in edited.stderr


def test_a_compiled_module_the_build_did_not_list_is_refused(tmp_path: Path) -> None:
    """A compiled copy left by an earlier build (a module no longer compiled), or a damaged listing."""
    if not _compiled_build():
        pytest.skip("built with LOYALTY_ENGINE_PURE_PYTHON=1")
    lines = (SRC / "_compiled.txt").read_text().splitlines()
    unlisted = _import_copy(tmp_path / "unlisted", None, "\n".join(x for x in lines if not x.startswith("store ")))
    assert unlisted.returncode != 0
    assert "BuildError" in unlisted.stderr
    assert "store.py has a compiled copy that the last build did not make" in unlisted.stderr
    damaged = _import_copy(tmp_path / "damaged", None, "\n".join(lines) + "\nengine")
    assert damaged.returncode != 0
    assert "BuildError" in damaged.stderr and "_compiled.txt is damaged" in damaged.stderr


def test_errors_inherit_the_builtins_they_resemble() -> None:
    assert issubclass(ValidationError, ValueError) and issubclass(ValidationError, LoyaltyError)
    assert issubclass(NotFoundError, KeyError) and issubclass(NotFoundError, LoyaltyError)
    assert issubclass(StorageError, OSError) and issubclass(StorageError, LoyaltyError)


def test_public_names_exist() -> None:
    for name in loyalty_engine.__all__:
        assert hasattr(loyalty_engine, name), name


def test_cdnow_loads_with_integer_cents() -> None:
    t = load_cdnow()
    assert t.num_rows == 69_659
    assert len(np.unique(t["customer_id"].to_numpy())) == 23_570
    first = t.slice(0, 1).to_pylist()[0]
    assert first["customer_id"] == 1 and str(first["date"]) == "1997-01-01"
    assert first["cds"] == 1 and first["amount_cents"] == 1177
    assert int((t["amount_cents"].to_numpy() == 0).sum()) == 80
    assert str(t["date"].to_numpy(zero_copy_only=False).max()) == "1998-06-30"


def test_cdnow_parser_names_the_bad_line() -> None:
    text = "customer_id date number_of_cds dollar_value\n 00001 19970101 1 11.77\n 00002 19970112 1 12.5\n"
    try:
        parse_cdnow(text, source="x.txt")
    except ValidationError as e:
        assert "x.txt:3" in str(e) and "12.5" in str(e)
    else:
        raise AssertionError("a value without two decimals was accepted")


def test_demo_books_balance_and_a_rerun_posts_nothing_twice(tmp_path: Path) -> None:
    lines: list[str] = []
    first = run_demo(tmp_path / "d.ledger", echo=lines.append, sync="none")
    assert first.purchases == 69_659 and first.members == 23_570
    assert first.points_earned == first.points_redeemed + first.points_expired + first.outstanding
    # one point per whole dollar of every basket
    assert first.points_earned == int((load_cdnow()["amount_cents"].to_numpy() // 100).sum())
    assert first.points_expired > 0 and first.points_redeemed > 0
    from loyalty_engine import Ledger

    with Ledger.open(tmp_path / "d.ledger", sync="none") as ledger:
        transfers_before = ledger.verify().transfers
    assert transfers_before == first.transfers
