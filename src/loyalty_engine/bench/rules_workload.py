"""The rule-evaluation workload (10 earn rules, 4 tiers, 5 offers) and its peer: the same program
evaluated row by row in pure Python, as a shop would write it without a compiled core.

The peer covers what this program uses (base rate, basket and category multipliers and bonuses
stacked by multiplying, tier multipliers on a rolling spend window, offers with per-member limits) and
its answers are checked against the kernel's, so the two do the same work."""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from loyalty_engine import _core, _memory
from loyalty_engine.program import Program
from loyalty_engine.rules.expr import VARIABLES, evaluate

PROGRAM: dict[str, Any] = {
    "name": "bench", "timezone": "UTC",
    "earn": {"points": 1, "per": 1000, "stacking": "multiply"},
    "tiers": {"metric": "spend", "window_days": 365, "review": "never", "levels": [
        {"name": "bronze", "threshold": 0},
        {"name": "silver", "threshold": 2_000_000, "multiplier": 1.25},
        {"name": "gold", "threshold": 6_000_000, "multiplier": 1.5, "cashback_percent": 1},
        {"name": "platinum", "threshold": 15_000_000, "multiplier": 2, "cashback_percent": 2}]},
    "earn_rules": [
        {"name": "cosmetics", "category": "cosmetics", "multiplier": 2},
        {"name": "toys", "category": "toys", "multiplier": 1.5},
        {"name": "evening", "when": "hour >= 20", "multiplier": 1.25},
        {"name": "weekend", "when": 'weekday in ("fri", "sat")', "bonus": 10},
        {"name": "big basket", "when": "amount >= 500000", "bonus": 50},
        {"name": "loyal", "when": "visits_90d >= 6", "multiplier": 1.1},
        {"name": "gold bonus", "when": 'tier >= "gold"', "bonus": 20},
        {"name": "morning", "when": "hour < 10", "bonus": 5},
        {"name": "returning", "when": "days_since_last >= 30", "bonus": 15},
        {"name": "grocery", "category": "grocery", "bonus": 3},
    ],
    "offers": [
        {"name": "bigger basket", "when": "avg_gap_days <= 12 and visits_90d >= 3 and amount >= 4 * avg_basket",
         "effect": {"credit_percent": 20}, "limit_per_member": 1, "priority": 9},
        {"name": "come back", "when": "avg_gap_days >= 40 and days_since_last >= 0 and days_since_last <= 20",
         "effect": {"credit_percent": 20}, "limit_per_member": 2, "priority": 8},
        {"name": "first", "when": "is_first_purchase", "effect": {"bonus_points": 50}, "priority": 5},
        {"name": "spender", "when": "spend_30d >= 1000000", "effect": {"multiplier": 1.5}, "priority": 3},
        {"name": "silver push", "when": 'tier == "silver" and amount >= 300000', "effect": {"bonus_points": 30},
         "limit_per_member": 3, "priority": 1},
    ],
}
CATEGORIES = ["cosmetics", "toys", "grocery", "other"]


def program() -> Program:
    return Program.from_dict(PROGRAM)


def make_rows(prog: Program, n: int, members: int, seed: int = 7) -> dict[str, np.ndarray]:
    """``n`` purchases by ``members`` members over two years, in time order, one item each."""
    rng = np.random.default_rng(seed)
    at_min = np.sort(rng.integers(0, 730 * 1440, n))
    day = 20_000 + at_min // 1440
    rows = np.zeros(n, _core.ROW_DTYPE)
    rows["member"] = rng.integers(0, members, n)
    rows["amount"] = rng.integers(10_000, 800_000, n)
    rows["quantity"] = 1
    rows["day"] = day
    rows["hour"] = (at_min // 60) % 24
    rows["weekday"] = (day + 3) % 7
    dates = day.astype("datetime64[D]")
    rows["month"] = dates.astype("datetime64[M]").astype(np.int64) % 12 + 1
    rows["dom"] = (dates - dates.astype("datetime64[M]").astype("datetime64[D]")).astype(np.int64) + 1
    cats = prog.symbols.tables["category"]
    cat = np.array([cats.get(c, 0) for c in CATEGORIES], np.int32)[rng.integers(0, len(CATEGORIES), n)]
    rows["cats"] = np.left_shift(1, cat.astype(np.int64))
    rows["item_start"] = np.arange(n)
    rows["item_end"] = rows["item_start"] + 1
    return {"rows": rows, "cat": cat, "sku": np.zeros(n, np.int32), "amount": rows["amount"].copy()}


class KernelBuffers:
    """What the engine keeps from one batch to the next (see Engine._evaluate): the output buffers, and,
    made by the first :func:`kernel_evaluate` that uses them, its kernel and the members' state and usage
    arrays (reset to fresh members by each call), so that a run measures evaluation, not the first touch
    of fresh memory (dear on these virtual machines: up to half of a 2 M-row run)."""

    def __init__(self, n: int) -> None:
        self.out_hist = np.zeros(n, _core.HEV_DTYPE)
        self.out = np.zeros(n, _core.OUT_DTYPE)
        self.out_hist.view(np.uint8)[::4096] = 0
        self.out.view(np.uint8)[::4096] = 0
        self.seg_of = np.zeros(n, np.int64)
        self.kernel: Any = None
        self.program: Program | None = None
        self.state: np.ndarray | None = None
        self.use: np.ndarray | None = None
        self.offsets: tuple[np.ndarray, np.ndarray] | None = None

    def members(self, prog: Program, members: int) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The kept kernel, state (fresh members), usage (zero) and history offsets for ``members``."""
        noff = max(len(prog.offers), 1)
        if self.program is not prog:
            c = prog.compiled
            self.kernel = _core.Kernel(c.code, c.pool, c.conds, c.rules, c.offers, c.tiers, c.params)
            self.program = prog
        if self.state is None or self.use is None or len(self.state) != members or self.use.shape[1] != noff:
            self.state = np.zeros(members, _core.MSTATE_DTYPE)
            self.use = np.zeros((members, noff, 3), np.int64)
            self.offsets = (np.zeros(members + 1, np.int64), np.zeros(members + 1, np.int64))
        assert self.offsets is not None
        _fresh(self.state)
        self.use.fill(0)
        return self.kernel, self.state, self.use, self.offsets[0], self.offsets[1]


def kernel_buffers(n: int) -> KernelBuffers:
    """Buffers for ``n`` rows (the kept history and the per-row results, touched once), kept by a caller
    streaming batches through the kernel, as the import keeps its chunks' and the engine its kernel and
    members' state."""
    return KernelBuffers(n)


def _fresh(state: np.ndarray) -> None:
    """Members as enrolled, none with a purchase yet."""
    state.view(np.uint8).fill(0)
    state["tier"] = 1
    state["last_day"] = -1
    state["earn_day"] = -1
    state["referrer"] = -1
    state["review_day"] = 1 << 30


def kernel_evaluate(prog: Program, data: dict[str, np.ndarray], members: int,
                    buffers: KernelBuffers | None = None) -> np.ndarray:
    """Evaluate every row with the compiled kernel, state in memory (fresh members), with NumPy's
    allocations as the engine's batch paths make them (small pages: ``_memory.small_pages``). With
    ``buffers`` (from :func:`kernel_buffers`, at least as long as the rows) the outputs go there, and the
    kernel and the members' arrays are the ones kept there, as an engine keeps them."""
    with _memory.small_pages():
        return _kernel_evaluate(prog, data, members, buffers)


def _kernel_evaluate(prog: Program, data: dict[str, np.ndarray], members: int,
                     buffers: KernelBuffers | None) -> np.ndarray:
    rows = data["rows"]
    n = len(rows)
    noff = max(len(prog.offers), 1)
    if buffers is None:
        c = prog.compiled
        kernel = _core.Kernel(c.code, c.pool, c.conds, c.rules, c.offers, c.tiers, c.params)
        state = np.zeros(members, _core.MSTATE_DTYPE)
        _fresh(state)
        use = np.zeros((members, noff, 3), np.int64)
        hist_off, out_off = np.zeros(members + 1, np.int64), np.zeros(members + 1, np.int64)
        buffers = kernel_buffers(n)
        seg_of = rows["member"].astype(np.int64)
    else:
        kernel, state, use, hist_off, out_off = buffers.members(prog, members)
        seg_of = buffers.seg_of[:n]
        np.copyto(seg_of, rows["member"])
    out_hist, out = buffers.out_hist[:n], buffers.out[:n]
    kernel.run(rows, seg_of, data["cat"], data["sku"], data["amount"], state, hist_off,
               np.zeros(0, _core.HEV_DTYPE), out_off, out_hist, use, np.zeros(noff, np.int64), out,
               np.zeros((0, len(VARIABLES)), np.int64))
    return out


def python_evaluate(prog: Program, data: dict[str, np.ndarray], members: int) -> list[tuple[int, int, int]]:
    """The peer: (points, credit, tier after) per row, in pure Python."""
    c = prog.compiled
    code, pool, conds = c.code.tolist(), c.pool.tolist(), c.conds.tolist()
    rules, offers, tiers = c.rules.tolist(), c.offers.tolist(), c.tiers.tolist()
    rate_pts, rate_per = int(c.params[0]), int(c.params[1])
    window = prog.tier_window_days
    hist: dict[int, deque[tuple[int, int]]] = {}
    last: dict[int, int] = {}
    tier: dict[int, int] = {}
    used: dict[tuple[int, int], int] = {}
    slot = {k: v.slot for k, v in VARIABLES.items()}
    out = []
    rows = data["rows"]
    for i in range(len(rows)):
        r = rows[i]
        m, d, amount, cat = int(r["member"]), int(r["day"]), int(r["amount"]), int(data["cat"][i])
        h = hist.setdefault(m, deque())
        while h and h[0][0] < d - max(364, window - 1):
            h.popleft()

        v30, s30 = _window(h, d, 30)
        v90, s90 = _window(h, d, 90)
        v365, s365 = _window(h, d, 365)
        in365 = [dd for (dd, _) in h if dd >= d - 364]
        facts = [0] * len(VARIABLES)
        t = tier.get(m, 1)
        for k, val in (("amount", amount), ("quantity", 1), ("hour", int(r["hour"])), ("weekday", int(r["weekday"])),
                       ("date", d), ("month", int(r["month"])), ("day_of_month", int(r["dom"])),
                       ("categories", 1 << cat), ("is_first_purchase", int(m not in last)),
                       ("days_since_last", d - last[m] if m in last else -1), ("visits_30d", v30),
                       ("visits_90d", v90), ("visits_365d", v365), ("spend_30d", s30), ("spend_90d", s90),
                       ("spend_365d", s365), ("avg_basket", s365 // v365 if v365 else 0),
                       ("avg_gap_days", (in365[-1] - in365[0]) // (len(in365) - 1) if len(in365) >= 2 else 0),
                       ("tier", t), ("days_to_birthday", -1), ("member_days", d - 20_000)):
            facts[slot[k]] = val
        memo: dict[int, int] = {}

        def cond(ci: int, memo: dict[int, int] = memo, facts: list[int] = facts) -> bool:
            if ci < 0:
                return True
            if ci not in memo:
                memo[ci] = evaluate(code, pool, facts, start=conds[ci][0], end=conds[ci][1])
            return memo[ci] != 0

        fired = []
        for k, o in enumerate(offers):
            if o[4] and used.get((m, k), 0) >= o[4]:
                continue
            if cond(o[0]):
                fired.append(k)
        f = 10_000
        bonus = 0
        for ru in rules:
            if ru[1] == 1 and ru[2] != cat:
                continue
            if not cond(ru[0]):
                continue
            if ru[3] == 0:
                f = f * ru[4] // 10_000
            else:
                bonus += ru[4]
        credit = 0
        for k in fired:
            o = offers[k]
            if o[2] == 1:
                f = f * o[3] // 10_000
            elif o[2] == 0:
                bonus += o[3]
            elif o[2] == 2:
                credit += amount * o[3] // 10_000
            used[(m, k)] = used.get((m, k), 0) + 1
        f = f * tiers[t - 1][1] // 10_000
        credit += amount * tiers[t - 1][3] // 10_000
        points = amount * f * rate_pts // (rate_per * 10_000) + bonus
        h.append((d, amount))
        last[m] = d
        spend = sum(a for (dd, a) in h if dd >= d - window + 1)
        for j, tr in enumerate(tiers):
            if tr[0] <= spend and j + 1 > t:
                t = j + 1
        tier[m] = t
        out.append((points, credit, t))
    return out



def _window(h: deque[tuple[int, int]], d: int, w: int) -> tuple[int, int]:
    """Visits and spend in the ``w`` days ending on day ``d``."""
    sel = [a for (dd, a) in h if dd >= d - w + 1]
    return len(sel), sum(sel)
