"""The loyalty-engine command line: every command, its --help, its exit status and its messages."""

from __future__ import annotations

import json
from pathlib import Path

import lmdb
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from loyalty_engine import Account, AccountFlags, Ledger, Transfer
from loyalty_engine.cli import main

AT = 1_767_225_600_000_000  # 2026-01-01T00:00Z in µs


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture()
def ledger_path(tmp_path: Path) -> Path:
    path = tmp_path / "club.ledger"
    with Ledger.open(path, sync="none") as ledger:
        ledger.create_accounts([Account(id=1, asset=0),
                                Account(id=42, asset=0, flags=AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)])
        ledger.post([Transfer(id=i, debit=1, credit=42, amount=10 * i, at=AT + i, expires_at=AT + 10**9 * i)
                     for i in range(1, 4)])
    return path


HELP_SAYS = {"": "Run 'loyalty-engine COMMAND --help'", "init": "Create an empty ledger",
             "verify": "Walk the hash chain", "balance": "Print the balance of ACCOUNT",
             "export": "Parquet file OUT", "demo": "bundled CDNOW data",
             "import": "Import sales history"}


@pytest.mark.parametrize("command", sorted(HELP_SAYS))
def test_every_command_has_help(runner: CliRunner, command: str) -> None:
    result = runner.invoke(main, [command, "--help"] if command else ["--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: loyalty-engine {command}".rstrip())
    assert HELP_SAYS[command] in " ".join(result.output.split())


def test_init_creates_an_empty_ledger_and_leaves_an_existing_one(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "new.ledger"
    result = runner.invoke(main, ["init", str(path)])
    assert result.exit_code == 0, result.output
    assert "created" in result.output
    with Ledger.open(path, create=False) as ledger:
        assert ledger.head[0] == 0
    again = runner.invoke(main, ["init", str(path)])
    assert again.exit_code == 0 and "exists" in again.output


def test_verify_ok_and_json(runner: CliRunner, ledger_path: Path) -> None:
    result = runner.invoke(main, ["verify", str(ledger_path)])
    assert result.exit_code == 0, result.output
    assert ": ok;" in result.output and "3 transfers" in result.output
    data = json.loads(runner.invoke(main, ["verify", "--json", str(ledger_path)]).output)
    assert data["ok"] is True and data["transfers"] == 3 and data["batches"] == 2 and data["problems"] == []


def test_verify_reports_a_flipped_byte_with_exit_status_1(runner: CliRunner, ledger_path: Path) -> None:
    env = lmdb.open(str(ledger_path), max_dbs=8)
    journal = env.open_db(b"journal")
    with env.begin(write=True, db=journal) as txn:
        key, value = list(txn.cursor())[-1]
        damaged = bytearray(value)
        damaged[len(damaged) // 2] ^= 0x01
        txn.put(key, bytes(damaged))
    env.close()
    result = runner.invoke(main, ["verify", str(ledger_path)])
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output
    assert "journal entry 2: hash mismatch" in result.output


def test_balance_prints_every_field_and_lots(runner: CliRunner, ledger_path: Path) -> None:
    result = runner.invoke(main, ["balance", str(ledger_path), "42", "--lots"])
    assert result.exit_code == 0, result.output
    assert "credits_posted" in result.output and "60" in result.output
    assert result.output.count("lot expiring") == 3


def test_balance_of_unknown_account_is_a_clear_error(runner: CliRunner, ledger_path: Path) -> None:
    result = runner.invoke(main, ["balance", str(ledger_path), "7"])
    assert result.exit_code == 2
    assert "account 7 does not exist" in result.output


def test_commands_on_a_missing_ledger_fail_naming_the_path(runner: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    for cmd in (["verify", str(missing)], ["balance", str(missing), "1"],
                ["export", str(missing), str(tmp_path / "o.parquet")]):
        result = runner.invoke(main, cmd)
        assert result.exit_code == 2, cmd
        assert str(missing) in result.output


def test_export_writes_the_journal_to_parquet(runner: CliRunner, ledger_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "journal.parquet"
    result = runner.invoke(main, ["export", str(ledger_path), str(out)])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.num_rows == 3
    assert table["amount"].to_pylist() == [10, 20, 30]
    assert set(table["credit"].to_pylist()) == {42}


def test_demo_runs_on_the_bundled_data(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "demo.ledger"
    result = runner.invoke(main, ["demo", "--path", str(path), "--sync", "none"])
    assert result.exit_code == 0, result.output
    assert "69,659 purchases by 23,570 customers" in result.output
    assert "verify: ok" in result.output
    with Ledger.open(path, create=False, readonly=True) as ledger:
        assert ledger.verify().ok
        issued = -ledger.balance(1).available
    assert f"earned {issued:,} = redeemed" in result.output
    # the main job: the CDNOW history imported under the example program, the manager's figures
    assert "club demo: program 'CDNOW club'" in result.output
    assert "69,659 rows read, 69,579 posted" in result.output
    assert "rejected 80: the amount is zero" in result.output
    from loyalty_engine.engine import Engine
    from loyalty_engine.program import Program
    prog = Program.from_toml(Path(__file__).parent.parent / "examples" / "cdnow_club" / "program.toml")
    with Engine.open(f"{path}.club", program=prog, sync="none") as club:
        assert club.members == 23_502          # customers with at least one paid purchase
        assert club.ledger.verify().ok
        issued = club.ledger.balance(1).debits_posted
        tiers = {t.name: int((club._members["tier"][:club.members] == k + 1).sum()) for k, t in enumerate(prog.tiers)}
    assert f"members 23,502; purchases 69,579; points issued {issued:,}" in result.output
    assert "members per tier: " + ", ".join(f"{k} {v:,}" for k, v in tiers.items()) in result.output
    assert "import speed:" in result.output and "rows/s" in result.output


def test_import_command_imports_quarantines_and_says_how_to_resume(runner: CliRunner, tmp_path: Path) -> None:
    src = tmp_path / "sales.csv"
    src.write_text("customer;when;total\nann;2026-01-02 10:00:00;120.50\nbob;2026-01-02 11:00:00;abc\n"
                   "ann;2026-01-03 10:00:00;80\n")
    prog = Path(__file__).parent.parent / "examples" / "cdnow_club" / "program.toml"
    args = ["import", str(tmp_path / "club"), str(src), "--program", str(prog), "--map", "member=customer",
            "--map", "at=when", "--map", "amount=total", "--tz", "UTC", "--quarantine", str(tmp_path / "q.csv"),
            "--sync", "none", "--quiet"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "3 rows read, 2 posted" in result.output and "rejected 1: the amount is not a number" in result.output
    assert "bob" in (tmp_path / "q.csv").read_text()
    again = runner.invoke(main, args)
    assert again.exit_code == 0 and "imported before: nothing posted" in again.output
    bad = runner.invoke(main, [*args[:3], "--program", str(prog), "--map", "member"])
    assert bad.exit_code == 2 and "FIELD=COLUMN" in bad.output
