"""A loyalty program as data: read from TOML or a dict, validated field by field, compiled to the
integer tables and bytecode that ``_core.evaluate`` runs.

See docs/rules.md for every field. Percentages are kept in basis points (1% = 100) and multipliers in
ten-thousandths (x1.5 = 15000), so ``multiplier = 1.5`` and ``credit_percent = 12.5`` are exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

from .errors import ConfigError
from .rules.config import Reader
from .rules.expr import ATOM_WORDS, EPOCH_ORDINAL, WEEKDAYS, Compiled, Symbols, compile_expr, predicate

__all__ = ["Program", "EarnRule", "Tier", "Offer", "Effect", "ROUNDING", "STACKING"]

ROUNDING = ("floor", "half_even", "ceil")
STACKING = ("multiply", "add", "best")
METRICS = ("points", "spend", "visits", "rfm")
REVIEWS = ("never", "month", "quarter", "year")
PERIODS = ("rolling", "month", "quarter", "year")      # the tier metric's window: rolling days, or calendar
EXPIRY = ("never", "days", "end_of_month", "end_of_year")
EFFECTS = ("bonus_points", "multiplier", "credit_percent", "credit_fixed", "discount_percent")
BP = 10_000  # basis of multipliers (x1 = 10000) and of percentages in basis points (100% = 10000)
MAX_WINDOW = 3650

# Column layout of the integer tables (kept in step with _core.pyx)
R_COND, R_SCOPE, R_SYM, R_KIND, R_VALUE, R_NCOL = range(6)        # earn rules
O_COND, O_EXCL, O_EFFECT, O_VALUE, O_LIMIT, O_PCOUNT, O_PDAYS, O_BUDGET, O_NCOL = range(9)  # offers
T_THRESHOLD, T_MULT, T_DISCOUNT, T_CASHBACK, T_NCOL = range(5)   # tiers
C_START, C_END, C_MODE, C_ATOMS, C_NATOMS, C_NCOL = range(6)    # conditions
(P_RATE_POINTS, P_RATE_PER, P_ROUNDING, P_MIN_BASKET, P_CAP_RECEIPT, P_CAP_DAY, P_STACKING,
 P_TIER_METRIC, P_TIER_WINDOW, P_REVIEW, P_GRACE, P_BDAY_POINTS, P_BDAY_WITHIN, P_ANNIV_POINTS,
 P_ANNIV_WITHIN, P_REF_REFERRER, P_REF_REFERRED, P_BURN_POINTS, P_BURN_VALUE, P_BURN_MIN, P_BURN_STEP,
 P_BURN_SHARE, P_HORIZON, P_TIER_PERIOD, P_RFM, P_NPARAMS) = (*range(25), 36)
#: P_RFM .. P_RFM + 11: the RFM score's bounds: recency days (4), visits (4), spend (4)


@dataclass(frozen=True, slots=True, kw_only=True)
class EarnRule:
    """An earn rule: when its condition holds, a multiplier or a fixed bonus, on the whole basket or on
    the items of one category or SKU."""

    name: str
    when: str
    scope: str = "basket"      #: "basket", "category" or "sku"
    scope_name: str = ""
    multiplier: int = 0        #: in ten-thousandths (x2 = 20000); 0 when the rule gives a bonus
    bonus: int = 0             #: fixed points


@dataclass(frozen=True, slots=True, kw_only=True)
class Tier:
    """A tier: reached when the metric over the window reaches ``threshold``."""

    name: str
    threshold: int
    multiplier: int = BP       #: earn multiplier in ten-thousandths
    discount_bp: int = 0       #: discount on every basket, basis points
    cashback_bp: int = 0       #: store credit on every basket, basis points


@dataclass(frozen=True, slots=True, kw_only=True)
class Effect:
    """What an offer gives: one of bonus_points, multiplier, credit_percent, credit_fixed,
    discount_percent (percentages in basis points, multipliers in ten-thousandths)."""

    kind: str
    value: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer:
    """A conditional offer with its limits and budget."""

    name: str
    when: str
    effect: Effect
    priority: int = 0
    exclusive: bool = False
    limit_per_member: int = 0           #: 0 = no limit
    limit_per_period: int = 0           #: at most this many times ...
    period_days: int = 0                #: ... per this many days
    budget: int = 0                     #: total points or credit the offer may give; 0 = no budget


@dataclass(frozen=True, slots=True, kw_only=True)
class Compiled_:
    """The program as the kernel sees it (NumPy int64 tables)."""

    code: np.ndarray
    pool: np.ndarray
    conds: np.ndarray
    rules: np.ndarray
    offers: np.ndarray
    tiers: np.ndarray
    params: np.ndarray


@dataclass(frozen=True, kw_only=True)
class Program:
    """A validated, compiled loyalty program. Build one with :meth:`from_toml` or :meth:`from_dict`."""

    name: str
    currency: str
    minor_unit: int
    timezone: str
    rounding: str
    negative_balance: str             #: "allow" or "cap" (refund clawbacks beyond the balance)
    earn_points: int                  #: ``earn_points`` points ...
    earn_per: int                     #: ... per this much money (minor unit)
    min_basket: int
    cap_per_receipt: int
    cap_per_day: int
    stacking: str
    expiry: str
    expiry_days: int
    rules: tuple[EarnRule, ...]
    tiers: tuple[Tier, ...]
    tier_metric: str
    tier_window_days: int
    #: "rolling" (the last ``tier_window_days`` days) or the calendar "month", "quarter" or "year" so far.
    tier_period: str
    #: The RFM score's bounds (recency days, visits, spend; four each) when the metric is "rfm".
    tier_rfm: tuple[int, ...]
    tier_review: str
    tier_grace_days: int
    offers: tuple[Offer, ...]
    signup_bonus: int
    birthday_bonus: int
    birthday_within: int
    anniversary_bonus: int
    anniversary_within: int
    referral_referrer: int
    referral_referred: int
    survey_bonus: int
    burn_points: int
    burn_value: int
    burn_min: int
    burn_step: int
    burn_max_share_bp: int
    occasions: dict[str, list[tuple[int, int]]]
    symbols: Symbols = field(repr=False)
    compiled: Compiled_ = field(repr=False)
    conditions: tuple[Compiled, ...] = field(repr=False)
    source: dict[str, Any] = field(repr=False)

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Program:
        """Read a program file; errors name the file, the line and the field."""
        p, text = _read_program_file(path)
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from e
        return cls._build(data, text, p)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> Program:
        """Read a program written in YAML (the same fields as the TOML file; needs PyYAML, the ``yaml``
        extra); errors name the file, the line and the field, as for TOML."""
        try:
            import yaml
        except ImportError:
            raise ConfigError("reading YAML programs needs PyYAML: pip install 'loyalty_engine[yaml]' "
                              "(or write the program in TOML)") from None
        p, text = _read_program_file(path)
        try:
            root = yaml.compose(text, Loader=_yaml_loader())
            data = yaml.load(text, Loader=_yaml_loader())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        lines: dict[tuple[str | int, ...], int] = {}

        def walk(node: Any, at: tuple[str | int, ...]) -> None:      # (the loader refuses aliases: a tree)
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    lines[(*at, k.value)] = k.start_mark.line + 1
                    walk(v, (*at, k.value))
            elif isinstance(node, yaml.SequenceNode):
                for i, v in enumerate(node.value):
                    lines[(*at, i)] = v.start_mark.line + 1
                    walk(v, (*at, i))

        if root is not None:
            walk(root, ())

        def line_of(field_path: tuple[str | int, ...]) -> int | None:
            while field_path:
                if field_path in lines:
                    return lines[field_path]
                field_path = field_path[:-1]
            return None

        return cls._build(data if data is not None else {}, line_of, p)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Program:
        """Build a program from a dict shaped like the TOML file."""
        return cls._build(data, None, "")

    @property
    def fingerprint(self) -> str:
        """A hash of the program's data: an engine remembers which program it ran."""
        return hashlib.blake2b(json.dumps(self.source, sort_keys=True, default=str).encode(),
                               digest_size=16).hexdigest()

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def tier_name(self, number: int) -> str:
        """The name of tier ``number`` (1 = the first tier; 0 = no tier)."""
        return self.tiers[number - 1].name if 0 < number <= len(self.tiers) else ""

    @classmethod
    def _build(cls, data: Any, text: str | Callable[[tuple[str | int, ...]], int | None] | None,
               source: str) -> Program:
        top = Reader(data, (), text, source)
        sym = Symbols()
        pool: list[int] = []
        conds: list[Compiled] = []

        def cond(r: Reader, key: str, extra: list[str]) -> int:
            parts = [f"({e})" for e in extra]
            if r.has(key):
                src = r.str(key)
                where = r.error("", key).args[0].removesuffix(": ")
                compile_expr(src, sym, [], where=where)  # check alone first: errors quote the user's text
                parts.insert(0, f"({src})")
            else:
                r.raw(key)
            if not parts:
                return -1
            full = " and ".join(parts)
            conds.append(compile_expr(full, sym, pool, where=r.name()))
            return len(conds) - 1

        name = top.str("name", "program")
        currency = top.str("currency", "IRR")
        minor_unit = top.int("minor_unit", 0, 0, 4)
        tz = top.str("timezone", "UTC")
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise top.error(f"unknown timezone {tz!r} (use an IANA name like 'Asia/Tehran' or 'UTC')",
                            "timezone") from None
        rounding = top.str("rounding", "floor", ROUNDING)
        negative = top.str("negative_balance", "cap", ("allow", "cap"))

        occasions: dict[str, list[tuple[int, int]]] = {}
        occ = top.table("occasions")
        if occ is not None:
            for key in list(occ.data):
                occ.raw(key)
                occasions[key] = _date_ranges(occ, key)
            occ.done()
        sym.occasions = occasions

        # tiers first: conditions may name them
        tiers: list[Tier] = []
        metric, window, review, grace, period = "spend", 365, "never", 0, "rolling"
        rfm: list[int] = []
        tt = top.table("tiers")
        if tt is not None:
            metric = tt.str("metric", "spend", METRICS)
            period = tt.str("period", "rolling", PERIODS)
            if period != "rolling" and tt.has("window_days"):
                raise tt.error(f"takes window_days (a rolling window) or period = {period!r} (the calendar "
                               f"{period} so far), not both", "period")
            window = tt.int("window_days", 365, 1, MAX_WINDOW)
            rf = tt.table("rfm")
            if metric == "rfm":
                if rf is None:
                    raise tt.error("metric = 'rfm' needs an [tiers.rfm] table: recency_days, visits and spend, "
                                   "four bounds each", "rfm")
                for key in ("recency_days", "visits", "spend"):
                    bounds = rf.ints(key)
                    if len(bounds) != 4 or any(not 0 <= b < 1 << 53 for b in bounds) or bounds != sorted(bounds):
                        raise rf.error(f"takes four bounds from the lowest up (the scores 5/4/3/2 for "
                                       f"recency, 2/3/4/5 for visits and spend), not {bounds!r}", key)
                    rfm += bounds
                rf.done()
            elif rf is not None:
                raise tt.error(f"an [tiers.rfm] table needs metric = 'rfm', not {metric!r}", "rfm")
            review = tt.str("review", "year", REVIEWS)
            if period != "rolling" and review != "never" and REVIEWS.index(review) < PERIODS.index(period):
                raise tt.error(f"review = {review!r} comes more often than period = {period!r}: a review would "
                               f"rank on part of a {period}; review every {period} (or less often)", "review")
            grace = tt.int("grace_days", 0, 0, 366)
            for lv in tt.tables("levels"):
                t = Tier(name=lv.str("name"), threshold=lv.int("threshold", None, 0),
                         multiplier=lv.scaled("multiplier", BP, BP, 0, 100 * BP),
                         discount_bp=lv.scaled("discount_percent", 100, 0, 0, BP),
                         cashback_bp=lv.scaled("cashback_percent", 100, 0, 0, BP))
                lv.done()
                if tiers and t.threshold <= tiers[-1].threshold:
                    raise lv.error(f"tiers must be listed from the lowest threshold up: {t.name!r} "
                                   f"({t.threshold}) comes after {tiers[-1].name!r} ({tiers[-1].threshold})",
                                   "threshold")
                if any(x.name == t.name for x in tiers):
                    raise lv.error(f"the tier name {t.name!r} is used twice", "name")
                tiers.append(t)
            if not tiers:
                raise tt.error("lists no levels; add [[tiers.levels]] tables or remove [tiers]")
            if tiers[0].threshold != 0:
                raise tt.error(f"the first tier ({tiers[0].name!r}) must have threshold 0: every member "
                               f"starts in it")
            tt.done()
        for i, t in enumerate(tiers):
            sym.tables["tier"][t.name] = i + 1

        et = top.table("earn") or Reader({}, ("earn",), text, source)
        earn_points = et.int("points", 1, 0)
        earn_per = et.int("per", 1, 1)
        min_basket = et.int("min_basket", 0, 0)
        cap_receipt = et.int("cap_per_receipt", 0, 0)
        cap_day = et.int("cap_per_day", 0, 0)
        stacking = et.str("stacking", "multiply", STACKING)
        et.done()

        ex = top.table("expiry")
        expiry, expiry_days = "never", 0
        if ex is not None:
            expiry = ex.str("kind", "days", EXPIRY)
            expiry_days = ex.int("days", 0 if expiry != "days" else None, 0, 36500)
            if expiry == "days" and expiry_days == 0:
                raise ex.error("must be at least 1 for kind = 'days'", "days")
            ex.done()

        rules: list[EarnRule] = []
        rule_rows: list[list[int]] = []
        for r in top.tables("earn_rules"):
            rname = r.str("name")
            extra = _filters(r)
            scope, scope_name, scope_sym = "basket", "", 0
            if r.has("category") and r.has("sku"):
                raise r.error("give either category or sku, not both", "sku")
            for kind in ("category", "sku"):
                if r.has(kind):
                    scope, scope_name = kind, r.str(kind)
                    scope_sym = sym.number(kind, scope_name, r.name(kind))
                    extra.append(f'"{scope_name}" in {"categories" if kind == "category" else "skus"}')
            c = cond(r, "when", extra)
            if r.has("multiplier") == r.has("bonus"):
                raise r.error("give exactly one of multiplier (e.g. 2 or 1.5) or bonus (points)")
            mult = r.scaled("multiplier", BP, 0, 0, 100 * BP) if r.has("multiplier") else 0
            bonus = r.int("bonus", 0, 0) if r.has("bonus") else 0
            r.done()
            rules.append(EarnRule(name=rname, when=conds[c].source if c >= 0 else "",
                                  scope=scope, scope_name=scope_name, multiplier=mult, bonus=bonus))
            rule_rows.append([c, {"basket": 0, "category": 1, "sku": 2}[scope], scope_sym,
                              0 if mult else 1, mult or bonus])

        offers: list[Offer] = []
        for o in top.tables("offers"):
            oname = o.str("name")
            c = cond(o, "when", _filters(o))
            eff = o.table("effect", required=True)
            assert eff is not None
            given = [k for k in EFFECTS if eff.has(k)]
            if len(given) != 1:
                raise eff.error(f"give exactly one of {', '.join(EFFECTS)}")
            kind = given[0]
            if kind == "multiplier":
                value = eff.scaled(kind, BP, None, 0, 100 * BP)
            elif kind in ("credit_percent", "discount_percent"):
                value = eff.scaled(kind, 100, None, 0, BP)
            else:
                value = eff.int(kind, None, 0)
            eff.done()
            per = o.table("limit_per_period")
            pcount, pdays = 0, 0
            if per is not None:
                pcount, pdays = per.int("count", None, 1), per.int("days", None, 1, MAX_WINDOW)
                per.done()
            budget = o.int("budget", 0, 0)
            if budget and kind in ("multiplier", "discount_percent"):
                raise o.error("a budget counts points or credit given; it applies to bonus_points and "
                              "credit effects, not to a multiplier or a discount", "budget")
            offer = Offer(name=oname, when=conds[c].source if c >= 0 else "", effect=Effect(kind=kind, value=value),
                          priority=o.int("priority", 0), exclusive=o.bool("exclusive", False),
                          limit_per_member=o.int("limit_per_member", 0, 0), limit_per_period=pcount,
                          period_days=pdays, budget=budget)
            o.done()
            offers.append((offer, c))  # type: ignore[arg-type]
        # higher priority first; the written order breaks ties
        order = sorted(range(len(offers)), key=lambda i: -offers[i][0].priority)  # type: ignore[index]
        offer_list = [offers[i][0] for i in order]  # type: ignore[index]
        offer_rows = []
        for i in order:
            of, c = offers[i]  # type: ignore[misc]
            offer_rows.append([c, int(of.exclusive), EFFECTS.index(of.effect.kind), of.effect.value,
                               of.limit_per_member, of.limit_per_period, of.period_days, of.budget])
        if len(offer_list) > 63:
            raise top.error("a program holds at most 63 offers", "offers")
        if len(rules) > 63:
            raise top.error("a program holds at most 63 earn rules", "earn_rules")

        bo = top.table("bonuses") or Reader({}, ("bonuses",), text, source)
        signup = bo.int("signup", 0, 0)
        survey = bo.int("survey", 0, 0)
        bday_pts, bday_within, ann_pts, ann_within, ref_a, ref_b = 0, 0, 0, 0, 0, 0
        b = bo.table("birthday")
        if b is not None:
            bday_pts, bday_within = b.int("points", None, 0), b.int("within_days", 0, 0, 180)
            b.done()
        a = bo.table("anniversary")
        if a is not None:
            ann_pts, ann_within = a.int("points", None, 0), a.int("within_days", 0, 0, 180)
            a.done()
        rf = bo.table("referral")
        if rf is not None:
            ref_a, ref_b = rf.int("referrer", 0, 0), rf.int("referred", 0, 0)
            rf.done()
        bo.done()

        bu = top.table("burn") or Reader({}, ("burn",), text, source)
        burn_points = bu.int("points", 1, 1)
        burn_value = bu.int("value", 0, 0)
        burn_min = bu.int("min_points", 0, 0)
        burn_step = bu.int("step", 1, 1)
        burn_share = bu.scaled("max_share_percent", 100, BP, 0, BP)
        bu.done()
        top.done()

        # history kept: the windows of the facts (365 days), the tier window or calendar period, and what a
        # review run after its grace days still looks back at
        span = {"rolling": window, "month": 31, "quarter": 92, "year": 366}[period]
        horizon = max(365, span + 1 + (grace if review != "never" else 0)) if tiers else 365
        params = np.zeros(P_NPARAMS, np.int64)
        params[[P_RATE_POINTS, P_RATE_PER, P_ROUNDING, P_MIN_BASKET, P_CAP_RECEIPT, P_CAP_DAY, P_STACKING,
                P_TIER_METRIC, P_TIER_WINDOW, P_REVIEW, P_GRACE, P_BDAY_POINTS, P_BDAY_WITHIN,
                P_ANNIV_POINTS, P_ANNIV_WITHIN, P_REF_REFERRER, P_REF_REFERRED, P_BURN_POINTS, P_BURN_VALUE,
                P_BURN_MIN, P_BURN_STEP, P_BURN_SHARE, P_HORIZON, P_TIER_PERIOD]] = [
            earn_points, earn_per, ROUNDING.index(rounding), min_basket, cap_receipt, cap_day,
            STACKING.index(stacking), METRICS.index(metric), window, REVIEWS.index(review), grace,
            bday_pts, bday_within, ann_pts, ann_within, ref_a, ref_b, burn_points, burn_value, burn_min,
            burn_step, burn_share, horizon, PERIODS.index(period)]
        if rfm:
            params[P_RFM: P_RFM + 12] = rfm
        # each condition: (code start, code end, predicate mode, its atoms' offset in the pool, atoms);
        # mode 0 runs the bytecode, 1 and 2 test the atoms (all, any) without the stack machine
        starts = np.zeros((len(conds), C_NCOL), np.int64)
        code: list[int] = []
        for i, c in enumerate(conds):
            # jump targets are relative to the condition's own code: rebase them
            rebased = list(c.code)
            for k in range(0, len(rebased), 2):
                if rebased[k] in (16, 17):
                    rebased[k + 1] += len(code)
            pred = predicate(c.code, 0, len(c.code), pool)
            mode, atoms = pred if pred is not None else (0, [])
            starts[i] = (len(code), len(code) + len(c.code), mode, len(pool), len(atoms) // ATOM_WORDS)
            pool += atoms
            code += rebased
        compiled = Compiled_(
            code=np.asarray(code, np.int64), pool=np.asarray(pool or [0], np.int64), conds=starts,
            rules=np.asarray(rule_rows, np.int64).reshape(-1, R_NCOL),
            offers=np.asarray(offer_rows, np.int64).reshape(-1, O_NCOL),
            tiers=np.asarray([[t.threshold, t.multiplier, t.discount_bp, t.cashback_bp] for t in tiers],
                             np.int64).reshape(-1, T_NCOL),
            params=params)
        return cls(name=name, currency=currency, minor_unit=minor_unit, timezone=tz, rounding=rounding,
                   negative_balance=negative, earn_points=earn_points, earn_per=earn_per,
                   min_basket=min_basket, cap_per_receipt=cap_receipt, cap_per_day=cap_day,
                   stacking=stacking, expiry=expiry, expiry_days=expiry_days, rules=tuple(rules),
                   tiers=tuple(tiers), tier_metric=metric, tier_window_days=window, tier_period=period,
                   tier_rfm=tuple(rfm),
                   tier_review=review,
                   tier_grace_days=grace, offers=tuple(offer_list), signup_bonus=signup,
                   birthday_bonus=bday_pts, birthday_within=bday_within, anniversary_bonus=ann_pts,
                   anniversary_within=ann_within, referral_referrer=ref_a, referral_referred=ref_b,
                   survey_bonus=survey, burn_points=burn_points, burn_value=burn_value, burn_min=burn_min,
                   burn_step=burn_step, burn_max_share_bp=burn_share, occasions=occasions, symbols=sym,
                   compiled=compiled, conditions=tuple(conds), source=data)


def _day(r: Reader, key: str, text: Any) -> int:
    if not isinstance(text, str | date):
        raise r.error(f"dates are written 'YYYY-MM-DD', not {text!r}", key)
    try:
        d = text if isinstance(text, date) else date.fromisoformat(text)
    except ValueError:
        raise r.error(f"dates are written 'YYYY-MM-DD', not {text!r}", key) from None
    return d.toordinal() - EPOCH_ORDINAL


def _read_program_file(path: str | os.PathLike[str]) -> tuple[str, str]:
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8") as f:
            return p, f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the program file {p!r}: {e}") from e


def _yaml_loader() -> Any:
    """PyYAML's safe loader, stricter where YAML 1.1 would surprise a program's author: a key given twice,
    an anchor or alias, or a number read in another base (``0100`` as 64, ``1:30`` as 90) is an error
    with its line, as TOML would have it."""
    import re as _re

    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent) or (self.check_event(yaml.NodeEvent) and self.peek_event().anchor):
                ev = self.peek_event()
                raise yaml.composer.ComposerError(None, None, "anchors and aliases are not taken in a program",
                                                  ev.start_mark)
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for k, _ in node.value:
                key = self.construct_object(k, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                            k.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

        def construct_yaml_int(self, node: Any) -> int:
            v = self.construct_scalar(node).replace("_", "")
            if not _re.fullmatch(r"[-+]?(0|[1-9][0-9]*)", v):
                raise yaml.constructor.ConstructorError(None, None, f"{v!r} is not a decimal whole number",
                                                        node.start_mark)
            return int(v)

    Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_yaml_int)
    return Loader


def _date_ranges(r: Reader, key: str) -> list[tuple[int, int]]:
    """An occasion: a list of days or [from, to] pairs (inclusive)."""
    v = r.data[key]
    items = v if isinstance(v, list) else [v]
    out = []
    for item in items:
        if isinstance(item, list):
            if len(item) != 2:
                raise r.error(f"a date range is [from, to], not {item!r}", key)
            lo, hi = _day(r, key, item[0]), _day(r, key, item[1])
            if hi < lo:
                raise r.error(f"the range {item!r} ends before it starts", key)
            out.append((lo, hi))
        else:
            d = _day(r, key, item)
            out.append((d, d))
    if not out:
        raise r.error("lists no dates", key)
    return out


def _filters(r: Reader) -> list[str]:
    """The shorthand filters of an earn rule or offer, as conditions."""
    out: list[str] = []
    for key, var in (("branch", "branch"), ("channel", "channel")):
        names = r.strs(key)
        if names:
            out.append(f"{var} in ({', '.join(json.dumps(n) for n in names)})")
    days = r.strs("weekdays")
    for d in days:
        if d not in WEEKDAYS:
            raise r.error(f"{d!r} is not a weekday; use {', '.join(WEEKDAYS)}", "weekdays")
    if days:
        out.append(f"weekday in ({', '.join(json.dumps(d) for d in days)})")
    hours = r.ints("hours")
    if hours:
        if len(hours) != 2 or not 0 <= hours[0] <= hours[1] <= 23:
            raise r.error(f"hours is [first, last] within 0-23, not {hours!r}", "hours")
        out.append(f"hour >= {hours[0]} and hour <= {hours[1]}")
    for key, op in (("from", ">="), ("until", "<=")):
        if r.has(key):
            v = r.raw(key)
            _day(r, key, v)
            out.append(f'date {op} date("{v}")')
        else:
            r.raw(key)
    if r.has("occasion"):
        occ = r.str("occasion")
        out.append(f'occasion("{occ}")')
    else:
        r.raw("occasion")
    if r.has("min_basket"):
        out.append(f"amount >= {r.int('min_basket', 0, 0)}")
    else:
        r.raw("min_basket")
    return out
