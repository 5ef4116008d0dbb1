"""Product codes: a manufacturer's batch of 10-digit codes for shampoo packs, printed to CSV and an SVG
sheet with QR codes, typed in by customers (with typos, Persian digits and dashes), redeemed exactly
once, a stolen batch voided, the odds a guesser faces, and base-32 gift codes for when guessing must be
harder. Every outcome is asserted."""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from loyalty_engine.codes import CodeStatus, TooManyAttemptsError, check_digit, pretty
from loyalty_engine.engine import Engine
from loyalty_engine.errors import CodeError
from loyalty_engine.program import Program

NOW = datetime(2026, 12, 1, 10, tzinfo=UTC)
PERSIAN = str.maketrans("0123456789", "۰۱۲۳۴۵۶۷۸۹")


def main() -> None:
    key = os.urandom(32)          # the host keeps this (a key file, a secret store); never in the ledger
    with tempfile.TemporaryDirectory() as tmp:
        club_path = Path(tmp) / "club"
        program = Program.from_toml(Path(__file__).parents[1] / "customer_club" / "program.toml")
        with Engine.open(club_path, program=program, sync="none", code_key=key) as club:
            club.enroll("sara", at=NOW - timedelta(days=30))
            club.enroll("reza", at=NOW - timedelta(days=30))

            batch = club.codes.generate(10_000, points=50, expires=NOW + timedelta(days=365),
                                        label="shampoo 400 ml, lot 7")
            n = club.codes.export(batch.id, Path(tmp) / "lot7.csv", svg=Path(tmp) / "lot7.svg")
            codes = batch.codes()
            print(f"batch {batch.id}: {n:,} codes, first {pretty(codes[0])}, last {pretty(codes[-1])}")
            assert n == 10_000 and len(set(codes.tolist())) == 10_000

            # Sara types her code in Persian digits with dashes: 50 points
            typed = pretty(codes[17]).translate(PERSIAN)
            r = club.codes.redeem("sara", typed, at=NOW)
            print(f"sara typed {typed}: +{r.points} points")
            assert r.points == 50 and club.member("sara").points == 20 + 50

            # Reza mistypes one digit: a TYPO, not counted against him; then the real code
            code = codes[18]
            wrong = code[:4] + str((int(code[4]) + 1) % 10) + code[5:]
            print(f"reza typed {pretty(wrong)}: {club.codes.check(wrong).status.name}")
            assert club.codes.check(wrong).status == CodeStatus.TYPO
            club.codes.redeem("reza", code, at=NOW)
            # ... and tries Sara's code: already redeemed
            try:
                club.codes.redeem("reza", codes[17], at=NOW)
                raise AssertionError("a code redeemed twice")
            except CodeError as e:
                print(f"reza tried sara's code: {e}")

            # a stolen batch is voided: its codes check VOID and give nothing
            stolen = club.codes.generate(500, points=50, label="lot 8 (stolen from the truck)")
            club.codes.void(stolen.id)
            assert club.codes.check(stolen.codes()[0]).status == CodeStatus.VOID

            # a guesser: forgeries that pass the check digit (one in ten random strings do), and the limit
            forged = [body + check_digit(body) for body in (f"{123456700 + k:09d}" for k in range(6))]
            refused = 0
            for f in forged:
                try:
                    club.codes.redeem("reza", f, at=NOW + timedelta(minutes=1))
                except TooManyAttemptsError:
                    refused += 1
                except CodeError:
                    pass
            print(f"a guesser's 6 attempts: {refused} refused outright after 5 failures in the hour")
            assert refused >= 1
            odds = club.codes.odds()
            print(f"odds: {odds['live_codes']:,} live codes; a random 10-digit string is live with "
                  f"probability {odds['per_guess']:.2e}")
            s = club.codes.stats(batch.id)
            print(f"batch {batch.id}: issued {s.issued:,}, redeemed {s.redeemed}, points given {s.points_given}")
            assert (s.redeemed, s.points_given) == (2, 100)

            # gift codes where guessing must be harder: 13 symbols of Crockford base-32 (60 bits)
            gifts = club.codes.generate(200, points=1_000, shape="base32", label="birthday gift")
            club.codes.export(gifts.id, Path(tmp) / "gifts.csv", svg=Path(tmp) / "gifts.svg")
            gift = pretty(gifts.codes()[3], "base32")
            typed = gift.lower().replace("0", "o")            # as people type them: any case, O for 0
            r = club.codes.redeem("reza", typed, at=NOW + timedelta(days=2))
            print(f"reza typed the gift code {typed}: +{r.points} points")
            assert r.points == 1_000 and club.codes.check(gift).status == CodeStatus.REDEEMED
            g = club.codes.odds()["shapes"]["base32"]
            print(f"odds: one random base-32 string in {1 / g['per_guess']:.1e} is a live gift code")
            assert "<path class=\"qr\"" in (Path(tmp) / "gifts.svg").read_text()
            assert club.ledger.verify().ok


if __name__ == "__main__":
    main()
