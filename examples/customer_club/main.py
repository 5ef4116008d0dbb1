"""A week of checkouts at Golden Leaf: the program in program.toml, four members with their past
behaviour imported as a batch, then seven days of purchases printed as receipts with explanations.
Every figure the story depends on is asserted."""

from __future__ import annotations

import tempfile
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pyarrow as pa

from loyalty_engine.engine import Engine, Item
from loyalty_engine.program import Program

TEHRAN = ZoneInfo("Asia/Tehran")
WEEK = datetime(2026, 12, 7, 10, 0, tzinfo=TEHRAN)       # Monday; Mother's Day is Thu 10 - Fri 11


def history(member: str, amount: int, every_days: int, visits: int) -> list[dict]:
    """A member's past: ``visits`` purchases of ``amount`` every ``every_days`` days before the week."""
    start = WEEK - timedelta(days=every_days * visits)
    return [{"member": member, "at": start + timedelta(days=every_days * k), "amount": amount,
             "ref": f"hist-{member}-{k}"} for k in range(visits)]


def main() -> None:
    program = Program.from_toml(Path(__file__).with_name("program.toml"))
    with tempfile.TemporaryDirectory() as tmp, Engine.open(Path(tmp) / "club", program=program, sync="none") as club:
        club.enroll("sara", at=WEEK - timedelta(days=400), birth_date=date(1991, 12, 9))
        club.enroll("reza", at=WEEK - timedelta(days=400))
        club.enroll("mina", at=WEEK - timedelta(days=300))
        club.enroll("omid", at=WEEK - timedelta(days=2), referred_by="mina")

        # the past: Sara ~50,000 every 10 days; Reza ~300,000 every 45 days; Mina buys big
        past = history("sara", 50_000, 10, 8) + history("reza", 300_000, 45, 6) + history("mina", 3_000_000, 30, 1)
        past = [dict(r, at=r["at"] + timedelta(days=28)) if r["member"] == "reza" else r for r in past]
        table = pa.table({"member": [r["member"] for r in past], "ref": [r["ref"] for r in past],
                          "at": pa.array([r["at"] for r in past], pa.timestamp("us", tz="Asia/Tehran")),
                          "amount": [r["amount"] for r in past]})
        result = club.purchase_batch(table, events=False)
        assert set(result.column("status").to_pylist()) == {0}
        print(f"imported {len(past)} past purchases; Mina is {club.member('mina').tier}\n")

        def checkout(member: str, day: int, hour: int, amount: int, ref: str, **kw: object) -> object:
            at = WEEK.replace(hour=hour) + timedelta(days=day)
            r = club.purchase(member, amount=amount, at=at, ref=ref, **kw)  # type: ignore[arg-type]
            print(r.explain(), "\n")
            return r

        # Monday: Sara's usual basket, then on Tuesday a big one: the "bigger basket" offer
        r = checkout("sara", 0, 11, 48_000, "pos1-1001")
        assert r.offers == () and r.event_points == 200            # birthday on Wednesday: within 7 days
        r = checkout("sara", 1, 18, 210_000, "pos1-1002",
                     items=[Item(sku="SH-400", category="cosmetics", amount=120_000),
                            Item(sku="RICE-5", category="grocery", amount=90_000)])
        assert r.offers == ("bigger basket",) and r.credit_earned == 42_000
        assert "cosmetics earn 1.5x" in r.rules
        # Wednesday: Reza returns 19 days after his last visit (he usually comes every 45)
        r = checkout("reza", 2, 12, 250_000, "pos2-2001")
        assert r.offers == ("come back sooner",) and r.credit_earned == 50_000
        # Thursday, Mother's Day: double points, and the evening bonus after 20:00
        r = checkout("mina", 3, 21, 1_500_000, "pos1-1003", redeem_points=1_000)
        assert "Mother's Day: double points" in r.rules and "evening bonus" in r.rules
        assert r.redeem_value == 100_000
        # Omid's first purchase: welcome offer, the referral bonus for him and for Mina
        r = checkout("omid", 4, 13, 120_000, "web-77", channel="web")
        assert r.offers == ("welcome basket",) and r.event_points == 50 and r.referrer_points == 100
        # Saturday: Mina passes 5,000,000 in the year: silver, and her next basket earns silver's 1.25x
        r = checkout("mina", 5, 11, 600_000, "pos2-2002")
        assert (r.tier_before, r.tier_after) == ("bronze", "silver")
        r = checkout("mina", 5, 17, 100_000, "pos2-2003")
        assert r.tier_before == "silver" and r.points_earned == 125
        # Sunday: half of Saturday's basket comes back: the refund takes its points and undoes the upgrade
        back = club.refund("pos2-2002", amount=300_000, at=WEEK + timedelta(days=6), ref="pos2-2002-r")
        print(back)
        assert back.points_taken == 300 and back.tier_after == "bronze"
        # a retried checkout (the till timed out) changes nothing
        again = club.purchase("sara", amount=210_000, at=WEEK + timedelta(days=1, hours=8), ref="pos1-1002")
        assert again.credit_earned == 42_000

        print("\nmembers at the end of the week:")
        for name in ("sara", "reza", "mina", "omid"):
            m = club.member(name)
            print(f"  {name:5} {m.tier:8} points {m.points:6,}  credit {m.credit:7,}  "
                  f"visits 90d {m.figures['visits_90d']}")
        events = club.events()
        kinds = sorted({e.kind for e in events})
        print(f"\noutbox: {len(events)} events to deliver ({', '.join(kinds)})")
        assert {"welcome", "points_changed", "tier_changed", "offer_granted"} <= set(kinds)
        club.ack(events[-1].seq)
        assert club.events() == []
        assert club.ledger.verify().ok


if __name__ == "__main__":
    main()
