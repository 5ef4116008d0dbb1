"""The condition language and the program's validation: parse, check, compile; the kernel's VM against
the Python reference interpreter; the calendar against Python's datetime."""

from __future__ import annotations

import textwrap
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loyalty_engine import _core
from loyalty_engine.errors import ConfigError
from loyalty_engine.program import Program
from loyalty_engine.rules.expr import ATOM_WORDS, EPOCH_ORDINAL, VARIABLES, Symbols, compile_expr, evaluate, predicate

N = len(VARIABLES)


def run_both(src: str, facts: dict[str, int] | None = None, sym: Symbols | None = None,
             cat: dict[int, int] | None = None) -> int:
    sym = sym or Symbols()
    sym.tables["tier"].update({"bronze": 1, "silver": 2, "gold": 3})
    pool: list[int] = []
    c = compile_expr(src, sym, pool, want="bool" if not src.startswith("#") else "int")
    f = np.zeros(N, np.int64)
    for k, v in (facts or {}).items():
        f[VARIABLES[k].slot] = v
    ca = np.zeros(64, np.int64)
    for k, v in (cat or {}).items():
        ca[k] = v
    py = evaluate(c.code, pool, f, ca, ca)
    k = _core.run_expr(np.asarray(c.code, np.int64), np.asarray(pool or [0], np.int64), f, ca, ca)
    assert py == k, (src, py, k)
    return int(k)


def test_the_two_brochure_conditions_read_as_written():
    big = "amount >= 4 * avg_basket and avg_gap_days <= 12 and visits_90d >= 3"
    assert run_both(big, {"amount": 200_000, "avg_basket": 50_000, "avg_gap_days": 10, "visits_90d": 6}) == 1
    assert run_both(big, {"amount": 199_999, "avg_basket": 50_000, "avg_gap_days": 10, "visits_90d": 6}) == 0
    back = "avg_gap_days >= 40 and days_since_last <= 20 and days_since_last >= 0"
    assert run_both(back, {"avg_gap_days": 45, "days_since_last": 20}) == 1
    assert run_both(back, {"avg_gap_days": 45, "days_since_last": 21}) == 0


def test_names_lists_functions_and_precedence():
    assert run_both('tier in ("silver", "gold")', {"tier": 3}) == 1
    assert run_both('tier in ("silver", "gold")', {"tier": 1}) == 0
    assert run_both('tier >= "silver"', {"tier": 2}) == 1
    assert run_both('"silver" < tier', {"tier": 2}) == 0
    assert run_both("not hour in (9, 10) and hour != 3", {"hour": 11}) == 1
    assert run_both("1 + 2 * 3 == 7 and (1 + 2) * 3 == 9 and -7 / 2 == -4 and 7 % 0 == 0 and 5 / 0 == 0") == 1
    assert run_both("min(amount, 10) == 10 and max(-3, abs(-5)) == 5", {"amount": 99}) == 1
    assert run_both('date >= date("2026-05-10")', {"date": date(2026, 5, 10).toordinal() - EPOCH_ORDINAL}) == 1
    sym = Symbols()
    sym.occasions["mothers_day"] = [(100, 102)]
    assert run_both('occasion("mothers_day")', {"date": 101}, sym) == 1
    assert run_both('occasion("mothers_day")', {"date": 103}, sym) == 0
    sym = Symbols()
    bit = sym.number("category", "cosmetics", "t")
    assert run_both('"cosmetics" in categories', {"categories": 1 << bit}, sym) == 1
    assert run_both('"cosmetics" not in categories', {"categories": 1 << bit}, sym) == 0
    assert run_both('category_amount("cosmetics") >= 100', {}, sym, {bit: 150}) == 1
    assert run_both("true or 1 / 0 == 0") == 1 and run_both("false and true") == 0


@pytest.mark.parametrize(("src", "message"), [
    ("amount >= 4 * avg_baskett", "unknown variable 'avg_baskett'"),
    ("amount >=", "column"),
    ("amount", "not a condition"),
    ('tier == "diamond"', "'diamond' is not a tier"),
    ('branch < "x"', "names compare only"),
    ("amount and true", "need a condition"),
    ("categories == 1", "is a set"),
    ("eval(1)", "unknown function 'eval'"),
    ("__import__('os')", "unknown function"),
    ("amount in ()", "empty list"),
    ('amount in ("a")', "holds numbers"),
    ('weekday == "funday"', "not a weekday"),
    ('occasion("nope")', "unknown occasion"),
    ("amount >= 99999999999999999999", "too large"),
    ("amount ; 1", "cannot read"),
    ("", "empty"),
])
def test_bad_conditions_are_refused_with_the_place(src: str, message: str):
    with pytest.raises(ConfigError, match=message):
        run_both(src)


# random well-typed expressions: the VM and the reference interpreter agree on every one
ints = st.recursive(
    st.one_of(st.integers(-1000, 1000).map(str), st.sampled_from(["amount", "visits_30d", "avg_basket",
                                                                  "days_since_last", "hour", "points_balance"])),
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "%"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(st.sampled_from(["min", "max"]), inner, inner).map(lambda t: f"{t[0]}({t[1]}, {t[2]})"),
        inner.map(lambda x: f"abs({x})"), inner.map(lambda x: f"-{x}")),
    max_leaves=6)
bools = st.recursive(
    st.one_of(st.tuples(ints, st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), ints).map(" ".join),
              st.tuples(ints, st.lists(st.integers(-5, 5), min_size=1, max_size=4)).map(
                  lambda t: f"{t[0]} in ({', '.join(map(str, t[1]))})"),
              st.sampled_from(['tier in ("silver", "gold")', "is_first_purchase", "referred"])),
    lambda inner: st.one_of(st.tuples(inner, st.sampled_from(["and", "or"]), inner).map(lambda t: f"({' '.join(t)})"),
                            inner.map(lambda x: f"not {x}")),
    max_leaves=5)


@settings(max_examples=300, deadline=None)
@given(bools, st.lists(st.integers(-10_000, 10_000), min_size=N, max_size=N))
def test_vm_matches_the_reference_interpreter(src: str, values: list[int]):
    facts = {name: values[v.slot] for name, v in VARIABLES.items()}
    facts["tier"] = abs(facts["tier"]) % 4
    for name, v in VARIABLES.items():
        if v.type == "bool":  # the kernel fills booleans with 0 or 1
            facts[name] &= 1
    result = run_both(src, facts)
    assert result in (0, 1)


def test_calendar_matches_datetime():
    days = np.concatenate([np.arange(-800, 800), np.arange(19_000, 21_500), [60_000, 100_000]]).astype(np.int64)
    got = _core.calendar_check(days)
    for d, (y, m, dd, nm, nq, ny) in zip(days.tolist(), got.tolist(), strict=True):
        when = date.fromordinal(d + EPOCH_ORDINAL)
        assert (y, m, dd) == (when.year, when.month, when.day)
        next_month = date(when.year + (when.month == 12), when.month % 12 + 1, 1)
        q = (when.month - 1) // 3 * 3 + 4
        next_quarter = date(when.year + 1, 1, 1) if q > 12 else date(when.year, q, 1)
        assert nm == next_month.toordinal() - EPOCH_ORDINAL
        assert nq == next_quarter.toordinal() - EPOCH_ORDINAL
        assert ny == date(when.year + 1, 1, 1).toordinal() - EPOCH_ORDINAL
        assert when + timedelta(days=0) == when


# -- the program --------------------------------------------------------------------------------------

BASE = {"tiers": {"levels": [{"name": "bronze", "threshold": 0}, {"name": "gold", "threshold": 100}]}}


@pytest.mark.parametrize(("patch", "message"), [
    ({"colour": "red"}, "unknown field 'colour'"),
    ({"earn": {"points": "1"}}, "field 'earn.points': must be a whole number"),
    ({"earn": {"per": 0}}, "field 'earn.per': must be at least 1"),
    ({"rounding": "up"}, "must be one of 'floor', 'half_even', 'ceil'"),
    ({"timezone": "Mars/Olympus"}, "unknown timezone"),
    ({"tiers": {"levels": [{"name": "gold", "threshold": 100}, {"name": "bronze", "threshold": 0}]}},
     "from the lowest threshold up"),
    ({"tiers": {"levels": [{"name": "silver", "threshold": 10}]}}, "must have threshold 0"),
    ({"offers": [{"name": "x", "when": "amount > avg", "effect": {"credit_percent": 5}}]}, "unknown variable 'avg'"),
    ({"offers": [{"name": "x", "effect": {"credit_percent": 5, "bonus_points": 3}}]}, "exactly one of"),
    ({"offers": [{"name": "x", "effect": {"credit_percent": 5.555}}]}, "more decimals"),
    ({"offers": [{"name": "x", "effect": {"multiplier": 2}, "budget": 10}]}, "budget"),
    ({"earn_rules": [{"name": "x", "multiplier": 2, "weekdays": ["fri", "someday"]}]}, "not a weekday"),
    ({"earn_rules": [{"name": "x"}]}, "exactly one of multiplier"),
    ({"earn_rules": [{"name": "x", "bonus": 5, "occasion": "nowruz"}]}, "unknown occasion"),
    ({"occasions": {"nowruz": ["2026-13-01"]}}, "YYYY-MM-DD"),
])
def test_program_validation_names_the_field(patch: dict, message: str):
    data = {**BASE, **patch}
    with pytest.raises(ConfigError, match=message):
        Program.from_dict(data)


def test_toml_errors_name_the_file_and_line(tmp_path):
    text = textwrap.dedent("""\
        name = "shop"
        timezone = "Asia/Tehran"

        [earn]
        points = 1
        per = 1000

        [[offers]]
        name = "first"
        when = "amount > 0"
        effect = { bonus_points = 5 }

        [[offers]]
        name = "second"
        when = "amount >= 4 * avg_baskit"
        effect = { credit_percent = 20 }
        """)
    _errors_name_the_line(tmp_path / "program.toml", text, Program.from_toml, 15,
                          ("per = 1000", "per = 1000\nmultiplyer = 2"), 7, "name = ", "TOML")


def _errors_name_the_line(path: Path, text: str, load: Any, misspelt_line: int, add_unknown: tuple[str, str],
                          unknown_line: int, broken: str, fmt: str) -> None:
    """A program file's mistakes are named with the file and line: ``text`` misspells the variable
    avg_basket on ``misspelt_line``; ``add_unknown`` adds an unknown field on ``unknown_line``; ``broken``
    is not the format at all."""
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert f"{path}, line {misspelt_line}" in str(e.value) and "avg_baskit" in str(e.value)
    path.write_text(text.replace(*add_unknown))
    with pytest.raises(ConfigError, match=rf"line {unknown_line}: field 'earn.multiplyer': unknown field"):
        load(path)
    path.write_text(broken)
    with pytest.raises(ConfigError, match=f"not valid {fmt}"):
        load(path)


def test_yaml_programs_read_like_toml_and_errors_name_the_line(tmp_path):
    toml_path = Path(__file__).parent.parent / "examples" / "customer_club" / "program.toml"
    yaml_path = Path(__file__).parent.parent / "examples" / "customer_club" / "program.yaml"
    assert Program.from_yaml(yaml_path).fingerprint == Program.from_toml(toml_path).fingerprint
    text = textwrap.dedent("""\
        name: shop
        timezone: Asia/Tehran
        earn:
          points: 1
          per: 1000
        offers:
          - name: first
            when: amount > 0
            effect: {bonus_points: 5}
          - name: second
            when: amount >= 4 * avg_baskit
            effect: {credit_percent: 20}
        """)
    path = tmp_path / "program.yaml"
    _errors_name_the_line(path, text, Program.from_yaml, 11,
                          ("  per: 1000", "  per: 1000\n  multiplyer: 2"), 6, "name: [", "YAML")
    with pytest.raises(ConfigError, match="cannot read the program file"):
        Program.from_yaml(tmp_path / "missing.yaml")
    # where YAML 1.1 would surprise: a key twice, another base, aliases
    for body, message in (("name: a\nearn: {points: 1, per: 1000}\nearn: {points: 5}\n", "'earn' is given twice"),
                          ("name: a\nearn: {points: 1, per: 0100}\n", "'0100' is not a decimal whole number"),
                          ("name: a\nearn: {points: 1, per: 1:30}\n", "not a decimal whole number"),
                          ("name: a\nextra: &x [*x]\n", "anchors and aliases are not taken")):
        path.write_text(body)
        with pytest.raises(ConfigError, match=message):
            Program.from_yaml(path)


def test_offers_are_ordered_by_priority_and_decimals_are_exact():
    p = Program.from_dict({"offers": [
        {"name": "low", "effect": {"multiplier": 1.5}, "priority": 1},
        {"name": "high", "effect": {"credit_percent": 12.5}, "priority": 9}]})
    assert [o.name for o in p.offers] == ["high", "low"]
    assert p.offers[0].effect.value == 1250 and p.offers[1].effect.value == 15_000


# predicates: conditions made of simple atoms joined by one kind of chain skip the stack machine; the
# kernel's atom-by-atom answer must be the stack machine's and the reference interpreter's
_pvar = st.sampled_from(["amount", "hour", "visits_90d", "avg_basket", "days_since_last", "month", "member_days"])
_pint = st.integers(-70, 70).map(str)
_cmp = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])
_atoms = st.one_of(
    st.tuples(_pvar, _cmp, _pint).map(" ".join),
    st.tuples(_pint, _cmp, _pvar).map(" ".join),
    st.tuples(_pvar, _cmp, _pint, _pvar).map(lambda t: f"{t[0]} {t[1]} {t[2]} * {t[3]}"),
    st.tuples(_pvar, _cmp, _pvar, _pint).map(lambda t: f"{t[0]} {t[1]} {t[2]} * {t[3]}"),
    st.tuples(_pvar, _cmp, _pvar).map(" ".join),
    st.tuples(_pvar, st.lists(st.integers(-3, 66), min_size=1, max_size=4)).map(
        lambda t: f"{t[0]} in ({', '.join(map(str, t[1]))})"),
    st.tuples(_pvar, st.lists(st.integers(-3, 66), min_size=1, max_size=3)).map(
        lambda t: f"{t[0]} in ({', '.join(map(str, t[1]))}, 1000000)"),
    st.sampled_from(['"toys" in categories', '"food" in categories', 'weekday in ("fri", "sat")',
                     'tier >= "silver"', '"gold" > tier', "is_first_purchase", "referred", "true", "false",
                     'occasion("sale")', 'category_amount("toys") >= 50', 'sku_amount("A1") < 20']))
_patoms = st.one_of(_atoms, _atoms.map(lambda a: f"not ({a})"))


@st.composite
def _chains(draw: st.DrawFn) -> str:
    terms = draw(st.lists(_patoms, min_size=1, max_size=4))
    op = draw(st.sampled_from(["and", "or"]))
    expr = f"({terms[0]})"
    right = draw(st.booleans())
    for t in terms[1:]:
        expr = f"(({t}) {op} {expr})" if right else f"({expr} {op} ({t}))"
    return expr


_facts = st.lists(st.integers(-80, 80), min_size=N, max_size=N)
_amounts = st.lists(st.integers(0, 100), min_size=64, max_size=64)


@settings(max_examples=400, deadline=None)
@given(_chains(), _facts, _amounts)
def test_predicates_match_the_stack_machine(src: str, values: list[int], amounts: list[int]):
    assert _predicate_and_machine(src, values, amounts) != 0


@settings(max_examples=200, deadline=None)
@given(bools, _facts, _amounts)
def test_any_condition_is_a_predicate_only_when_it_means_the_same(src: str, values: list[int], amounts: list[int]):
    _predicate_and_machine(src, values, amounts)


def _predicate_and_machine(src: str, values: list[int], amounts: list[int]) -> int:
    """Condition ``src`` three ways (reference interpreter, stack machine, predicate); returns its mode."""
    sym = Symbols()
    sym.tables["tier"].update({"bronze": 1, "silver": 2, "gold": 3})
    sym.occasions["sale"] = [(-20, -5), (10, 30)]
    pool: list[int] = []
    c = compile_expr(src, sym, pool)
    facts = np.asarray(values, np.int64)
    for v in VARIABLES.values():
        if v.type == "bool":
            facts[v.slot] &= 1
    amt = np.asarray(amounts, np.int64)
    pred = predicate(c.code, 0, len(c.code), pool)
    code = np.asarray(c.code, np.int64)
    mode, atoms = pred if pred is not None else (0, [])
    start = len(pool)
    full = np.asarray([*pool, *atoms] or [0], np.int64)
    conds = np.asarray([[0, len(code), mode, start, len(atoms) // ATOM_WORDS], [0, len(code), 0, 0, 0]], np.int64)
    want = int(evaluate(c.code, pool, facts, amt, amt) != 0)
    assert _core.run_cond(code, full, conds, 1, facts, amt, amt) == want          # the stack machine
    assert _core.run_cond(code, full, conds, 0, facts, amt, amt) == want, (src, atoms)
    return mode


@pytest.mark.parametrize("src", [
    "amount >= 4 * avg_basket", "avg_gap_days <= 12 and visits_90d >= 3 and amount >= 4 * avg_basket",
    "days_since_last >= 0 and days_since_last <= 20 and avg_gap_days >= 40", 'tier == "silver" or hour < 10',
    'not ("toys" in categories)', 'weekday in ("fri", "sat")', "hour in (1, 2, 100000)", "is_first_purchase",
    'occasion("sale")', 'category_amount("toys") >= 50'])
def test_brochure_and_simple_conditions_are_predicates(src: str):
    sym = Symbols()
    sym.tables["tier"].update({"bronze": 1, "silver": 2, "gold": 3})
    sym.occasions["sale"] = [(-20, -5)]
    pool: list[int] = []
    c = compile_expr(src, sym, pool)
    assert predicate(c.code, 0, len(c.code), pool) is not None


@pytest.mark.parametrize("src", ["(hour < 10 or hour > 20) and amount > 5", "not (hour < 10 and amount > 5)",
                                 "amount + 5 > hour", "min(amount, 5) > 3"])
def test_other_conditions_run_on_the_stack_machine(src: str):
    pool: list[int] = []
    c = compile_expr(src, Symbols(), pool)
    assert predicate(c.code, 0, len(c.code), pool) is None


@settings(max_examples=60, deadline=None)
@given(_chains(), st.lists(st.one_of(_chains(), bools), max_size=99), st.integers(0, 2**32 - 1))
def test_the_kernel_fires_what_the_stack_machine_says(first: str, rest: list[str], seed: int):
    """Through the kernel's own row path (atoms tested once a row into a bit set, the first 64 atoms and
    conditions; the rest memoised): each condition guards one offer or rule, and what fired must be the
    stack machine's answer on the facts the kernel recorded."""
    from loyalty_engine.program import C_NCOL, P_MIN_BASKET, P_NPARAMS, P_RATE_PER, P_RATE_POINTS

    srcs = [first, *rest]
    sym = Symbols()
    sym.tables["tier"].update({"bronze": 1, "silver": 2, "gold": 3})
    sym.occasions["sale"] = [(20_000, 20_010), (20_100, 20_400)]
    pool: list[int] = []
    code: list[int] = []
    conds = np.zeros((len(srcs), C_NCOL), np.int64)
    for i, src in enumerate(srcs):
        c = compile_expr(src, sym, pool)
        rebased = [w + len(code) if k % 2 and c.code[k - 1] in (16, 17) else w for k, w in enumerate(c.code)]
        mode, atoms = predicate(c.code, 0, len(c.code), pool) or (0, [])
        conds[i] = (len(code), len(code) + len(c.code), mode, len(pool), len(atoms) // ATOM_WORDS)
        pool += atoms
        code += rebased
    noff = min(64, len(srcs))
    nrules = len(srcs) - noff
    offers = np.zeros((noff, 8), np.int64)
    offers[:, 0] = np.arange(noff)
    offers[:, 3] = 1                                        # one bonus point each, no limits
    extra = min(noff, 64 - nrules)                          # rules on the first conditions too, from the last
    rules = np.zeros((nrules + extra, 5), np.int64)
    rules[:, 0] = np.concatenate([noff + np.arange(nrules), noff - 1 - np.arange(extra)])
    rules[:, 3] = rules[:, 4] = 1                           # basket bonus rules
    params = np.zeros(P_NPARAMS, np.int64)
    params[P_RATE_POINTS] = params[P_RATE_PER] = 1
    params[P_MIN_BASKET] = -(1 << 62)
    rng = np.random.default_rng(seed)
    n = 30
    members = np.zeros(n, _core.MSTATE_DTYPE)
    members["points"] = rng.integers(-50, 50, n)
    members["credit"] = rng.integers(-5, 80, n)
    members["purchases"] = rng.integers(0, 2, n)
    members["referrer"] = -1
    members["enroll_day"] = rng.integers(19_900, 20_000, n)
    members["last_day"] = rng.integers(-1, 19_990, n)
    members["referred"] = rng.integers(0, 2, n)
    rows = np.zeros(n, _core.ROW_DTYPE)
    rows["member"] = np.arange(n)
    rows["amount"] = rng.integers(1, 90, n)
    rows["quantity"] = rng.integers(1, 70, n)
    rows["day"] = rng.integers(20_000, 20_500, n)
    for f in ("hour", "weekday", "month", "dom", "branch", "channel"):
        rows[f] = rng.integers(-2, 70, n)
    rows["cats"] = rng.integers(-(1 << 63), (1 << 63) - 1, n, dtype=np.int64)
    nitems = rng.integers(0, 3, n)
    rows["item_end"] = np.cumsum(nitems)
    rows["item_start"] = rows["item_end"] - nitems
    icat = rng.integers(0, 64, int(nitems.sum())).astype(np.int32)
    isku = rng.integers(0, 64, int(nitems.sum())).astype(np.int32)
    iamt = rng.integers(0, 120, int(nitems.sum()))
    out = np.zeros(n, _core.OUT_DTYPE)
    fx = np.zeros((n, N), np.int64)
    code_a, pool_a = np.asarray(code, np.int64), np.asarray(pool or [0], np.int64)
    _core.Kernel(code_a, pool_a, conds, rules, offers, np.zeros((0, 4), np.int64), params).run(
        rows, np.arange(n, dtype=np.int64), icat, isku, iamt, members, np.zeros(n + 1, np.int64),
        np.zeros(0, _core.HEV_DTYPE), np.zeros(n + 1, np.int64), np.zeros(n, _core.HEV_DTYPE),
        np.zeros((n, max(noff, 1), 3), np.int64), np.zeros(max(noff, 1), np.int64), out, fx)
    machine = conds.copy()
    machine[:, 2:] = 0
    assert conds[0, 2] != 0                                 # a chain is a predicate
    for i in range(n):
        assert out[i]["status"] == 0
        ca = np.zeros(64, np.int64)
        sa = np.zeros(64, np.int64)
        for j in range(rows[i]["item_start"], rows[i]["item_end"]):
            ca[icat[j]] += iamt[j]
            sa[isku[j]] += iamt[j]
        fired = int(out[i]["offers_fired"]) & ((1 << 64) - 1)
        rfired = int(out[i]["rules_fired"]) & ((1 << 64) - 1)
        for k in range(len(srcs)):
            got = (fired >> k) & 1 if k < noff else (rfired >> (k - noff)) & 1
            want = _core.run_cond(code_a, pool_a, machine, k, np.ascontiguousarray(fx[i]), ca, sa)
            assert got == want, (srcs[k], i, fx[i].tolist())
        for r in range(nrules, nrules + extra):
            k = int(rules[r, 0])
            want = _core.run_cond(code_a, pool_a, machine, k, np.ascontiguousarray(fx[i]), ca, sa)
            assert (rfired >> r) & 1 == want, (srcs[k], i, fx[i].tolist())


@pytest.mark.parametrize(("pool", "cond", "message"), [
    ([1, 0, 0, 0, 0], [0, 0, 1, (1 << 63) - 3, 1], "predicate lies outside the pool"),      # offset + 5n wraps
    ([1, 0, 0, 0, 0], [0, 0, 1, 0, 3689348814741910324], "predicate lies outside the pool"),  # 5n wraps
    ([(1 << 63) - 1, 7, 0, 0, 0, 0], [0, 0, 1, 1, 1], "atom list is outside the pool"),     # an in-list too long
    ([(1 << 62) + 1, 8, 0, 0, 0, 0], [0, 0, 1, 1, 1], "atom list is outside the pool"),     # 2 * ranges wraps
    ([0, 11, 0, 0, 0, 0], [0, 0, 1, 1, 1], "bad predicate atom"),
    ([0, 1, 0, 99, 0, 0], [0, 0, 1, 1, 1], "atom fact 99 is out of range"),
    ([0, 0, 0, 0, 0, 0], [0, 0, 3, 1, 1], "predicate lies outside the pool"),
    ([0], [0, 4, 0, 0, 0], "lies outside the code")])
def test_a_crafted_condition_table_is_refused_not_followed(pool, cond, message):
    """The kernel trusts its tables; a table that points outside them must be refused up front (the sums
    of the checks are written so that none can wrap round)."""
    z = np.zeros(64, np.int64)
    with pytest.raises(ValueError, match=message):
        _core.run_cond(np.zeros(0, np.int64), np.asarray(pool, np.int64), np.asarray([cond], np.int64), 0,
                       np.zeros(N, np.int64), z, z)


@pytest.mark.parametrize(("code", "message"), [
    ([2, 99], "variable 99 is out of range"),
    ([3, 0], "operation 3 at 0 has no operands"),                  # an addition on an empty stack
    ([15, 0], "operation 15 at 0 has no operand"),
    ([1, 5, 19, 64], "bit 64 is out of range"),
    ([1, 5, 18, 9], "a list is outside the pool"),
    ([1, 0, 16, 100], "a jump at 2 to 100 is out of place"),
    ([1, 0, 16, 0], "a jump at 2 to 0 is out of place"),          # backwards: a loop
    ([1, 0, 16, 3, 1, 1], "a jump at 2 to 3 is out of place"),     # into the middle of an instruction
    ([1, 0, 16, 8, 1, 1, 1, 1], "two ways out of its code with different stacks"),
    ([77, 0], "unknown operation 77 at 0"),
    ([1, 0] * 33, "too deep for the machine's stack"),
    ([1], "not whole instructions")])
def test_crafted_code_is_refused_not_run(code: list[int], message: str):
    """The stack machine trusts its code; code that could read or write outside the machine's stack, the
    facts or the pool, or loop, must be refused before it runs."""
    z = np.zeros(64, np.int64)
    with pytest.raises(ValueError, match=message):
        _core.run_cond(np.asarray(code, np.int64), np.zeros(1, np.int64), np.asarray([[0, len(code), 0, 0, 0]]),
                       0, np.zeros(N, np.int64), z, z)
    with pytest.raises(ValueError, match=message):
        _core.run_expr(np.asarray(code, np.int64), np.zeros(1, np.int64), np.zeros(N, np.int64), z, z)


def _bound(prog: Program, **changes: np.ndarray) -> _core.Kernel:
    c = prog.compiled
    tables = {"code": c.code, "pool": c.pool, "conds": c.conds, "rules": c.rules, "offers": c.offers,
              "tiers": c.tiers, "params": c.params, **changes}
    return _core.Kernel(**tables)


def test_the_kernel_binds_checked_private_copies_of_a_program():
    prog = Program.from_dict({"name": "k", "earn_rules": [{"name": "r", "when": "hour >= 20", "bonus": 5}],
                              "offers": [{"name": "o", "when": "amount > 10", "effect": {"bonus_points": 1}}]})
    c = prog.compiled
    rules = c.rules.copy()
    rules[0, 0] = 100_000_000                               # a condition the program does not have
    with pytest.raises(ValueError, match="rule 0: condition 100000000"):
        _bound(prog, rules=rules)
    rules = c.rules.copy()
    rules[0, 1], rules[0, 2] = 1, 64                        # a category symbol beyond the 64 the rows' sets hold
    with pytest.raises(ValueError, match="rule 0: .*symbol 64"):
        _bound(prog, rules=rules)
    offers = c.offers.copy()
    offers[0, 0] = 7
    with pytest.raises(ValueError, match="offer 0: condition 7"):
        _bound(prog, offers=offers)
    from loyalty_engine.program import P_BURN_STEP, P_BURN_VALUE, P_RATE_PER
    params = c.params.copy()
    params[P_RATE_PER] = 0                                  # the kernel divides by it
    with pytest.raises(ValueError, match="per.* is 0; it must be at least 1"):
        _bound(prog, params=params)
    params = c.params.copy()
    params[P_BURN_VALUE], params[P_BURN_STEP] = 10, 0
    with pytest.raises(ValueError, match="step .0. must be at least 1"):
        _bound(prog, params=params)
    kernel = _bound(prog)
    conds = c.conds.copy()
    kernel2 = _core.Kernel(c.code, c.pool, conds, c.rules, c.offers, c.tiers, c.params)
    conds[0, 3] = 1 << 40                                   # changed after binding: the kernel holds a copy
    rows = np.zeros(1, _core.ROW_DTYPE)
    rows["amount"], rows["day"] = 100, 20_000
    members = np.zeros(1, _core.MSTATE_DTYPE)
    members["referrer"], members["last_day"] = -1, -1

    def run(k: _core.Kernel, members: np.ndarray, use_width: int = 3) -> np.ndarray:
        out = np.zeros(1, _core.OUT_DTYPE)
        k.run(rows, np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64),
              members, np.zeros(2, np.int64), np.zeros(0, _core.HEV_DTYPE), np.zeros(2, np.int64),
              np.zeros(1, _core.HEV_DTYPE), np.zeros((1, 1, use_width), np.int64), np.zeros(1, np.int64), out,
              np.zeros((0, N), np.int64))
        return out

    assert run(kernel2, members.copy())["offers_fired"][0] == 1
    assert run(kernel, members.copy())["offers_fired"][0] == 1
    with pytest.raises(ValueError, match="offer_use must be"):
        run(kernel, members.copy(), use_width=4)
    bad = members.copy()
    bad["tier"] = 3                                         # the program has no tiers
    with pytest.raises(ValueError, match="member 0 has tier 3; the program has 0"):
        run(kernel, bad)
    bad = members.copy()
    bad["referrer"] = 5
    with pytest.raises(ValueError, match="referrer 5 is beyond the state"):
        run(kernel, bad)


def test_run_bound_evaluates_the_bound_buffers_as_run_does():
    """One purchase at a time binds its buffers once; run_bound over them gives what run gives, checks the
    same things, and refuses counts beyond what was bound."""
    from loyalty_engine.bench.rules_workload import make_rows, program

    prog = program()
    data = make_rows(prog, 400, 3, seed=5)
    noff = max(len(prog.offers), 1)

    def state() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        members = np.zeros(3, _core.MSTATE_DTYPE)
        members["tier"], members["last_day"], members["earn_day"], members["referrer"] = 1, -1, -1, -1
        members["review_day"] = 1 << 30
        return members, np.zeros((3, noff, 3), np.int64), np.zeros(noff, np.int64)

    k_run, k_bound = _bound(prog), _bound(prog)
    ma, ua, ba = state()
    mb, ub, bb = state()
    hist_a = {m: np.zeros(0, _core.HEV_DTYPE) for m in range(3)}
    hist_b = {m: np.zeros(0, _core.HEV_DTYPE) for m in range(3)}
    rows_b, cat_b, sku_b, amt_b = (np.zeros(1, _core.ROW_DTYPE), np.zeros(4, np.int32), np.zeros(4, np.int32),
                                   np.zeros(4, np.int64))
    hist_in, out_hist = np.zeros(600, _core.HEV_DTYPE), np.zeros(600, _core.HEV_DTYPE)
    off_b, out_b, fx_b = np.zeros(2, np.int64), np.zeros(1, _core.OUT_DTYPE), np.zeros((1, N), np.int64)
    with pytest.raises(ValueError, match="needs bind"):
        k_bound.run_bound(1, 0, 0)
    k_bound.bind(rows_b, cat_b, sku_b, amt_b, mb, np.zeros(2, np.int64), hist_in, off_b, out_hist, ub, bb, out_b,
                 fx_b)
    assert k_bound.bound[4] is mb
    for i in range(len(data["rows"])):
        row = data["rows"][i: i + 1].copy()
        m = int(row["member"][0])
        items = slice(int(row["item_start"][0]), int(row["item_end"][0]))
        row["item_start"], row["item_end"] = 0, items.stop - items.start
        out, fx, off = np.zeros(1, _core.OUT_DTYPE), np.zeros((1, N), np.int64), np.zeros(2, np.int64)
        oh = np.zeros(len(hist_a[m]) + 1, _core.HEV_DTYPE)
        k_run.run(row, np.zeros(1, np.int64), data["cat"][items], data["sku"][items], data["amount"][items], ma,
                  np.array([0, len(hist_a[m])], np.int64), hist_a[m], off, oh, ua, ba, out, fx)
        hist_a[m] = oh[off[0]: off[1]].copy()
        n_items = items.stop - items.start
        rows_b[:] = row
        cat_b[:n_items], sku_b[:n_items], amt_b[:n_items] = (data["cat"][items], data["sku"][items],
                                                             data["amount"][items])
        hist_in[: len(hist_b[m])] = hist_b[m]
        k_bound.run_bound(1, n_items, len(hist_b[m]))
        hist_b[m] = out_hist[off_b[0]: off_b[1]].copy()
        assert out_b.tobytes() == out.tobytes() and fx_b.tobytes() == fx.tobytes(), i
        assert hist_b[m].tobytes() == hist_a[m].tobytes()
    assert ma.tobytes() == mb.tobytes() and ua.tobytes() == ub.tobytes() and ba.tobytes() == bb.tobytes()
    assert int(ma["purchases"].sum()) == len(data["rows"])
    with pytest.raises(ValueError, match="exceed the bound buffers"):
        k_bound.run_bound(1, 5, 0)                          # 4 items were bound
    with pytest.raises(ValueError, match="exceed the bound buffers"):
        k_bound.run_bound(2, 0, 0)                          # one row was bound
    rows_b["member"] = 3                                    # the same checks as run: a member beyond the state
    with pytest.raises(ValueError, match="names member 3, beyond the state"):
        k_bound.run_bound(1, 0, 0)


def _one_row_each(kernel: _core.Kernel, members: np.ndarray, noff: int,
                  hist: np.ndarray | None = None, amounts: list[int] | None = None) -> np.ndarray:
    """Run one purchase for each member, each its own segment, through ``kernel``; returns ``out``."""
    n = len(members)
    rows = np.zeros(n, _core.ROW_DTYPE)
    rows["member"] = np.arange(n)
    rows["amount"], rows["day"] = amounts if amounts is not None else 100, 20_000
    hist = np.zeros(0, _core.HEV_DTYPE) if hist is None else hist
    hist_off = np.zeros(n + 1, np.int64)
    hist_off[1:] = len(hist)
    out = np.zeros(n, _core.OUT_DTYPE)
    kernel.run(rows, np.arange(n, dtype=np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32),
               np.zeros(0, np.int64), members, hist_off, hist, np.zeros(n + 1, np.int64),
               np.zeros(len(hist) + n, _core.HEV_DTYPE), np.zeros((n, max(noff, 1), 3), np.int64),
               np.zeros(max(noff, 1), np.int64), out, np.zeros((0, N), np.int64))
    return out


def test_a_fact_against_a_constant_holds_as_the_plain_comparison_does_at_the_ends_of_int64():
    """The kernel tests a fact against a constant as one interval; at the ends of int64 (< the least,
    > the greatest, <= the greatest) the interval must say what the comparison says."""
    from loyalty_engine.program import P_NPARAMS

    lo, hi = -(1 << 63), (1 << 63) - 1
    consts = [lo, lo + 1, -1, 0, 1, hi - 1, hi]
    atoms = [(op, c) for op in range(6) for c in consts]   # ==, !=, <, <=, >, >=
    pool = np.asarray([w for op, c in atoms for w in (1, op, VARIABLES["points_balance"].slot, 0, c)], np.int64)
    conds = np.asarray([[0, 0, 1, 5 * k, 1] for k in range(len(atoms))], np.int64)
    offers = np.zeros((len(atoms), 8), np.int64)
    offers[:, 0] = np.arange(len(atoms))                   # one bonus point each, no limits
    offers[:, 3] = 1
    kernel = _core.Kernel(np.zeros(0, np.int64), pool, conds, np.zeros((0, 5), np.int64), offers,
                          np.zeros((0, 4), np.int64), np.zeros(P_NPARAMS, np.int64))
    members = np.zeros(len(consts), _core.MSTATE_DTYPE)
    members["referrer"], members["last_day"] = -1, -1
    members["points"] = consts
    out = _one_row_each(kernel, members, len(atoms))
    for i, x in enumerate(consts):
        fired = int(out[i]["offers_fired"]) & ((1 << 64) - 1)
        for k, (op, c) in enumerate(atoms):
            want = [x == c, x != c, x < c, x <= c, x > c, x >= c][op]
            assert (fired >> k) & 1 == want, (x, op, c)


def test_a_history_the_kernel_cannot_count_is_refused():
    prog = Program.from_dict({"name": "k", "offers": [{"name": "o", "when": "visits_30d > 0",
                                                       "effect": {"bonus_points": 1}}]})
    kernel = _bound(prog)
    members = np.zeros(1, _core.MSTATE_DTYPE)
    members["referrer"], members["last_day"] = -1, -1
    hist = np.zeros(1, _core.HEV_DTYPE)
    hist["day"], hist["visits"], hist["amount"] = 19_990, 1, 50
    assert _one_row_each(kernel, members.copy(), 1, hist)["offers_fired"][0] == 1
    hist["visits"] = 2                                      # a purchase is one visit, a refund's fix 0 or -1
    with pytest.raises(ValueError, match="history event 0 counts 2 visits"):
        _one_row_each(kernel, members.copy(), 1, hist)


@pytest.mark.parametrize("tiers", [{"metric": "spend", "window_days": 365},     # the 365-day window serves
                                   {"metric": "spend", "window_days": 200},     # a window of its own
                                   {"metric": "spend", "window_days": 30}])
def test_the_kernel_agrees_with_the_pure_python_peer(tiers: dict[str, Any]):
    """The benchmark's program (and its tier window changed) against its pure-Python peer, row by row:
    the kernel keeps the tier window apart only when it is not the 365-day window."""
    from loyalty_engine.bench.rules_workload import PROGRAM, kernel_buffers, kernel_evaluate, make_rows, python_evaluate

    prog = Program.from_dict({**PROGRAM, "tiers": {**PROGRAM["tiers"], **tiers}})
    data = make_rows(prog, 6_000, 40, seed=3)
    out = kernel_evaluate(prog, data, 40)
    peer = python_evaluate(prog, data, 40)
    assert [tuple(map(int, r)) for r in out[["points", "credit", "tier_after"]].tolist()] == peer
    assert len({t for _, _, t in peer}) >= 3               # the tiers moved: the window mattered
    # the benchmark's kept kernel and members' arrays start each run from fresh members again
    buffers = kernel_buffers(len(data["rows"]))
    for _ in range(2):
        assert kernel_evaluate(prog, data, 40, buffers).tobytes() == out.tobytes()


@pytest.mark.parametrize("rounding", ["floor", "half_even", "ceil"])
def test_earned_points_are_rounded_as_exact_fractions_are(rounding: str):
    """The base rate's points, 3 per 1,000, rounded three ways; the largest amounts need 128 bits."""
    from fractions import Fraction

    prog = Program.from_dict({"name": "k", "earn": {"points": 3, "per": 1000}, "rounding": rounding})
    amounts = [1, 166, 167, 500, 1000, 1500, 2500, 3500, 4833, 4834, 999_999, (1 << 62) + 1, (1 << 63) - 1]
    members = np.zeros(len(amounts), _core.MSTATE_DTYPE)
    members["referrer"], members["last_day"] = -1, -1
    out = _one_row_each(_bound(prog), members, 1, amounts=amounts)
    for a, got in zip(amounts, out["base_points"].tolist(), strict=True):
        x = Fraction(3 * a, 1000)
        want = {"floor": x.numerator // x.denominator, "ceil": -(-x.numerator // x.denominator),
                "half_even": round(x)}[rounding]
        assert got == want, (a, rounding)


def _run_workload(kernel: Any, prog: Any, data: dict[str, np.ndarray], members: int) -> tuple[np.ndarray, ...]:
    """One run of the rules workload's rows (fresh members) through ``kernel``: results and state."""
    rows = data["rows"]
    state = np.zeros(members, _core.MSTATE_DTYPE)
    state["tier"], state["last_day"], state["earn_day"], state["referrer"] = 1, -1, -1, -1
    state["review_day"] = 1 << 30
    noff = max(len(prog.offers), 1)
    use = np.zeros((members, noff, 3), np.int64)
    out_hist, out = np.zeros(len(rows), _core.HEV_DTYPE), np.zeros(len(rows), _core.OUT_DTYPE)
    out_off = np.zeros(members + 1, np.int64)
    kernel.run(rows, rows["member"].astype(np.int64), data["cat"], data["sku"], data["amount"], state,
               np.zeros(members + 1, np.int64), np.zeros(0, _core.HEV_DTYPE), out_off, out_hist, use,
               np.zeros(noff, np.int64), out, np.zeros((0, len(VARIABLES)), np.int64))
    return out, state, use, out_hist[: out_off[-1]], out_off


def test_the_kernel_keeps_its_scratch_between_runs_and_gives_the_same_results() -> None:
    """run() keeps its scratch (segments, windows) from call to call: a smaller batch after a bigger one,
    and a bigger one after that, give what a fresh kernel gives."""
    from loyalty_engine.bench.rules_workload import make_rows, program

    prog = program()
    c = prog.compiled

    def kernel() -> Any:
        return _core.Kernel(c.code, c.pool, c.conds, c.rules, c.offers, c.tiers, c.params)

    kept = kernel()
    for n, members, seed in ((6_000, 1_500, 1), (2_000, 300, 2), (9_000, 2_500, 3)):
        data = make_rows(prog, n, members, seed=seed)
        got, want = _run_workload(kept, prog, data, members), _run_workload(kernel(), prog, data, members)
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), (n, members)
    kept.release_scratch()
    got = _run_workload(kept, prog, data, members)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
