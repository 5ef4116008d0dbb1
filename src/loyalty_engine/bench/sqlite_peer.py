"""The peer: a points ledger as most shops would write it, on SQLite (stdlib ``sqlite3``).

A ``balances`` table (one row per account) and a ``transfers`` table (one row per transfer, indexed
by account and time), WAL journal with ``synchronous=FULL`` (durable at every commit), one transaction
per batch, and per transfer: an idempotency check, the balance check for member accounts, two balance
updates and an insert. Results use the ledger's codes for the cases the peer handles.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

import numpy as np

from loyalty_engine import TransferResult

OK = int(TransferResult.OK)
EXISTS = int(TransferResult.EXISTS)
NOT_FOUND = int(TransferResult.ACCOUNT_NOT_FOUND)
EXCEEDS = int(TransferResult.EXCEEDS_CREDITS)

SCHEMA = """
CREATE TABLE IF NOT EXISTS balances (
    account INTEGER PRIMARY KEY,
    flags INTEGER NOT NULL,
    debits_posted INTEGER NOT NULL DEFAULT 0,
    credits_posted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS transfers (
    id INTEGER PRIMARY KEY,
    debit INTEGER NOT NULL,
    credit INTEGER NOT NULL,
    amount INTEGER NOT NULL,
    code INTEGER NOT NULL,
    at INTEGER NOT NULL,
    expires_at INTEGER,
    user_data INTEGER NOT NULL DEFAULT 0
);
"""
INDEXES = """
CREATE INDEX IF NOT EXISTS transfers_debit ON transfers (debit, at);
CREATE INDEX IF NOT EXISTS transfers_credit ON transfers (credit, at);
"""


class SqlitePeer:
    def __init__(self, path: str, synchronous: str = "FULL") -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.executescript(SCHEMA + INDEXES)

    def close(self) -> None:
        self.db.close()

    def create_accounts(self, ids: Iterable[int], flags: int) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR IGNORE INTO balances (account, flags) VALUES (?, ?)",
                            ((int(i), flags) for i in ids))
        self.db.execute("COMMIT")

    def post_batch(self, recs: np.ndarray) -> np.ndarray:
        """Post a batch (the ledger's record array) in one transaction; a result per row."""
        db = self.db
        results = np.empty(len(recs), np.uint8)
        rows = zip(recs["id_lo"].tolist(), recs["debit"].tolist(), recs["credit"].tolist(),
                   recs["amount"].tolist(), recs["code"].tolist(), recs["at"].tolist(),
                   recs["expires_at"].tolist(), recs["user_data"].tolist(), strict=True)
        get_balance = "SELECT flags, debits_posted, credits_posted FROM balances WHERE account = ?"
        db.execute("BEGIN")
        try:
            for i, (tid, debit, credit, amount, code, at, exp, user) in enumerate(rows):
                if db.execute("SELECT 1 FROM transfers WHERE id = ?", (tid,)).fetchone():
                    results[i] = EXISTS
                    continue
                d = db.execute(get_balance, (debit,)).fetchone()
                c = db.execute(get_balance, (credit,)).fetchone()
                if d is None or c is None:
                    results[i] = NOT_FOUND
                    continue
                if d[0] & 1 and d[1] + amount > d[2]:
                    results[i] = EXCEEDS
                    continue
                db.execute("UPDATE balances SET debits_posted = debits_posted + ? WHERE account = ?",
                           (amount, debit))
                db.execute("UPDATE balances SET credits_posted = credits_posted + ? WHERE account = ?",
                           (amount, credit))
                db.execute("INSERT INTO transfers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (tid, debit, credit, amount, code, at, exp or None, user))
                results[i] = OK
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return results

    def purchase(self, tid: int, member: int, amount: int, at: int, *, issuer: int = 1, points_per: int = 1000) -> int:
        """One checkout as a shop would write it: points at the base rate (one point per ``points_per``
        of the amount; no rules, tiers or offers, so the peer does less work than the engine) and one
        transaction with an idempotency check, two balance updates and an insert. Returns the result."""
        db = self.db
        points = amount // points_per
        db.execute("BEGIN")
        try:
            if db.execute("SELECT 1 FROM transfers WHERE id = ?", (tid,)).fetchone():
                db.execute("ROLLBACK")
                return EXISTS
            if db.execute("SELECT 1 FROM balances WHERE account = ?", (member,)).fetchone() is None:
                db.execute("ROLLBACK")
                return NOT_FOUND
            if points > 0:
                db.execute("UPDATE balances SET debits_posted = debits_posted + ? WHERE account = ?",
                           (points, issuer))
                db.execute("UPDATE balances SET credits_posted = credits_posted + ? WHERE account = ?",
                           (points, member))
                db.execute("INSERT INTO transfers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (tid, issuer, member, points, 1, at, None, amount))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return OK

    def verify(self) -> bool:
        """What a shop would run as its audit: SQLite's own integrity check, then every balance rebuilt
        from the transfers table and compared with the balances table. True when all agree."""
        db = self.db
        if db.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            return False
        rebuilt = db.execute(
            "SELECT account, SUM(d), SUM(c) FROM ("
            " SELECT debit AS account, amount AS d, 0 AS c FROM transfers"
            " UNION ALL SELECT credit, 0, amount FROM transfers) GROUP BY account").fetchall()
        stored = {a: (d, c) for a, d, c in
                  db.execute("SELECT account, debits_posted, credits_posted FROM balances")}
        return all(stored.get(a, (0, 0)) == (d, c) for a, d, c in rebuilt)

    def bulk_load(self, recs: np.ndarray) -> None:
        """Fill the transfers table without checks (to build a large table for queries)."""
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO transfers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            zip(recs["id_lo"].tolist(), recs["debit"].tolist(), recs["credit"].tolist(),
                                recs["amount"].tolist(), recs["code"].tolist(), recs["at"].tolist(),
                                recs["expires_at"].tolist(), recs["user_data"].tolist(), strict=True))
        self.db.execute("COMMIT")

    def balance(self, account: int) -> tuple[int, int] | None:
        row = self.db.execute("SELECT debits_posted, credits_posted FROM balances WHERE account = ?",
                              (account,)).fetchone()
        return None if row is None else (row[0], row[1])

    def transfers_of(self, account: int) -> list[tuple[int, ...]]:
        return self.db.execute(
            "SELECT id, debit, credit, amount, code, at, expires_at, user_data FROM transfers "
            "WHERE debit = ? UNION ALL SELECT id, debit, credit, amount, code, at, expires_at, user_data "
            "FROM transfers WHERE credit = ? ORDER BY at", (account, account)).fetchall()
