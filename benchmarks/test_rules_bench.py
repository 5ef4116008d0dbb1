"""Rule evaluation beside its pure-Python peer, and one purchase end to end (pytest-benchmark groups;
``python -m benchmarks.report --only rules`` prints the capacity figures at full size)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from loyalty_engine.bench.rules_workload import kernel_buffers, kernel_evaluate, make_rows, program, python_evaluate
from loyalty_engine.engine import Engine

MEMBERS = 2_000
ROWS = 20_000


@pytest.fixture(scope="module")
def work() -> Any:
    prog = program()
    return prog, make_rows(prog, ROWS, MEMBERS)


@pytest.mark.benchmark(group="rule evaluation, 10 rules / 4 tiers / 5 offers")
def test_kernel_evaluation(benchmark: Any, work: Any) -> None:
    prog, data = work
    buffers = kernel_buffers(ROWS)              # (kept from run to run, as the engine keeps them)
    out = benchmark(kernel_evaluate, prog, data, MEMBERS, buffers)
    assert out["points"].sum() > 0


@pytest.mark.benchmark(group="rule evaluation, 10 rules / 4 tiers / 5 offers")
def test_python_peer_evaluation(benchmark: Any, work: Any) -> None:
    prog, data = work
    out = benchmark.pedantic(python_evaluate, args=(prog, data, MEMBERS), rounds=1, iterations=1)
    kernel = kernel_evaluate(prog, data, MEMBERS)
    assert [p for p, _, _ in out] == kernel["points"].tolist()


@pytest.mark.benchmark(group="one purchase end to end, sync=none")
def test_purchase(benchmark: Any, tmp_path: Path) -> None:
    prog = program()
    with Engine.open(tmp_path / "club", program=prog, sync="none") as club:
        t0 = datetime(2026, 1, 1, tzinfo=UTC)
        club.enroll_batch([f"m{i}" for i in range(1000)], at=t0)
        n = iter(range(10**9))

        def one() -> None:
            k = next(n)
            club.purchase(f"m{k % 1000}", amount=120_000, at=t0 + timedelta(minutes=k), ref=f"r{k}")

        benchmark(one)
