"""The engine: purchases, quotes, refunds, redemptions, tiers, offers, bonuses, the outbox, and the
property that one purchase at a time and a batch give identical ledgers."""

from __future__ import annotations

import json
import os
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loyalty_engine.engine import CREDIT, POINTS, Engine, Item, RowStatus, credit_account, points_account
from loyalty_engine.errors import ConfigError, InsufficientBalanceError, NotFoundError, ValidationError
from loyalty_engine.program import Program
from loyalty_engine.types import to_micros

T0 = datetime(2026, 1, 5, 12, tzinfo=UTC)

CLUB = {
    "name": "test shop", "timezone": "UTC",
    "earn": {"points": 1, "per": 1000},
    "expiry": {"kind": "days", "days": 365},
    "tiers": {"metric": "spend", "window_days": 365, "review": "year", "levels": [
        {"name": "bronze", "threshold": 0},
        {"name": "silver", "threshold": 1_000_000, "multiplier": 1.5},
        {"name": "gold", "threshold": 3_000_000, "multiplier": 2, "cashback_percent": 2, "discount_percent": 5}]},
    "earn_rules": [{"name": "cosmetics x2", "category": "cosmetics", "multiplier": 2}],
    "offers": [
        {"name": "bigger basket", "when": "avg_gap_days <= 12 and visits_90d >= 3 and amount >= 4 * avg_basket",
         "effect": {"credit_percent": 20}, "limit_per_member": 1},
        {"name": "come back", "when": "avg_gap_days >= 40 and days_since_last >= 0 and days_since_last <= 20",
         "effect": {"credit_percent": 20}, "limit_per_member": 1}],
    "bonuses": {"signup": 20, "birthday": {"points": 100, "within_days": 7},
                "referral": {"referrer": 50, "referred": 30}},
    "burn": {"points": 1, "value": 100, "min_points": 10, "step": 10, "max_share_percent": 50},
}


@pytest.fixture
def club(tmp_path):
    with Engine.open(tmp_path / "club", program=Program.from_dict(CLUB), sync="none") as e:
        e.enroll("anna", at=T0 - timedelta(days=30))
        yield e


def test_the_two_brochure_offers(club):
    # every 10 days about 50,000; then a basket of 200,000 -> 20% credit
    for k in range(4):
        r = club.purchase("anna", amount=50_000, at=T0 + timedelta(days=10 * k), ref=f"a{k}")
        assert r.offers == ()
    r = club.purchase("anna", amount=200_000, at=T0 + timedelta(days=40), ref="big")
    assert r.offers == ("bigger basket",) and r.credit_earned == 40_000
    assert r.facts["avg_basket"] == 50_000 and r.facts["avg_gap_days"] == 10
    assert "offer granted: bigger basket" in r.explain() and "avg_basket=50000" in r.explain()
    # once per member
    r = club.purchase("anna", amount=400_000, at=T0 + timedelta(days=50), ref="big2")
    assert "bigger basket" not in r.offers

    club.enroll("bahram", at=T0)
    for k in range(3):  # every 45 days
        assert club.purchase("bahram", amount=80_000, at=T0 + timedelta(days=45 * k), ref=f"b{k}").offers == ()
    late = club.quote("bahram", amount=80_000, at=T0 + timedelta(days=90 + 21))
    assert late.offers == ()
    r = club.purchase("bahram", amount=80_000, at=T0 + timedelta(days=90 + 20), ref="b-back")
    assert r.offers == ("come back",) and r.credit_earned == 16_000


def test_a_purchase_that_reaches_gold_earns_the_next_one_golds_multiplier(club):
    r1 = club.purchase("anna", amount=3_000_000, at=T0, ref="p1")
    assert (r1.tier_before, r1.tier_after) == ("bronze", "gold")
    assert r1.points_earned == 3_000            # bronze rate for the purchase that lifts
    r2 = club.purchase("anna", amount=100_000, at=T0 + timedelta(hours=1), ref="p2")
    assert r2.tier_before == "gold"
    assert r2.discount == 5_000                 # gold's 5% discount
    assert r2.points_earned == 95 * 2           # paid 95,000 at x2
    assert r2.credit_earned == 95_000 * 2 // 100
    kinds = [(e.kind, e.data.get("after")) for e in club.events()]
    assert ("tier_changed", "gold") in kinds


def test_category_multiplier_applies_to_its_items_only(club):
    r = club.purchase("anna", amount=300_000, at=T0, ref="p", items=[
        Item(sku="lipstick", category="cosmetics", amount=100_000), Item(sku="bread", category="food", amount=200_000)])
    assert r.rules == ("cosmetics x2",)
    assert (r.base_points, r.points_earned) == (300, 400)


@pytest.mark.parametrize("when", ['category_amount("toys") >= 50_000',           # a predicate's atom
                                  'category_amount("toys") * 2 >= 100_000',      # the stack machine
                                  'sku_amount("kite") + 0 >= 50_000'])
def test_a_condition_on_the_baskets_amounts_sees_them(tmp_path, when):
    """The kernel sums a basket's amounts by category and SKU only for a program whose conditions read
    them (an atom or the stack machine's code): these do."""
    prog = Program.from_dict({**CLUB, "earn_rules": [{"name": "toys", "when": when, "bonus": 7}]})
    with Engine.open(tmp_path / "club", program=prog, sync="none") as e:
        e.enroll("anna", at=T0 - timedelta(days=30))
        fired = []
        for k, toys in enumerate([60_000, 40_000, 50_000]):
            r = e.purchase("anna", amount=toys + 10_000, at=T0 + timedelta(days=k), ref=f"p{k}", items=[
                Item(sku="kite", category="toys", amount=toys), Item(sku="bread", category="food", amount=10_000)])
            fired.append(r.rules == ("toys",))
        assert fired == [True, False, True]


def test_retry_with_the_same_ref_changes_nothing(club):
    r = club.purchase("anna", amount=120_000, at=T0, ref="pos1-000123")
    before = club.ledger.balance(points_account(0))
    again = club.purchase("anna", amount=120_000, at=T0, ref="pos1-000123")
    assert again == r
    assert club.ledger.balance(points_account(0)) == before
    with pytest.raises(ValidationError, match="already used for another purchase"):
        club.purchase("anna", amount=999, at=T0, ref="pos1-000123")


def test_quote_commits_nothing(club):
    seq = club.ledger.head
    q = club.quote("anna", amount=3_000_000, at=T0)
    assert not q.committed and q.tier_after == "gold"
    assert club.ledger.head == seq
    assert club.member("anna").tier == "bronze"
    r = club.purchase("anna", amount=3_000_000, at=T0, ref="real")
    assert (r.points_earned, r.tier_after) == (q.points_earned, q.tier_after)


def test_refund_takes_back_the_refunded_share_and_undoes_the_upgrade(club):
    r = club.purchase("anna", amount=3_000_000, at=T0, ref="p1")
    assert r.tier_after == "gold" and r.points_earned == 3_000
    rf = club.refund("p1", amount=1_000_000, at=T0 + timedelta(days=1), ref="p1-r1")
    assert rf.points_taken == 1_000 and rf.tier_after == "silver"
    assert club.member("anna").tier == "silver"
    rf2 = club.refund("p1", amount=2_000_000, at=T0 + timedelta(days=2), ref="p1-r2")
    assert rf2.points_taken == 2_000 and rf2.tier_after == "bronze"
    assert club.ledger.balance(points_account(0)).available == 20    # the sign-up bonus stays
    assert club.refund("p1", amount=2_000_000, at=T0, ref="p1-r2") == rf2   # retry
    with pytest.raises(ValidationError, match="exceeds what is left"):
        club.refund("p1", amount=1, at=T0, ref="p1-r3")
    with pytest.raises(NotFoundError):
        club.refund("nope", amount=1, at=T0, ref="x")


def test_refund_after_spending_caps_at_zero_and_records_the_shortfall(club):
    club.purchase("anna", amount=1_000_000, at=T0, ref="p1")              # 1,000 points
    club.redeem("anna", points=1_000, at=T0 + timedelta(hours=1), ref="spend")
    rf = club.refund("p1", amount=1_000_000, at=T0 + timedelta(days=1), ref="r1")
    assert rf.points_taken == 20 and rf.shortfall == 980
    assert club.ledger.balance(points_account(0)).available == 0


def test_refund_under_allow_policy_goes_negative(tmp_path):
    prog = Program.from_dict({**CLUB, "negative_balance": "allow"})
    with Engine.open(tmp_path / "c", program=prog, sync="none") as e:
        e.enroll("anna", at=T0)
        e.purchase("anna", amount=1_000_000, at=T0, ref="p1")
        e.redeem("anna", points=1_000, at=T0, ref="spend")
        rf = e.refund("p1", amount=1_000_000, at=T0, ref="r1")
        assert rf.points_taken == 1_000 and rf.shortfall == 0
        assert e.ledger.balance(points_account(0)).available == -980


def test_redeeming_points_at_checkout(club):
    club.purchase("anna", amount=500_000, at=T0, ref="p1")                # 520 points
    r = club.purchase("anna", amount=100_000, at=T0 + timedelta(hours=1), ref="p2", redeem_points=500)
    assert r.points_redeemed == 500 and r.redeem_value == 50_000 and r.points_earned == 50
    assert club.member("anna").points == 520 - 500 + 50
    with pytest.raises(ValidationError, match="max share"):
        club.purchase("anna", amount=10_000, at=T0 + timedelta(hours=2), ref="p3", redeem_points=60)
    with pytest.raises(ValidationError, match="multiple of the program's step"):
        club.purchase("anna", amount=100_000, at=T0 + timedelta(hours=2), ref="p3", redeem_points=15)
    with pytest.raises(InsufficientBalanceError):
        club.purchase("anna", amount=10_000_000, at=T0 + timedelta(hours=2), ref="p3", redeem_points=1000)
    assert club.member("anna").points == 70   # refusals changed nothing
    with pytest.raises(InsufficientBalanceError):
        club.redeem("anna", points=1000, at=T0, ref="r")


def test_bonuses_signup_birthday_referral_survey(tmp_path):
    prog = Program.from_dict({**CLUB, "bonuses": {**CLUB["bonuses"], "survey": 15}})
    with Engine.open(tmp_path / "c", program=prog, sync="none") as e:
        e.enroll("anna", at=T0, birth_date=date(1990, 1, 10))
        e.enroll("bahram", at=T0, referred_by="anna")
        assert e.member("anna").points == 20
        r = e.purchase("anna", amount=10_000, at=T0, ref="a1")         # 5 days before the birthday
        assert r.event_points == 100
        assert e.purchase("anna", amount=10_000, at=T0 + timedelta(days=8), ref="a2").event_points == 0  # once a year
        r = e.purchase("bahram", amount=10_000, at=T0, ref="b1")
        assert r.event_points == 30 and r.referrer_points == 50
        assert e.purchase("bahram", amount=10_000, at=T0 + timedelta(days=1), ref="b2").event_points == 0
        assert e.survey("bahram", at=T0, ref="survey-1") == 15
        assert e.member("anna").points == 20 + 10 + 100 + 10 + 50
        assert e.member("bahram").points == 20 + 10 + 30 + 10 + 15
        with pytest.raises(NotFoundError):
            e.enroll("c", at=T0, referred_by="nobody")


def test_outbox_events_and_ack(club):
    club.purchase("anna", amount=3_000_000, at=T0, ref="p1")
    evs = club.events()
    assert [e.kind for e in evs][:2] == ["welcome", "points_changed"]
    assert {"tier_changed", "points_changed"} <= {e.kind for e in evs}
    assert club.ack(evs[1].seq) == 2
    assert [e.seq for e in club.events()] == [e.seq for e in evs[2:]]
    assert club.events(after=evs[-1].seq) == []


def test_event_numbers_go_on_across_reopening_and_acks(tmp_path):
    path, prog = tmp_path / "club", Program.from_dict(CLUB)
    with Engine.open(path, program=prog, sync="none") as e:
        e.enroll("anna", at=T0)
        e.purchase("anna", amount=300_000, at=T0, ref="p1")
        first = [ev.seq for ev in e.events()]
    assert first == list(range(1, len(first) + 1))
    with Engine.open(path, program=prog, sync="none") as e:       # numbering continues after the last event
        e.purchase("anna", amount=300_000, at=T0 + timedelta(days=1), ref="p2")
        second = [ev.seq for ev in e.events()]
        assert second[: len(first)] == first and second[len(first)] == first[-1] + 1
        assert e.ack(second[-1]) == len(second) and e.events() == []
    with Engine.open(path, program=prog, sync="none") as e:       # ... and after every event was acknowledged
        e.purchase("anna", amount=300_000, at=T0 + timedelta(days=2), ref="p3")
        assert e.events()[0].seq == second[-1] + 1


def test_expiry_removes_points_and_queues_events(club):
    club.purchase("anna", amount=1_000_000, at=T0, ref="p1")
    assert club.expire(T0 + timedelta(days=366)) >= 1
    assert club.member("anna").points == 0
    assert any(e.kind == "points_changed" and e.data.get("reason") == "expiry" for e in club.events())


def _expiry_club(path):
    """A club where expire(T0 + 400 days) expires anna's sign-up bonus and bahram's points, and sends anna
    a birthday notice (her birthday is three days later)."""
    e = Engine.open(path, program=Program.from_dict(CLUB), sync="none")
    e.enroll("anna", at=T0, birth_date=date(1990, 2, 12))
    e.enroll("bahram", at=T0)
    e.purchase("bahram", amount=100_000, at=T0 + timedelta(hours=1), ref="p1")
    return e


def _points(e):
    return [e.ledger.balance(points_account(i)).available for i in range(e.members)]


def test_an_expiry_whose_events_fail_commits_nothing_and_the_next_one_does_it_all_once(tmp_path, monkeypatch):
    """expire() is one transaction: the expiry transfers, their points_changed events and the birthday
    notices commit together. An error while writing the events leaves the ledger, the balances and the
    outbox as they were; the next expire() then expires and reports everything, once, numbered on."""
    from click.testing import CliRunner

    from loyalty_engine.cli import main

    at = T0 + timedelta(days=400)
    path = tmp_path / "c"
    with _expiry_club(path) as e:
        events0, head0, points0 = e.events(), e.ledger.head, _points(e)
        put = e._put_event

        def failing(txn, kind, *a, **k):
            if kind == "birthday_soon":
                raise OSError("disk full")
            put(txn, kind, *a, **k)

        monkeypatch.setattr(e, "_put_event", failing)
        with pytest.raises(OSError, match="disk full"):
            e.expire(at)
        monkeypatch.undo()
        assert e.events() == events0 and e.ledger.head == head0 and _points(e) == points0 == [20, 120]
        assert e.ledger.verify().ok and e.member("anna").points == 20
        assert e.expire(at) == 2
        new = e.events()[len(events0):]
        assert [(ev.kind, ev.member, ev.data.get("delta")) for ev in new] == [
            ("points_changed", "anna", -20), ("points_changed", "bahram", -120), ("birthday_soon", "anna", None)]
        assert [ev.seq for ev in e.events()] == list(range(1, len(events0) + 4))
        assert _points(e) == [0, 0] and e.member("bahram").points == 0
        assert e.expire(at) == 0 and e.events()[len(events0):] == new     # nothing left to expire or notify
    with Engine.open(path, program=Program.from_dict(CLUB), sync="none") as e:
        assert e.events()[len(events0):] == new and e.expire(at + timedelta(days=1)) == 0
        assert e.events()[len(events0):] == new
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 0 and ": ok;" in result.output


def test_an_expiry_retried_after_the_map_grew_writes_its_events_once(tmp_path, monkeypatch):
    """The ledger retries a write that filled the LMDB map after growing it: expire()'s events and notices
    are then written by the second attempt only, numbered as if the first never ran."""
    import lmdb

    at = T0 + timedelta(days=400)
    with _expiry_club(tmp_path / "c") as e:
        events0 = e.events()
        put = e._put_event
        calls = []

        def full_once(txn, kind, *a, **k):
            calls.append(kind)
            put(txn, kind, *a, **k)
            if len(calls) == 2:
                raise lmdb.MapFullError("map full")

        monkeypatch.setattr(e, "_put_event", full_once)
        assert e.expire(at) == 2
        assert calls == ["points_changed", "points_changed", "points_changed", "points_changed", "birthday_soon"]
        new = e.events()[len(events0):]
        assert [(ev.seq, ev.kind, ev.member) for ev in new] == [
            (len(events0) + 1, "points_changed", "anna"), (len(events0) + 2, "points_changed", "bahram"),
            (len(events0) + 3, "birthday_soon", "anna")]
        assert _points(e) == [0, 0] and e.ledger.verify().ok


def test_state_survives_reopening(tmp_path):
    prog = Program.from_dict(CLUB)
    with Engine.open(tmp_path / "c", program=prog, sync="none") as e:
        e.enroll("anna", at=T0)
        e.purchase("anna", amount=3_000_000, at=T0, ref="p1")
    with Engine.open(tmp_path / "c", program=prog, sync="none") as e:
        m = e.member("anna")
        assert (m.tier, m.purchases, m.points) == ("gold", 1, 3_020)
        assert e.purchase("anna", amount=100_000, at=T0 + timedelta(days=1), ref="p2").tier_before == "gold"
        assert e.receipt("p1").points_earned == 3_000


def test_bad_input_is_refused_clearly(club):
    with pytest.raises(NotFoundError, match="no member 'nobody'"):
        club.purchase("nobody", amount=1, at=T0, ref="x")
    with pytest.raises(ValidationError, match="amount must be > 0"):
        club.purchase("anna", amount=0, at=T0, ref="x")
    with pytest.raises(ValidationError, match="integer"):
        club.purchase("anna", amount=1.5, at=T0, ref="x")
    with pytest.raises(ValidationError, match="naive|timezone"):
        club.purchase("anna", amount=1, at=datetime(2026, 1, 1), ref="x")
    with pytest.raises(ValidationError, match="ref"):
        club.purchase("anna", amount=1, at=T0, ref="")
    with pytest.raises(ConfigError):
        Engine.open("/tmp/never", program={"not": "a program"})  # type: ignore[arg-type]
    club.purchase("anna", amount=1000, at=T0, ref="x")
    with pytest.raises(ValidationError, match="time order"):
        club.purchase("anna", amount=1000, at=T0 - timedelta(days=2), ref="y")
    assert club.ledger.verify().ok


def test_batch_rows_report_their_status(club):
    club.purchase("anna", amount=1000, at=T0, ref="dup")
    t = pa.table({"member": ["anna", "ghost", "anna", "anna"], "ref": ["dup", "g1", "n1", "n2"],
                  "at": pa.array([T0, T0, T0 + timedelta(days=1), T0 + timedelta(days=2)],
                                 pa.timestamp("us", tz="UTC")),
                  "amount": [1000, 1000, 2000, 3000], "redeem_points": [0, 0, 0, 7]})
    res = club.purchase_batch(t)
    assert res.column("status").to_pylist() == [RowStatus.DUPLICATE, RowStatus.UNKNOWN_MEMBER, RowStatus.OK,
                                                RowStatus.REDEEM_BELOW_MIN]
    assert res.column("points").to_pylist()[2] == 2
    with pytest.raises(ValidationError, match="timestamp without a timezone"):
        club.purchase_batch({"member": ["anna"], "ref": ["z"], "amount": [1],
                             "at": pa.array([datetime(2026, 1, 1)], pa.timestamp("us"))})
    with pytest.raises(ValidationError, match="missing column 'ref'"):
        club.purchase_batch({"member": ["anna"], "amount": [1], "at": [1]})


# -- one at a time and in a batch: identical ----------------------------------------------------------

CATS = ["cosmetics", "food", "toys"]
CONDS = ["amount >= 4 * avg_basket", "visits_30d >= 2", "days_since_last >= 0 and days_since_last <= 7",
         'tier in ("silver", "gold")', "is_first_purchase", "points_balance >= 100", "hour >= 18",
         'weekday in ("fri", "sat")', '"food" in categories', "spend_90d >= 50000", "referred",
         "credit_balance > 0", "days_to_birthday >= 0 and days_to_birthday <= 5"]


@st.composite
def programs(draw):
    metric = draw(st.sampled_from(["points", "spend", "visits", "rfm"]))
    window = draw(st.sampled_from([{"window_days": draw(st.integers(7, 400))}, {"period": "month"},
                                   {"period": "quarter"}, {"period": "year"}]))
    reviews = ["month", "quarter", "year"]
    levels = [{"name": "bronze", "threshold": 0}]
    for name in ("silver", "gold"):
        step = draw(st.integers(1, 4)) if metric == "rfm" else draw(st.integers(1, 300_000))
        levels.append({"name": name, "threshold": levels[-1]["threshold"] + step,
                       "multiplier": draw(st.sampled_from([1, 1.25, 2])),
                       "cashback_percent": draw(st.sampled_from([0, 1, 2.5])),
                       "discount_percent": draw(st.sampled_from([0, 5]))})
    rules = []
    for i in range(draw(st.integers(0, 3))):
        rule = {"name": f"r{i}", "when": draw(st.sampled_from(CONDS))}
        if draw(st.booleans()):
            rule["category"] = draw(st.sampled_from(CATS))
        if draw(st.booleans()):
            rule["multiplier"] = draw(st.sampled_from([1.5, 2, 3]))
        else:
            rule["bonus"] = draw(st.integers(1, 50))
        rules.append(rule)
    offers = []
    for i in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["bonus_points", "multiplier", "credit_percent", "credit_fixed",
                                     "discount_percent"]))
        value = {"bonus_points": 25, "multiplier": 2, "credit_percent": 10, "credit_fixed": 500,
                 "discount_percent": 10}[kind]
        offer = {"name": f"o{i}", "when": draw(st.sampled_from(CONDS)), "effect": {kind: value},
                 "priority": draw(st.integers(0, 3)), "exclusive": draw(st.booleans())}
        if draw(st.booleans()):
            offer["limit_per_member"] = draw(st.integers(1, 3))
        if draw(st.booleans()):
            offer["limit_per_period"] = {"count": 1, "days": draw(st.integers(1, 30))}
        if kind in ("bonus_points", "credit_percent", "credit_fixed") and draw(st.booleans()):
            offer["budget"] = draw(st.integers(1, 3000))
        offers.append(offer)
    return {
        "timezone": draw(st.sampled_from(["UTC", "Asia/Tehran", "Europe/Berlin"])),
        "rounding": draw(st.sampled_from(["floor", "half_even", "ceil"])),
        "earn": {"points": draw(st.integers(1, 3)), "per": draw(st.sampled_from([100, 1000, 333])),
                 "stacking": draw(st.sampled_from(["multiply", "add", "best"])),
                 "cap_per_receipt": draw(st.sampled_from([0, 400])), "cap_per_day": draw(st.sampled_from([0, 700])),
                 "min_basket": draw(st.sampled_from([0, 5000]))},
        "tiers": {"metric": metric,
                  **({"rfm": {"recency_days": [1, 5, 20, 60], "visits": [2, 3, 5, 8],
                              "spend": [20_000, 60_000, 150_000, 400_000]}} if metric == "rfm" else {}),
                  **window,
                  # a review no more often than the calendar period it ranks on
                  "review": draw(st.sampled_from(["never", *reviews[reviews.index(window.get("period", "month")):]])),
                  "grace_days": draw(st.integers(0, 20)), "levels": levels},
        "earn_rules": rules, "offers": offers,
        "bonuses": {"signup": draw(st.integers(0, 50)), "birthday": {"points": 40, "within_days": 3},
                    "anniversary": {"points": 25, "within_days": 2},
                    "referral": {"referrer": draw(st.integers(0, 60)), "referred": draw(st.integers(0, 60))}},
        "burn": {"points": 1, "value": 10, "min_points": 10, "step": 5, "max_share_percent": 50},
    }


@st.composite
def histories(draw):
    n_members = draw(st.integers(1, 4))
    rows = []
    for i in range(draw(st.integers(1, 40))):
        rows.append({
            "member": f"m{draw(st.integers(0, n_members - 1))}",
            "at": T0 + timedelta(days=draw(st.integers(0, 500)), minutes=draw(st.integers(0, 1439))),
            "amount": draw(st.integers(1, 400_000)), "category": draw(st.sampled_from(CATS + ["other"])),
            "redeem_points": draw(st.sampled_from([0, 0, 0, 10, 25, 100, 7])), "ref": f"r{i}"})
    births = [draw(st.one_of(st.none(), st.dates(date(1960, 1, 1), date(2005, 12, 31)))) for _ in range(n_members)]
    return n_members, births, sorted(rows, key=lambda r: r["at"])


def _play(path, prog_dict, n_members, births, rows, batch: bool):
    e = Engine.open(path, program=Program.from_dict({k: v for k, v in prog_dict.items() if v is not None}),
                    sync="none")
    for i in range(n_members):
        e.enroll(f"m{i}", at=T0 - timedelta(days=40 * i), birth_date=births[i],
                 referred_by="m0" if i == 2 else None)
    if batch:
        t = pa.table({"member": [r["member"] for r in rows], "ref": [r["ref"] for r in rows],
                      "at": pa.array([r["at"] for r in rows], pa.timestamp("us", tz="UTC")),
                      "amount": [r["amount"] for r in rows], "category": [r["category"] for r in rows],
                      "redeem_points": [r["redeem_points"] for r in rows]})
        half = len(rows) // 2
        statuses = (e.purchase_batch(t.slice(0, half)).column("status").to_pylist()
                    + e.purchase_batch(t.slice(half)).column("status").to_pylist())
    else:
        statuses = []
        for r in rows:
            try:
                e.purchase(r["member"], amount=r["amount"], at=r["at"], ref=r["ref"],
                           items=[Item(category=r["category"], sku="", amount=r["amount"])],
                           redeem_points=r["redeem_points"])
                statuses.append(0)
            except (ValidationError, InsufficientBalanceError) as exc:
                statuses.append(str(exc).split(":")[1].strip()[:12])
    return e, statuses


def _assert_same_balances(a: Engine, b: Engine, n_members: int) -> None:
    """Every member's points and credit accounts hold the same in both engines' ledgers."""
    ids = np.array([f(i) for i in range(n_members) for f in (points_account, credit_account)], np.uint64)
    assert a.ledger.balances(ids).tolist() == b.ledger.balances(ids).tolist()


def _assert_same_receipts(a: Engine, b: Engine, rows: list[dict], statuses: list, fields: tuple[str, ...]) -> None:
    """The receipts of the rows that were applied (status 0) agree in ``fields``."""
    for r, ok in zip(rows, statuses, strict=True):
        if ok == 0:
            ra, rb = a.receipt(r["ref"]), b.receipt(r["ref"])
            assert [getattr(ra, f) for f in fields] == [getattr(rb, f) for f in fields], r


def _over_programs_and_histories(share: int = 1) -> Any:
    """The property tests' Hypothesis setup: random programs and histories, ENGINE_PROPERTY_EXAMPLES
    examples (60 unless set) divided by ``share``."""
    def wrap(test: Any) -> Any:
        return settings(max_examples=int(os.environ.get("ENGINE_PROPERTY_EXAMPLES", "60")) // share, deadline=None,
                        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])(
            given(programs(), histories())(test))
    return wrap


@_over_programs_and_histories()
def test_single_and_batch_paths_give_identical_ledgers(tmp_path_factory, prog, history):
    n_members, births, rows = history
    base = tmp_path_factory.mktemp("club")
    a, sa = _play(base / "single", prog, n_members, births, rows, batch=False)
    b, sb = _play(base / "batch", prog, n_members, births, rows, batch=True)
    try:
        assert [s == 0 for s in sa] == [s == 0 for s in sb]
        _assert_same_balances(a, b, n_members)
        _assert_same_receipts(a, b, rows, sa, ("points_earned", "credit_earned", "discount", "points_redeemed",
                                               "tier_after", "offers", "rules"))
        for i in range(n_members):
            ma, mb = a.member(f"m{i}"), b.member(f"m{i}")
            assert (ma.tier, ma.points, ma.credit, ma.purchases, ma.offers_used) == \
                   (mb.tier, mb.points, mb.credit, mb.purchases, mb.offers_used)
        assert a.ledger.verify().ok and b.ledger.verify().ok
    finally:
        a.close()
        b.close()


@_over_programs_and_histories(2)
def test_predicates_and_the_stack_machine_give_identical_ledgers(tmp_path_factory, monkeypatch, prog, history):
    """The kernel tests most conditions atom by atom; with every condition on the stack machine instead
    (predicates turned off when the program compiles) a batch must post the same."""
    import loyalty_engine.program as program_module

    n_members, births, rows = history
    base = tmp_path_factory.mktemp("club")
    a, sa = _play(base / "predicates", prog, n_members, births, rows, batch=True)
    with monkeypatch.context() as mp:
        mp.setattr(program_module, "predicate", lambda *args: None)
        b, sb = _play(base / "machine", prog, n_members, births, rows, batch=True)
        assert not b.program.compiled.conds[:, 2].any()
    try:
        _assert_same_balances(a, b, n_members)
        assert sa == sb
        _assert_same_receipts(a, b, rows, sa, ("points_earned", "credit_earned", "discount", "tier_after", "offers",
                                               "rules"))
    finally:
        a.close()
        b.close()


@_over_programs_and_histories(2)
def test_offers_in_one_word_and_one_by_one_give_identical_ledgers(tmp_path_factory, prog, history):
    """Where no offer is exclusive the kernel takes the offers whose conditions hold from the row's
    condition word and then drops those their limits or budgets stop; an exclusive offer that never
    fires sends the kernel through its offers one by one in priority order instead: both must post
    the same."""
    n_members, births, rows = history
    prog = {**prog, "offers": [{**o, "exclusive": False} for o in prog["offers"]]}
    never = {"name": "never", "when": "false", "effect": {"bonus_points": 1}, "priority": 2, "exclusive": True}
    base = tmp_path_factory.mktemp("club")
    a, sa = _play(base / "word", prog, n_members, births, rows, batch=True)
    b, sb = _play(base / "loop", {**prog, "offers": [*prog["offers"], never]}, n_members, births, rows, batch=True)
    try:
        assert sa == sb
        _assert_same_balances(a, b, n_members)
        for i in range(n_members):
            ua, ub = a.member(f"m{i}").offers_used, b.member(f"m{i}").offers_used
            assert ua == {k: v for k, v in ub.items() if k != "never"} and not ub["never"]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("tz", ["Europe/Berlin", "Asia/Tehran", "America/New_York", "Australia/Lord_Howe"])
def test_one_purchase_and_a_batch_read_local_time_alike(tmp_path, tz):
    """The single path reads local time with zoneinfo (its offset cached per quarter hour), the batch path
    with Arrow: they must agree, DST changes included (every 5 minutes and 7 seconds over two years, and
    every second of the minutes around each change)."""
    with Engine.open(tmp_path / "c", program=Program.from_dict({"timezone": tz}), sync="none") as e:
        start = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp()) * 1_000_000
        at = np.arange(start, start + 730 * 86_400_000_000, 307_000_000, dtype=np.int64)
        zone = ZoneInfo(tz)
        offsets = np.array([datetime.fromtimestamp(t // 1_000_000, zone).utcoffset().total_seconds()
                            for t in at.tolist()])
        changes = at[1:][np.diff(offsets) != 0]                 # the zone's offset changed
        assert len(changes) == (0 if tz == "Asia/Tehran" else 4)   # (Tehran keeps no DST since 2022)
        near = [np.arange(c - 420_000_000, c + 420_000_000, 1_000_000, dtype=np.int64) for c in changes]
        at = np.concatenate([at, *near])
        batch = e._local_fields(at)
        want = list(zip(*(batch[k].tolist() for k in ("day", "hour", "weekday", "month", "dom")), strict=True))
        for i, t in enumerate(at.tolist()):
            assert e._local_one(t) == want[i], (tz, t)


# -- tiers on a calendar period --------------------------------------------------------------------------

def _tiered(period: str | None, review: str = "never") -> Program:
    tiers: dict = {"metric": "spend", "review": review, "levels": [
        {"name": "bronze", "threshold": 0}, {"name": "silver", "threshold": 2_000_000}]}
    if period:
        tiers["period"] = period
    return Program.from_dict({"name": "calendar", "timezone": "UTC", "earn": {"points": 1, "per": 1000},
                              "tiers": tiers})


CAL = [("a", datetime(2025, 12, 20, 12, tzinfo=UTC), 1_500_000), ("a", datetime(2026, 1, 5, 12, tzinfo=UTC), 1_000_000),
       ("a", datetime(2026, 1, 9, 12, tzinfo=UTC), 1_200_000), ("b", datetime(2026, 3, 30, 12, tzinfo=UTC), 1_900_000),
       ("b", datetime(2026, 4, 2, 12, tzinfo=UTC), 200_000), ("b", datetime(2026, 4, 3, 12, tzinfo=UTC), 1_900_000)]


@pytest.mark.parametrize(("period", "want"), [
    (None, ["bronze", "silver", "silver", "bronze", "silver", "silver"]),        # the last 365 days
    ("year", ["bronze", "bronze", "silver", "bronze", "silver", "silver"]),      # spend since 1 January
    ("quarter", ["bronze", "bronze", "silver", "bronze", "bronze", "silver"]),   # since the quarter began
])
def test_tier_metric_over_a_calendar_period_one_by_one_and_in_a_batch(tmp_path, period, want):
    prog = _tiered(period)
    with Engine.open(tmp_path / "one", program=prog, sync="none") as e:
        e.enroll("a", at=CAL[0][1] - timedelta(days=1))
        e.enroll("b", at=CAL[0][1] - timedelta(days=1))
        got = [e.purchase(m, amount=amt, at=at, ref=f"r{k}").tier_after for k, (m, at, amt) in enumerate(CAL)]
    assert got == want
    with Engine.open(tmp_path / "batch", program=prog, sync="none") as e:
        e.enroll_batch(["a", "b"], at=CAL[0][1] - timedelta(days=1))
        out = e.purchase_batch({"member": [m for m, _, _ in CAL], "at": [at for _, at, _ in CAL],
                                "amount": [amt for _, _, amt in CAL], "ref": [f"r{k}" for k in range(len(CAL))]})
        assert [prog.tier_name(t) for t in out.column("tier_after").to_pylist()] == want


def test_a_calendar_year_review_downgrades_on_the_year_that_ended(tmp_path):
    prog = _tiered("year", review="year")
    with Engine.open(tmp_path / "c", program=prog, sync="none") as e:
        e.enroll("a", at=datetime(2026, 1, 1, tzinfo=UTC))
        assert e.purchase("a", amount=2_100_000, at=datetime(2026, 3, 1, tzinfo=UTC), ref="p1").tier_after == "silver"
        # 2027 is reviewed on 2026's spend (2.1 M): still silver; nothing bought in 2027 -> bronze in 2028
        r = e.purchase("a", amount=10_000, at=datetime(2027, 2, 1, tzinfo=UTC), ref="p2")
        assert (r.tier_before, r.tier_after) == ("silver", "silver")
        r = e.purchase("a", amount=10_000, at=datetime(2028, 1, 10, tzinfo=UTC), ref="p3")
        assert r.tier_before == "bronze"
        # a refund in 2028 re-ranks on 2028 so far
        e.refund("p3", amount=10_000, at=datetime(2028, 1, 11, tzinfo=UTC), ref="p3-back")
        assert e.member("a").tier == "bronze"


def test_a_period_and_a_rolling_window_are_not_both_taken():
    with pytest.raises(ConfigError, match="window_days .* or period = 'year'"):
        Program.from_dict({"name": "x", "tiers": {"period": "year", "window_days": 90, "levels": [
            {"name": "bronze", "threshold": 0}]}})
    with pytest.raises(ConfigError, match="must be one of 'rolling', 'month', 'quarter', 'year'"):
        Program.from_dict({"name": "x", "tiers": {"period": "week", "levels": [{"name": "bronze", "threshold": 0}]}})


def test_a_refund_re_ranks_on_the_calendar_period_so_far(tmp_path):
    for period, after in (("year", "bronze"), (None, "silver")):
        with Engine.open(tmp_path / f"c-{period}", program=_tiered(period), sync="none") as e:
            e.enroll("a", at=datetime(2025, 12, 1, tzinfo=UTC))
            e.purchase("a", amount=500_000, at=datetime(2025, 12, 20, tzinfo=UTC), ref="dec")
            assert e.purchase("a", amount=2_100_000, at=datetime(2026, 1, 10, tzinfo=UTC),
                              ref="jan").tier_after == "silver"
            e.refund("jan", amount=300_000, at=datetime(2026, 1, 11, tzinfo=UTC), ref="jan-back")
            # the year so far is 1.8 M: bronze; the last 365 days still hold December's 0.5 M: 2.3 M, silver
            assert e.member("a").tier == after, period


# -- tiers on an RFM score -------------------------------------------------------------------------------

RFM = {"recency_days": [7, 30, 90, 180], "visits": [2, 4, 8, 12], "spend": [100_000, 500_000, 1_000_000, 5_000_000]}


def _rfm_program(review: str = "never") -> Program:
    return Program.from_dict({"name": "rfm", "timezone": "UTC", "earn": {"points": 1, "per": 1000},
                              "tiers": {"metric": "rfm", "window_days": 365, "review": review, "rfm": RFM,
                                        "levels": [{"name": "bronze", "threshold": 0},
                                                   {"name": "silver", "threshold": 9},
                                                   {"name": "gold", "threshold": 12}]}})


def _rfm_score(recency: int, visits: int, spend: int) -> int:
    """The score as docs/rules.md defines it, written out plainly."""
    r = 5 if recency <= 7 else 4 if recency <= 30 else 3 if recency <= 90 else 2 if recency <= 180 else 1
    f = 1 + sum(visits >= b for b in RFM["visits"])
    m = 1 + sum(spend >= b for b in RFM["spend"])
    return r + f + m


def test_rfm_score_ranks_members_at_each_purchase_and_at_reviews(tmp_path):
    prog = _rfm_program(review="quarter")
    day0 = datetime(2026, 1, 5, 12, tzinfo=UTC)
    with Engine.open(tmp_path / "c", program=prog, sync="none") as e:
        e.enroll("a", at=day0 - timedelta(days=1))
        tiers, spend = [], 0
        for k in range(8):                                   # weekly purchases of 150,000
            spend += 150_000
            tiers.append(e.purchase("a", amount=150_000, at=day0 + timedelta(days=7 * k), ref=f"w{k}").tier_after)
        # at a purchase recency is 0: 5 + visits score + spend score
        want = []
        for k in range(8):
            s = _rfm_score(0, k + 1, 150_000 * (k + 1))
            want.append("gold" if s >= 12 else "silver" if s >= 9 else "bronze")
        assert tiers == [max(want[: i + 1], key=["bronze", "silver", "gold"].index) for i in range(8)]
        assert tiers[-1] == "gold" and _rfm_score(0, 8, 1_200_000) == 13
        # quarterly reviews rank on the score at the quarter's last day: the last purchase was 23 February
        # (day0 + 49), so on 31 March recency is 36 days: 3 + 4 + 4 = 11, silver
        assert _rfm_score(36, 8, 1_200_000) == 11
        later = e.purchase("a", amount=10_000, at=datetime(2026, 10, 2, 12, tzinfo=UTC), ref="late")
        assert later.tier_before == "silver" and _rfm_score(219, 8, 1_200_000) == 9     # 30 September
        # a year on, only October's small purchase is in the window on 31 March 2027: 2 + 1 + 1 = 4
        r = e.purchase("a", amount=10_000, at=datetime(2027, 4, 5, 12, tzinfo=UTC), ref="next")
        assert r.tier_before == "bronze" and _rfm_score(180, 1, 10_000) == 4
        # a refund re-ranks with the same score (recency 0 on the day of the refunded purchase)
        e.refund("next", amount=10_000, at=datetime(2027, 4, 5, 13, tzinfo=UTC), ref="next-back")
        assert e.member("a").tier == "bronze"


def test_rfm_needs_its_bounds():
    base = {"name": "x", "tiers": {"metric": "rfm", "levels": [{"name": "bronze", "threshold": 0}]}}
    with pytest.raises(ConfigError, match="needs an \\[tiers.rfm\\] table"):
        Program.from_dict(base)
    bad = {**base, "tiers": {**base["tiers"], "rfm": {**RFM, "visits": [4, 2, 8, 12]}}}
    with pytest.raises(ConfigError, match="visits.*four bounds from the lowest up"):
        Program.from_dict(bad)
    with pytest.raises(ConfigError, match="needs metric = 'rfm'"):
        Program.from_dict({"name": "x", "tiers": {"metric": "spend", "rfm": RFM,
                                                  "levels": [{"name": "bronze", "threshold": 0}]}})


# -- review fixes: history kept through a review's grace; refunds re-rank as at the purchase -------------

@pytest.mark.parametrize("period", [None, "year"])
def test_a_review_after_its_grace_still_sees_the_period_it_ranks(tmp_path, period):
    tiers: dict = {"metric": "spend", "review": "year", "grace_days": 30, "levels": [
        {"name": "bronze", "threshold": 0}, {"name": "silver", "threshold": 2_000_000}]}
    if period:
        tiers["period"] = period
    prog = Program.from_dict({"name": "grace", "timezone": "UTC", "earn": {"points": 1, "per": 1000},
                              "tiers": tiers})
    buys = [(datetime(2025, 1, 2, tzinfo=UTC), 2_100_000), (datetime(2026, 1, 20, tzinfo=UTC), 10_000),
            (datetime(2026, 2, 5, tzinfo=UTC), 10_000)]
    with Engine.open(tmp_path / "one", program=prog, sync="none") as e:
        e.enroll("a", at=datetime(2025, 1, 1, tzinfo=UTC))
        one = [e.purchase("a", amount=a, at=t, ref=f"r{k}").tier_after for k, (t, a) in enumerate(buys)]
    with Engine.open(tmp_path / "batch", program=prog, sync="none") as e:
        e.enroll("a", at=datetime(2025, 1, 1, tzinfo=UTC))
        out = e.purchase_batch({"member": ["a"] * 3, "at": [t for t, _ in buys], "amount": [a for _, a in buys],
                                "ref": ["r0", "r1", "r2"]})
        batch = [prog.tier_name(t) for t in out.column("tier_after").to_pylist()]
    # the review of 1 January 2026 runs after 30 days' grace, on 2025's 2.1 M: silver stays
    assert one == batch == ["silver", "silver", "silver"]


def test_refunds_re_rank_as_at_the_purchase_not_at_the_refund(tmp_path):
    with Engine.open(tmp_path / "rfm", program=_rfm_program(), sync="none") as e:
        e.enroll("a", at=datetime(2026, 1, 1, tzinfo=UTC))
        for k in range(7):
            r = e.purchase("a", amount=150_000, at=datetime(2026, 1, 5, tzinfo=UTC) + timedelta(days=7 * k),
                           ref=f"w{k}")
        assert r.tier_after == "gold"
        e.refund("w6", amount=1, at=datetime(2026, 2, 16, tzinfo=UTC) + timedelta(days=40), ref="late")
        assert e.member("a").tier == "gold"        # recency is scored at purchases, not at the refund
    with Engine.open(tmp_path / "month", program=_tiered("month"), sync="none") as e:
        e.enroll("a", at=datetime(2026, 1, 1, tzinfo=UTC))
        assert e.purchase("a", amount=2_100_000, at=datetime(2026, 1, 31, tzinfo=UTC), ref="jan").tier_after == "silver"
        e.refund("jan", amount=1, at=datetime(2026, 2, 1, tzinfo=UTC), ref="jan-1")
        assert e.member("a").tier == "silver"      # January still holds 2,099,999
        e.refund("jan", amount=200_000, at=datetime(2026, 2, 2, tzinfo=UTC), ref="jan-2")
        assert e.member("a").tier == "bronze"      # ... and now it does not


def test_review_and_period_and_rfm_bounds_are_checked():
    levels = [{"name": "bronze", "threshold": 0}]
    with pytest.raises(ConfigError, match="review = 'quarter' comes more often than period = 'year'"):
        Program.from_dict({"name": "x", "tiers": {"period": "year", "review": "quarter", "levels": levels}})
    Program.from_dict({"name": "x", "tiers": {"period": "quarter", "review": "year", "levels": levels}})
    with pytest.raises(ConfigError, match="recency_days.*four bounds"):
        Program.from_dict({"name": "x", "tiers": {"metric": "rfm", "levels": levels,
                                                  "rfm": {**RFM, "recency_days": [1, 2, 3, 2**63]}}})


_json_values = st.one_of(st.integers(-(1 << 70), 1 << 70), st.text(max_size=12), st.booleans(), st.none(),
                         st.lists(st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=12), st.text(max_size=12), st.integers(-(1 << 62), 1 << 62),
       st.dictionaries(st.text(max_size=6), _json_values, max_size=4))
def test_event_bodies_are_the_json_of_their_fields(kind, member, at, data):
    """Events are written without json.dumps for their usual fields; the bytes must be json.dumps'."""
    from loyalty_engine.engine import _event_json

    assert _event_json(kind, member, at, data) == json.dumps({"kind": kind, "member": member, "at": at,
                                                              "data": data}).encode()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=1, max_size=10), st.text(min_size=1, max_size=10))
def test_a_purchase_event_written_straight_is_the_json_of_its_fields(tmp_path_factory, name, ref):
    """A purchase's points_changed event is formatted in place (not through _event_json): its stored bytes
    must be json.dumps' of the event, whatever the member's name and the ref hold."""
    with Engine.open(tmp_path_factory.mktemp("ev"), program=Program.from_dict(CLUB), sync="none") as e:
        e.enroll(name, at=T0)
        r = e.purchase(name, amount=250_000, at=T0 + timedelta(hours=1), ref=ref)
        with e.ledger._ext_begin() as txn:
            raw = bytes(txn.get(b"E" + e._event_seq.to_bytes(8, "big"), db=e.ledger._ext_db()))
        want = {"kind": "points_changed", "member": name, "at": to_micros(T0 + timedelta(hours=1), "at"),
                "data": {"delta": r.points_earned, "reason": "purchase", "ref": ref}}
        assert raw == json.dumps(want).encode()


def test_enrolment_survives_the_map_growing_inside_its_transaction(tmp_path):
    """A transaction that fills the LMDB map is retried after the map grows: what it does to the
    engine's memory must not happen twice (the names were appended twice, the bonus added twice)."""
    prog = Program.from_dict(CLUB)      # a sign-up bonus of 20
    with Engine.open(tmp_path / "club", program=prog, sync="none", map_size=1 << 20) as eng:
        assert eng.enroll_batch([f"m{i}" for i in range(20_000)], at=T0, events=False) == 20_000
        assert eng.members == len(eng._member_names) == 20_000
        eng.enroll("solo", at=T0)
        assert eng.member("solo").points == 20 and eng._members[eng._names["solo"]]["points"] == 20
        assert eng.members == 20_001
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        assert eng.members == 20_001 and eng._names["solo"] == 20_000
        assert eng.member("m19999").points == 20


def test_a_retried_commit_numbers_the_outbox_without_gaps(tmp_path, monkeypatch):
    """A write whose transaction is retried (LMDB's map was full) or fails gives back the event numbers
    its attempt took: the outbox stays numbered 1, 2, 3, ...; and a purchase evaluated again in the retried
    transaction starts from the member's state before the first attempt (it counts once)."""
    import lmdb

    prog = Program.from_dict(CLUB)
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng, \
            Engine.open(tmp_path / "clean", program=prog, sync="none") as clean:
        for e in (eng, clean):
            e.enroll("a", at=T0)
        original = eng._row_events
        calls = {"n": 0}

        def full_once(txn, *args, **kwargs):
            original(txn, *args, **kwargs)          # events numbered in this attempt
            calls["n"] += 1
            if calls["n"] == 1:
                raise lmdb.MapFullError("the map is full (test)")

        monkeypatch.setattr(eng, "_row_events", full_once)
        eng.purchase("a", amount=300_000, at=T0 + timedelta(hours=1), ref="p1")
        assert calls["n"] == 2                      # the ledger grew the map and retried
        monkeypatch.setattr(eng, "_row_events", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError):
            eng.purchase("a", amount=300_000, at=T0 + timedelta(hours=2), ref="p2")
        monkeypatch.setattr(eng, "_row_events", original)
        eng.purchase("a", amount=300_000, at=T0 + timedelta(hours=3), ref="p3")
        seqs = [e.seq for e in eng.events()]
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 3
        for ref, h in (("p1", 1), ("p3", 3)):
            clean.purchase("a", amount=300_000, at=T0 + timedelta(hours=h), ref=ref)
        a, b = eng.member("a"), clean.member("a")
        assert (a.points, a.purchases, a.figures) == (b.points, b.purchases, b.figures) and a.purchases == 2
        assert eng.receipt("p3") == clean.receipt("p3")


@pytest.mark.parametrize(("quantity", "message"), [(2.5, "items\\[0\\].quantity must be a whole number.*2.5"),
                                                   ("3", "items\\[0\\].quantity must be a whole number.*'3'"),
                                                   (True, "whole number"), (-1, "must be >= 0.*-1"),
                                                   (2**70, "below 2\\*\\*31")])
def test_an_item_quantity_that_is_not_a_count_is_refused(tmp_path, quantity, message):
    with Engine.open(tmp_path / "c", program=Program.from_dict(CLUB), sync="none") as eng:
        eng.enroll("a", at=T0)
        with pytest.raises(ValidationError, match=message):
            eng.purchase("a", amount=1000, at=T0 + timedelta(hours=1), ref="r1",
                         items=[Item(category="food", amount=1000, quantity=quantity)])
        assert eng.member("a").purchases == 0


def test_enrolling_a_member_whose_accounts_a_crash_left_behind(tmp_path):
    """A crash between the accounts' write and the member's leaves the accounts: enrolling again finds
    them (EXISTS, the same fields) and goes on."""
    from loyalty_engine import Account, AccountFlags

    prog = Program.from_dict(CLUB)
    flags = 0 if prog.negative_balance == "allow" else AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
    with Engine.open(tmp_path / "c", program=prog, sync="none") as eng:
        eng.ledger.create_accounts([Account(id=points_account(0), asset=POINTS, flags=flags),
                                    Account(id=credit_account(0), asset=CREDIT,
                                            flags=AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)])
        eng.enroll("a", at=T0)
        assert eng.member("a").points == 20
        eng.ledger.create_accounts([Account(id=points_account(1), asset=POINTS, flags=flags),
                                    Account(id=credit_account(1), asset=CREDIT,
                                            flags=AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)])
        assert eng.enroll_batch(["b", "c"], at=T0) == 2
        assert eng.member("b").points == 20 and eng.member("c").points == 20


def test_an_interrupt_after_a_commit_keeps_its_events(tmp_path, monkeypatch):
    """An exception that reaches the caller after the transaction committed (Ctrl-C during the
    snapshot, say) must not give the committed events' numbers back: the next write would overwrite
    them in the outbox."""
    with Engine.open(tmp_path / "c", program=Program.from_dict(CLUB), sync="none") as eng:
        eng.enroll("a", at=T0)
        real = eng.ledger._after_commit

        def interrupted() -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(eng.ledger, "_after_commit", interrupted)
        with pytest.raises(KeyboardInterrupt):
            eng.purchase("a", amount=300_000, at=T0 + timedelta(hours=1), ref="p1")
        monkeypatch.setattr(eng.ledger, "_after_commit", real)
        assert eng.receipt("p1").points_earned > 0           # it committed
        before = [(e.seq, e.kind, e.data.get("ref")) for e in eng.events()]
        assert ("p1" in [r for _, _, r in before])
        eng.purchase("a", amount=300_000, at=T0 + timedelta(hours=2), ref="p2")
        after = [(e.seq, e.kind, e.data.get("ref")) for e in eng.events()]
        assert after[: len(before)] == before
        assert [s for s, _, _ in after] == list(range(1, len(after) + 1))


def test_purchases_after_the_member_table_grew_see_the_new_state(tmp_path):
    """One purchase at a time binds the state's arrays to the kernel; enrolling thousands replaces them,
    and the next purchase must use (and update) the new ones, as if everyone had been there from the start."""
    prog = Program.from_dict(CLUB)
    names = [f"n{i}" for i in range(3_000)]
    plays = [("anna", 900_000, "a1"), ("anna", 2_500_000, "a2"), (names[-1], 400_000, "b1"),
             (names[0], 50_000, "c1"), ("anna", 300_000, "a3")]
    with Engine.open(tmp_path / "grown", program=prog, sync="none") as grown, \
            Engine.open(tmp_path / "first", program=prog, sync="none") as first:
        for e in (grown, first):
            e.enroll("anna", at=T0 - timedelta(days=30))
        first.enroll_batch(names, at=T0 - timedelta(days=20))
        got = [grown.purchase(plays[0][0], amount=plays[0][1], at=T0, ref=plays[0][2])]
        grown.enroll_batch(names, at=T0 - timedelta(days=20))  # the member table is replaced
        got += [grown.purchase(m, amount=a, at=T0 + timedelta(days=k + 1), ref=r)
                for k, (m, a, r) in enumerate(plays[1:])]
        want = [first.purchase(m, amount=a, at=T0 + timedelta(days=k), ref=r) for k, (m, a, r) in enumerate(plays)]
        assert got == want
        assert got[1].tier_after == "gold" and got[2].points_earned > 0       # the second purchase lifted anna
        for m in ("anna", names[0], names[-1]):
            a, b = grown.member(m), first.member(m)
            assert (a.points, a.credit, a.tier, a.purchases, a.figures) == (b.points, b.credit, b.tier, b.purchases,
                                                                            b.figures)


def test_a_receipt_is_read_only_and_equals_its_stored_copy(club):
    r = club.purchase("anna", amount=3_000_000, at=T0, ref="x1", items=[Item(category="cosmetics", amount=3_000_000)])
    s = club.receipt("x1")
    assert r == s and hash(r) == hash(s) and r is not s
    assert (r.at, r.facts, r.rules, r.offers, r.tier_before, r.tier_after) == (s.at, s.facts, s.rules, s.offers,
                                                                                s.tier_before, s.tier_after)
    assert r.at == T0 and r.at.tzinfo is not None and r.rules == ("cosmetics x2",) and r.tier_after == "gold"
    assert r.facts["amount"] == 3_000_000 and r.points_earned == r.base_points + r.rule_points + r.bonus_points
    with pytest.raises(AttributeError):
        r.points_earned = 1
    assert "points_earned=" in repr(r) and "facts" not in repr(r)
    q = club.quote("anna", amount=3_000_000, at=T0, ref="x1", items=[Item(category="cosmetics", amount=3_000_000)])
    assert not q.committed and q != r            # a quote is not the committed receipt (and saw another history)
    assert r != "x1"


def test_transfers_packed_as_bytes_are_the_records_they_name():
    from loyalty_engine.engine import _RECORD, ISSUE_POINTS, _ref_id
    from loyalty_engine.types import RECORD_DTYPE, TransferFlags

    assert _RECORD.size == RECORD_DTYPE.itemsize
    e = Engine.__new__(Engine)
    recs = e._transfers([(ISSUE_POINTS, 77, 5, POINTS, 7), (3, 4, 0, POINTS, 8), (ISSUE_POINTS, 78, 9, CREDIT, 9),
                         (79, 2, 11, POINTS, 10)], "ref-1", 123, 456)
    assert len(recs) == 3                                   # the zero amount is left out
    assert [(int(r["id_lo"]), int(r["id_hi"])) for r in recs] == [_ref_id("ref-1", k) for k in (1, 2, 3)]
    assert recs["debit"].tolist() == [ISSUE_POINTS, ISSUE_POINTS, 79]
    assert recs["credit"].tolist() == [77, 78, 2] and recs["amount"].tolist() == [5, 9, 11]
    assert recs["asset"].tolist() == [POINTS, CREDIT, POINTS] and recs["code"].tolist() == [7, 9, 10]
    assert recs["at"].tolist() == [123] * 3 and recs["expires_at"].tolist() == [456, 0, 0]  # earned points only
    assert recs["flags"].tolist() == [TransferFlags.LINKED, TransferFlags.LINKED, 0]
    assert recs[["related_lo", "related_hi", "user_data", "timeout", "fp"]].tolist() == [(0,) * 5] * 3


def _memory(e: Engine) -> tuple[bytes, ...]:
    return (e._members.tobytes(), e._offer_use.tobytes(), e._budget.tobytes(),
            b"".join(k.to_bytes(8, "little") + v for k, v in sorted(e._hist.items())))


def test_a_club_whose_member_records_are_in_the_plain_encoding_opens_the_same(tmp_path):
    """Earlier versions stored member records plainly (raw offer usage and history events); they still
    load, and the next write of a member stores the compact encoding."""
    from loyalty_engine import _bulk
    from loyalty_engine.engine import MSTATE

    prog = Program.from_dict(CLUB)
    with Engine.open(tmp_path / "c", program=prog, sync="none") as e:
        e.enroll("anna", at=T0 - timedelta(days=30), birth_date=date(1990, 2, 1))
        e.enroll("ben", at=T0 - timedelta(days=30), referred_by="anna")
        for k in range(6):
            e.purchase("ben", amount=60_000 + k, at=T0 + timedelta(days=3 * k), ref=f"b{k}")
        e.purchase("anna", amount=900_000, at=T0, ref="a0")
        before = _memory(e)
        ben = e.member("ben")
        db = e.ledger._ext_db()
        with e.ledger._st().begin(write=True) as txn:       # rewrite every record plainly
            cur = txn.cursor(db=db)
            assert cur.set_range(b"M")
            plain = []
            for key, value in cur:
                if bytes(key[:1]) != b"M":
                    break
                name, state, use, hist = _bulk.member_fields(bytes(value), MSTATE.itemsize)
                raw = name.encode()
                plain.append((bytes(key), len(raw).to_bytes(2, "little") + raw + state
                              + len(use).to_bytes(4, "little") + use + hist))
            assert len(plain) == 2 and any(len(v) > len(txn.get(k, db=db)) for k, v in plain)
            for k, v in plain:
                txn.put(k, v, db=db)
    with Engine.open(tmp_path / "c", program=prog, sync="none") as e:
        assert _memory(e) == before
        assert e.member("ben") == ben
        e.purchase("ben", amount=70_000, at=T0 + timedelta(days=30), ref="b9")
        with e.ledger._ext_begin() as txn:
            stored = bytes(txn.get(b"M" + (1).to_bytes(8, "big"), db=e.ledger._ext_db()))
        assert stored[1] & 0x80 and stored == e._member_value(1)        # written compact again


def test_a_quote_and_a_refused_purchase_leave_memory_as_it_was(tmp_path):
    prog = dict(CLUB, offers=[{**CLUB["offers"][0], "budget": 10**9}, CLUB["offers"][1]])
    with Engine.open(tmp_path / "c", program=Program.from_dict(prog), sync="none") as e:
        e.enroll("anna", at=T0 - timedelta(days=30))
        e.enroll("ben", at=T0 - timedelta(days=30), referred_by="anna")
        for k in range(4):
            e.purchase("ben", amount=60_000, at=T0 + timedelta(days=3 * k), ref=f"b{k}")
        before = _memory(e)
        q = e.quote("ben", amount=900_000, at=T0 + timedelta(days=13))
        assert q.offers == ("bigger basket",) and q.credit_earned > 0       # it would use the offer's budget
        assert _memory(e) == before
        with pytest.raises(InsufficientBalanceError):
            e.purchase("ben", amount=900_000, at=T0 + timedelta(days=13), ref="too-much", redeem_points=10**6)
        assert _memory(e) == before
        r = e.purchase("ben", amount=900_000, at=T0 + timedelta(days=13), ref="real")
        assert (r.offers, r.credit_earned, r.points_earned) == (q.offers, q.credit_earned, q.points_earned)
        assert _memory(e) != before


def test_one_purchase_stores_the_member_record_and_results_the_engine_would():
    """OnePurchase builds a member's record and the results' bytes in C; they must be the engine's
    (Engine._member_value) and NumPy's reading of them, offer use or not, with or without offers."""
    from loyalty_engine import _core
    from loyalty_engine.engine import _FACTS_STRUCT, _OUT_STRUCT, N_FACTS, OUT

    rng = np.random.default_rng(3)
    out = np.zeros(1, OUT)
    out.view(np.uint8)[:] = rng.integers(0, 256, OUT.itemsize, dtype=np.uint8)
    facts = rng.integers(-(1 << 62), 1 << 62, N_FACTS)
    raw = out.tobytes() + facts.tobytes()
    assert _OUT_STRUCT.unpack_from(raw) == out[0].item()
    assert _FACTS_STRUCT.unpack_from(raw, OUT.itemsize) == tuple(facts.tolist())
    for noff in (0, 2):
        e = Engine.__new__(Engine)
        e._members = np.zeros(3, _core.MSTATE_DTYPE)
        e._members.view(np.uint8)[:] = rng.integers(0, 256, e._members.nbytes, dtype=np.uint8)
        e._offer_use = np.zeros((3, max(noff, 1), 3), np.int64)
        e._offer_use[1] = rng.integers(0, 5, (max(noff, 1), 3))
        e._member_names = ["a", "bé", "c" * 300]
        e._hist = {0: b"", 1: bytes(range(48)), 2: bytes(24)}
        e._program = Program.from_dict({**CLUB, "offers": CLUB["offers"][:noff]})
        one = _core.OnePurchase()
        kernel = _core.Kernel(*(getattr(e.program.compiled, k) for k in ("code", "pool", "conds", "rules", "offers",
                                                                          "tiers", "params")))
        one.bind(kernel, np.zeros(1, _core.ROW_DTYPE), np.zeros(1, np.int32), np.zeros(1, np.int32),
                 np.zeros(1, np.int64), e._members, np.zeros(2, np.int64), np.zeros(8, _core.HEV_DTYPE),
                 np.zeros(2, np.int64), np.zeros(8, _core.HEV_DTYPE), e._offer_use, np.zeros(max(noff, 1), np.int64),
                 np.zeros(1, OUT), np.zeros((1, N_FACTS), np.int64), noff)
        for idx in range(3):
            assert one.member_record(idx, e._member_names[idx].encode(), e._hist[idx]) == e._member_value(idx)
        with pytest.raises(ValueError, match="beyond the state"):
            one.member_record(3, b"x", b"")
        with pytest.raises(ValueError, match="16 fields"):
            one.evaluate((0,) * 15, 0, b"", 0, 0)
        with pytest.raises(ValueError, match="does not fit"):
            one.evaluate((0,) * 16, 0, bytes(24 * 8), 0, 0)
    with pytest.raises(ValueError, match="needs bind"):
        _core.OnePurchase().evaluate((0,) * 16, 0, b"", 0, 0)


def test_one_purchase_packs_the_chain_of_transfers_the_engine_describes():
    """OnePurchase.transfers packs a purchase's chain in C from the kernel's result; it must be the records
    Engine._transfers builds from the chain's parts, zero amounts and a referrer's bonus included."""
    from loyalty_engine import _core
    from loyalty_engine.engine import _OUT_STRUCT, ISSUE_CREDIT, ISSUE_POINTS, N_FACTS, OUT, REDEEMED_POINTS, _ref_id
    from loyalty_engine.types import RECORD_DTYPE, Code

    e = Engine.__new__(Engine)
    e._program = Program.from_dict({**CLUB, "expiry": {"kind": "days", "days": 30}})
    c = e.program.compiled
    out = np.zeros(1, OUT)
    one = _core.OnePurchase()
    with pytest.raises(ValueError, match="set_chain"):
        one.transfers(0, 0, 0, 0, 0, 0, 0)
    one.bind(_core.Kernel(c.code, c.pool, c.conds, c.rules, c.offers, c.tiers, c.params),
             np.zeros(1, _core.ROW_DTYPE), np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.int64),
             np.zeros(3, _core.MSTATE_DTYPE), np.zeros(2, np.int64), np.zeros(4, _core.HEV_DTYPE),
             np.zeros(2, np.int64), np.zeros(4, _core.HEV_DTYPE), np.zeros((3, 2, 3), np.int64), np.zeros(2, np.int64),
             out, np.zeros((1, N_FACTS), np.int64), 2)
    one.set_chain(REDEEMED_POINTS, ISSUE_POINTS, ISSUE_CREDIT, POINTS, CREDIT, Code.REDEEM, Code.EARN, Code.CREDIT,
                  Code.BONUS)
    rng = np.random.default_rng(8)
    at = to_micros(T0, "at")
    for k in range(200):
        for f in ("points", "credit", "redeemed", "referrer_points"):
            out[f] = rng.choice([0, 0, 1, int(rng.integers(1, 10**9)), -5])
        out["referrer"] = rng.integers(0, 3) if out["referrer_points"][0] else -1
        o = _OUT_STRUCT.unpack_from(out.tobytes())
        ref = f"pos-{k}"
        parts = [(points_account(1), REDEEMED_POINTS, int(out["redeemed"][0]), POINTS, Code.REDEEM),
                 (ISSUE_POINTS, points_account(1), int(out["points"][0]), POINTS, Code.EARN),
                 (ISSUE_CREDIT, credit_account(1), int(out["credit"][0]), CREDIT, Code.CREDIT)]
        if out["referrer_points"][0]:
            parts.append((ISSUE_POINTS, points_account(int(out["referrer"][0])), int(out["referrer_points"][0]), POINTS,
                          Code.BONUS))
        want = e._transfers(parts, ref, at, e._expiry_one(at, 20_000))
        lo, hi = _ref_id(ref, 0)
        got = one.transfers(lo & ~0xFF, hi, at, e._expiry_one(at, 20_000), points_account(1), credit_account(1),
                            points_account(int(out["referrer"][0])) if out["referrer_points"][0] else 0)
        assert np.frombuffer(got, RECORD_DTYPE).tobytes() == want.tobytes(), o
    with pytest.raises(ValueError, match="low byte"):
        one.transfers(1, 0, at, 0, 1, 2, 0)


def test_the_member_table_a_purchase_bound_is_freed_when_it_grows(tmp_path):
    import gc
    import weakref

    with Engine.open(tmp_path / "c", program=Program.from_dict(CLUB), sync="none") as e:
        e.enroll("anna", at=T0)
        e.purchase("anna", amount=100_000, at=T0 + timedelta(hours=1), ref="p1")
        old = weakref.ref(e._members)
        assert e._onep.bound is not None and e._onep.bound[4] is old()
        e.enroll_batch([f"n{i}" for i in range(5_000)], at=T0)
        gc.collect()
        assert old() is None and e._onep.bound is None     # no buffer of the kernel holds it
        with pytest.raises(ValueError, match="bind"):
            e._onep.budget_changed()                        # released: it refuses, not reads freed memory
        e.purchase("anna", amount=100_000, at=T0 + timedelta(hours=2), ref="p2")
        assert e._onep.bound[4] is e._members and e.member("anna").purchases == 2
        before = _memory(e)
        e._onep.restore()                                   # the purchase committed: nothing is kept to undo
        assert _memory(e) == before


def test_a_quote_or_a_refusal_keeps_the_balances_it_read_from_the_ledger(tmp_path):
    """A quote reads the member's balances from the ledger into memory and restores the rest; the balances
    stay (expire() compares memory with the ledger: a stale balance sent a second expiry event)."""
    path = tmp_path / "c"
    with Engine.open(path, program=Program.from_dict(CLUB), sync="none") as e:
        e.enroll("anna", at=T0)
        e.expire(T0 + timedelta(days=400))              # the sign-up bonus expires: memory says 0 now
    with Engine.open(path, program=Program.from_dict(CLUB), sync="none") as e:
        assert int(e._members[0]["points"]) == 20       # reloaded from the member's stored record
        e.quote("anna", amount=1_000, at=T0 + timedelta(days=401))
        assert int(e._members[0]["points"]) == 0        # the ledger's balance, read by the quote
        with pytest.raises(InsufficientBalanceError):
            e.purchase("anna", amount=1_000, at=T0 + timedelta(days=401), ref="r", redeem_points=10)
        assert int(e._members[0]["points"]) == 0


def test_a_failed_purchase_rolls_memory_back_even_after_another_commit_on_the_ledger(tmp_path, monkeypatch):
    """Whether a failed purchase committed is judged inside its transaction: a commit of the same ledger
    handle just before it (another thread posting directly) must not make memory keep the failed one."""
    with Engine.open(tmp_path / "c", program=Program.from_dict(CLUB), sync="none") as e:
        e.enroll("anna", at=T0)
        e.purchase("anna", amount=100_000, at=T0 + timedelta(hours=1), ref="p1")
        before = _memory(e)
        write = e.ledger._write

        def after_another_commit(fn, records=0):
            write(lambda txn: None)                     # someone else's commit on this handle comes first
            return write(fn, records)

        monkeypatch.setattr(e.ledger, "_write", after_another_commit)
        monkeypatch.setattr(e, "_row_events", lambda *a, **k: (_ for _ in ()).throw(OSError("disk")))
        with pytest.raises(OSError):
            e.purchase("anna", amount=100_000, at=T0 + timedelta(hours=2), ref="p2")
        assert _memory(e) == before and e.member("anna").purchases == 1


def test_one_purchase_refuses_calls_out_of_turn():
    """OnePurchase's methods refuse to run before bind() or after release() (they would read freed or
    missing buffers), and a committed purchase is forgotten: restore() then changes nothing."""
    from loyalty_engine import _core

    one = _core.OnePurchase()
    for call in (one.results, one.new_history, one.budget_changed, lambda: one.referrer(0),
                 lambda: one.member_record(0, b"", b"")):
        with pytest.raises(ValueError, match="bind"):
            call()
    one.restore()                                       # nothing kept: nothing happens


def test_a_purchase_retry_with_a_refunds_ref_is_refused(club):
    club.purchase("anna", amount=200_000, at=T0, ref="p1")
    club.refund("p1", amount=2_000, at=T0 + timedelta(hours=1), ref="rf1")
    with pytest.raises(ValidationError, match="'rf1' was already used for a refund"):
        club.purchase("anna", amount=2_000, at=T0 + timedelta(hours=2), ref="rf1")


def test_expiry_after_reopening_reports_each_expiry_once(tmp_path):
    """expire() reports the points each member lost; after reopening, memory holds the balances of the
    members' stored records (older than an expiry since), so it must compare with the ledger's."""
    path = tmp_path / "c"
    with Engine.open(path, program=Program.from_dict(CLUB), sync="none") as e:
        e.enroll("anna", at=T0)
        e.expire(T0 + timedelta(days=400))
    with Engine.open(path, program=Program.from_dict(CLUB), sync="none") as e:
        e.expire(T0 + timedelta(days=402))
        expiries = [ev.data["delta"] for ev in e.events() if ev.data.get("reason") == "expiry"]
        assert expiries == [-20]


# -- one process, one engine ------------------------------------------------------------------------------

def test_a_second_engine_on_the_same_directory_is_refused_until_the_first_closes(tmp_path):
    """An engine keeps members' state in memory and writes it through: a second engine on the same directory
    would work from stale memory, so Engine.open refuses it while the first is open (in this process, whatever
    its sync mode), and opens it once the first is closed. Plain ledger handles stay allowed."""
    from loyalty_engine import Ledger
    from loyalty_engine.errors import StorageError

    path = tmp_path / "c"
    prog = Program.from_dict(CLUB)
    first = Engine.open(path, program=prog, sync="none")
    first.enroll("anna", at=T0)
    for sync in ("none", "full"):
        with pytest.raises(StorageError, match=r"already open in an Engine \(this process holds engine.lock\)") as e:
            Engine.open(path, program=prog, sync=sync)
        assert repr(os.path.realpath(path)) in str(e.value)
    with Ledger.open(path, sync="none") as reader:                  # a plain ledger handle: allowed
        assert reader.balance(points_account(0)).available == 20
    assert (path / "engine.lock").read_text().strip() == str(os.getpid())
    first.enroll("bahram", at=T0)                                   # the first engine is unharmed
    first.close()
    first.close()                                                   # (again: nothing happens)
    with Engine.open(path, program=prog, sync="full") as second:
        assert second.members == 2


def test_an_engine_open_that_fails_half_way_releases_the_directory(tmp_path, monkeypatch):
    from loyalty_engine.errors import StorageError

    path = tmp_path / "c"
    prog = Program.from_dict(CLUB)
    monkeypatch.setattr(Engine, "_setup", lambda self: (_ for _ in ()).throw(StorageError("disk")))
    with pytest.raises(StorageError, match="disk"):
        Engine.open(path, program=prog, sync="none")               # a new directory: locked after creating it
    with pytest.raises(StorageError, match="disk"):
        Engine.open(path, program=prog, sync="none")               # it exists now: locked before the ledger
    monkeypatch.undo()
    with Engine.open(path, program=prog, sync="none") as e:
        e.enroll("anna", at=T0)


def test_an_engine_open_in_another_process_is_refused_while_this_one_holds_the_directory(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "c"
    script = ("import sys\nfrom loyalty_engine.engine import Engine\nfrom loyalty_engine.program import Program\n"
              "from loyalty_engine.errors import StorageError\n"
              "try:\n    Engine.open(sys.argv[1], program=Program.from_dict({'name': 'x'}), sync='none').close()\n"
              "except StorageError as e:\n    print(e)\n    sys.exit(3)\nprint('OPENED')\n")
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(os.path.dirname(__file__)), "src")}

    def other() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env,
                              timeout=120)

    with Engine.open(path, program=Program.from_dict(CLUB), sync="none") as e:
        e.enroll("anna", at=T0)
        got = other()
        assert got.returncode == 3, got.stderr
        assert f"process {os.getpid()} holds engine.lock" in got.stdout and os.path.realpath(path) in got.stdout
        assert e.member("anna").points == 20
    got = other()
    assert got.returncode == 0 and "OPENED" in got.stdout, got.stderr


def test_an_engine_killed_by_sigkill_leaves_its_directory_free(tmp_path):
    """The kernel drops the lock of a process that dies: an import killed with SIGKILL resumes in the next
    process without anyone removing engine.lock."""
    import signal
    import subprocess
    import sys

    from loyalty_engine.errors import StorageError

    path = tmp_path / "c"
    script = ("import sys, time\nfrom loyalty_engine.engine import Engine\nfrom loyalty_engine.program import Program\n"
              "e = Engine.open(sys.argv[1], program=Program.from_dict({'name': 'x'}), sync='none')\n"
              "e.enroll('anna', at=0)\nprint('HELD', flush=True)\ntime.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(os.path.dirname(__file__)), "src")}
    child = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"HELD\n"
        with pytest.raises(StorageError, match=f"process {child.pid} holds engine.lock"):
            Engine.open(path, program=Program.from_dict({"name": "x"}), sync="none")
    finally:
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
        child.stdout.close()
    with Engine.open(path, program=Program.from_dict({"name": "x"}), sync="none") as e:
        assert e.members == 1 and e.member("anna").points == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_a_forked_child_does_not_keep_the_engine_locked(tmp_path):
    """A host that forks a worker while its engine is open (multiprocessing's fork start method) can
    close and reopen the engine while the worker lives: the child lets go of its copy of the lock."""
    import time

    path = tmp_path / "c"
    prog = Program.from_dict({"name": "x"})
    eng = Engine.open(path, program=prog, sync="none")
    started, ready = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # the worker: it does not use the engine
        os.write(ready, b"1")                       # (the fork handlers ran before this line)
        time.sleep(2)
        os._exit(0)
    try:
        assert os.read(started, 1) == b"1"          # the child runs: it has let go of its copy
        eng.close()
        with Engine.open(path, program=prog, sync="none") as again:
            assert again.members == 0
    finally:
        os.waitpid(pid, 0)
        os.close(started)
        os.close(ready)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["multiply", "add", "best"]), st.sampled_from(["floor", "half_even", "ceil"]),
       st.lists(st.sampled_from([1.1, 1.25, 1.5, 2, 3]), min_size=3, max_size=3),
       st.integers(7, 3_000_000), st.integers(1, 999), st.sampled_from(["toys", "food"]),
       st.integers(0, 20), st.booleans())
def test_a_one_item_basket_earns_what_the_same_basket_in_two_lines_earns(
        tmp_path_factory, stacking, rounding, mults, amount, split, category, per_extra, tiered):
    """The kernel's shortcut for a basket of one line (its amount cancels out of its share of the paid
    amount) gives what the general sum over lines gives: the same basket as two lines of one SKU."""
    prog = Program.from_dict({
        "name": "lines", "timezone": "UTC", "rounding": rounding,
        "earn": {"points": 3, "per": 1000 + per_extra, "stacking": stacking},
        "tiers": {"metric": "spend", "window_days": 365, "review": "never", "levels": [
            {"name": "bronze", "threshold": 0}, {"name": "silver", "threshold": 1, "multiplier": 1.75,
                                                 "discount_percent": 3}]} if tiered else {"metric": "spend", "levels": [
            {"name": "bronze", "threshold": 0}]},
        "earn_rules": [{"name": "toys", "category": "toys", "multiplier": mults[0]},
                       {"name": "kite", "sku": "kite", "multiplier": mults[1]},
                       {"name": "evening", "when": "hour >= 0", "multiplier": mults[2]},
                       {"name": "toy bonus", "category": "toys", "bonus": 7}]})
    sku = "kite" if category == "toys" else "bread"
    first = (amount * split) // 1000 or 1
    with Engine.open(tmp_path_factory.mktemp("lines") / "club", program=prog, sync="none") as e:
        e.enroll("anna", at=T0 - timedelta(days=1))
        e.purchase("anna", amount=10_000, at=T0 - timedelta(hours=1), ref="warm")     # (silver, when tiered)
        one = e.quote("anna", amount=amount, at=T0, items=[Item(sku=sku, category=category, amount=amount)])
        two = e.quote("anna", amount=amount, at=T0, items=[Item(sku=sku, category=category, amount=first),
                                                          Item(sku=sku, category=category, amount=amount - first)])
        basket = e.quote("anna", amount=amount, at=T0)
    assert (one.points_earned, one.base_points, one.rules) == (two.points_earned, two.base_points, two.rules)
    if category == "food":      # (no item in a rule's scope: the basket alone gives the same)
        assert (one.points_earned, one.rules) == (basket.points_earned, basket.rules)


@pytest.mark.parametrize("ref, kind, ids", [
    ("pos1-000123", 0, (8209198428231481856, 3814733132631040128)),
    ("pos1-000123", 3, (8209198428231481859, 3814733132631040128)),
    ("x", 1, (2069834369300695809, 4365530255128024970)),
    ("مشتری-۴۲", 2, (16671811041931630594, 1922143700563002995))])
def test_a_refs_transfer_ids_never_change(ref, kind, ids):
    """A retried call finds its transfers by these ids, across versions too, so they are pinned here (the
    values the derivation gave before its last rewrite)."""
    from loyalty_engine.engine import _ref_id
    assert _ref_id(ref, kind) == ids
