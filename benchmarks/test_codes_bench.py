"""Product codes beside the per-code FF1 peer (pytest-benchmark groups; ``python -m benchmarks.report
--only codes`` prints the capacity figures at full size)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loyalty_engine.bench.codes_peer import PeerFF1, peer_code
from loyalty_engine.engine import Engine
from loyalty_engine.program import Program

N = 100_000


@pytest.fixture()
def codes(tmp_path: Path) -> Any:
    with Engine.open(tmp_path / "c", program=Program.from_dict({"name": "bench"}), sync="none",
                     code_key=bytes(range(32))) as e:
        yield e.codes


@pytest.mark.benchmark(group="codes: generate")
def test_generate_strings(benchmark: Any, codes: Any) -> None:
    batch = codes.generate(N, points=1)
    out = benchmark(batch.codes)
    assert len(np.unique(out)) == N


@pytest.mark.benchmark(group="codes: generate")
def test_peer_generate_strings(benchmark: Any, codes: Any) -> None:
    batch = codes.generate(2_000, points=1)
    ff1 = codes._cipher(batch.key_version)
    peer = PeerFF1(ff1._key_for_peer, ff1._tweak_for_peer)
    out = benchmark.pedantic(lambda: [peer_code(peer, k) for k in range(2_000)], rounds=1, iterations=1)
    assert out == batch.codes().tolist()


@pytest.mark.benchmark(group="codes: validate")
def test_check_array(benchmark: Any, codes: Any) -> None:
    strs = codes.generate(N, points=1).codes()
    st = benchmark(codes.check_array, strs)
    assert (st == 0).all()


@pytest.mark.benchmark(group="codes: one check")
def test_check_one(benchmark: Any, codes: Any) -> None:
    c = codes.generate(10, points=1).codes()[3]
    assert benchmark(codes.check, c).status == 0
