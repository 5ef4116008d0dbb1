"""Size a machine for a club: measure this machine (a small bench on this folder's disk), plan the
profile in profile.toml from it, then check the prediction by replaying the club's busiest hour,
compressed in time, on the same disk. The same as:

    loyalty-engine bench --quick --dir . --json bench.json --plot bench.svg
    loyalty-engine capacity examples/capacity_plan/profile.toml --from bench.json --check
"""

from __future__ import annotations

import json
from pathlib import Path

from loyalty_engine.bench.capacity import Profile, check, plan
from loyalty_engine.bench.plot import write_svg
from loyalty_engine.bench.runner import format_table, run

HERE = Path(__file__).resolve().parent
work = Path.cwd()

# 1. measure (size "tiny" keeps the example to seconds; operators run the command's --quick or default)
result = run(work, size="tiny", say=lambda line: None)
print(format_table(result))
Path("bench.json").write_text(json.dumps(result, indent=2))
write_svg(result, "bench.svg")
assert result["figures"]["online_full"]["peer"]["median"] > 0     # every workload has its peer beside it

# 2. plan
profile = Profile.from_toml(HERE / "profile.toml")
p = plan(profile, result)
print()
print(p.text())
assert p.peak_per_second == 20_000 * 0.12 / 3600                  # 0.67 purchases a second at the peak
assert p.import_rows == 2 * 365 * 20_000
assert p.disk_bytes_5y > p.disk_bytes_1y > 0

# 3. check: the busiest hour, compressed in time, measured against the prediction
print()
got = check(profile, result, work, seconds=2)
assert got["paced"]["measured_busy_share"] > 0
assert got["flat_out"]["measured_per_s"] > 0
