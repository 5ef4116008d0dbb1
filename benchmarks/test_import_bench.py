"""Bulk import beside its peer (pytest-benchmark group; ``python -m benchmarks.report --only import``
prints the capacity figures at full size: 10 M rows, 1 M members, and the peak memory)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from loyalty_engine.bench.import_workload import COLUMNS, peer_import, write_history
from loyalty_engine.bench.rules_workload import program
from loyalty_engine.engine import Engine

ROWS = 50_000
MEMBERS = 5_000


@pytest.fixture(scope="module")
def source(tmp_path_factory: Any) -> Path:
    return write_history(tmp_path_factory.mktemp("import") / "history.parquet", ROWS, MEMBERS)


@pytest.mark.benchmark(group="bulk import, Parquet to a durable ledger, 10 rules / 4 tiers / 5 offers")
def test_import_sales(benchmark: Any, source: Path, tmp_path: Path) -> None:
    runs = iter(range(1_000))

    def run() -> Any:
        path = tmp_path / f"club{next(runs)}"
        with Engine.open(path, program=program(), sync="full") as eng:
            rep = eng.import_sales(source, columns=COLUMNS, progress=False)
        shutil.rmtree(path)
        return rep

    rep = benchmark.pedantic(run, rounds=3, iterations=1)
    assert rep.sales_posted == ROWS
    if benchmark.stats is not None:  # None under --benchmark-disable (a smoke run)
        benchmark.extra_info["rows_per_s"] = ROWS / benchmark.stats.stats.median


@pytest.mark.benchmark(group="bulk import, Parquet to a durable ledger, 10 rules / 4 tiers / 5 offers")
def test_peer_pyarrow_python_sqlite(benchmark: Any, source: Path, tmp_path: Path) -> None:
    runs = iter(range(1_000))

    def run() -> Any:
        return peer_import(source, tmp_path / f"peer{next(runs)}.sqlite")

    rows, points = benchmark.pedantic(run, rounds=1, iterations=1)
    assert rows == ROWS and points > 0
    if benchmark.stats is not None:  # None under --benchmark-disable (a smoke run)
        benchmark.extra_info["rows_per_s"] = ROWS / benchmark.stats.stats.median
