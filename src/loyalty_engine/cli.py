"""The ``loyalty-engine`` command line, for operators: create, check, inspect and export ledgers.

Exit status: 0 on success, 1 when ``verify`` finds problems, 2 on a usage error or a library error
(the message names the path or value at fault).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__
from .errors import LoyaltyError, NotFoundError
from .ledger import SYNC_MODES, Ledger

F = TypeVar("F", bound=Callable[..., Any])


def _library_errors(fn: F) -> F:
    """Turn a LoyaltyError into a one-line message and exit status 2 (no traceback for operators)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LoyaltyError as e:
            raise Failure(f"{type(e).__name__}: {e}") from e

    return wrapper  # type: ignore[return-value]


class Failure(click.ClickException):
    """A failed command: its message, exit status 2."""

    exit_code = 2

_existing_ledger = click.Path(exists=True, file_okay=False, dir_okay=True, path_type=Path)


@click.group(name="loyalty-engine", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loyalty-engine")
def main() -> None:
    """loyalty_engine: a customer-club engine on a compiled, hash-chained points ledger.

    A ledger is a directory (LMDB files). Run 'loyalty-engine COMMAND --help' for each command.
    """


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--sync", type=click.Choice(SYNC_MODES), default="full", show_default=True,
              help="Durability of the ledger's commits.")
@_library_errors
def init(path: Path, sync: str) -> None:
    """Create an empty ledger in directory PATH (an existing ledger is left as it is)."""
    existed = (path / "data.mdb").exists()
    with Ledger.open(path, sync=sync) as ledger:
        seq, head = ledger.head
    state = "exists" if existed else "created"
    click.echo(f"{path}: ledger {state}; head at entry {seq} ({head[:16]}...)")


@main.command()
@click.argument("path", type=_existing_ledger)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_library_errors
def verify(path: Path, as_json: bool) -> None:
    """Walk the hash chain of the ledger at PATH, replay it from empty and compare every balance,
    lot, snapshot and index entry. Exit status 1 if anything is wrong."""
    with Ledger.open(path, create=False, readonly=True) as ledger:
        report = ledger.verify()
        seq, head = ledger.head
    if as_json:
        click.echo(json.dumps({"ok": report.ok, "batches": report.batches, "transfers": report.transfers,
                               "head": seq, "hash": head, "problems": list(report.problems)}))
    else:
        status = "ok" if report.ok else f"FAILED ({len(report.problems)} problems)"
        click.echo(f"{path}: {status}; {report.batches:,} journal entries, {report.transfers:,} transfers; "
                   f"head {seq} {head[:16]}...")
        for p in report.problems:
            click.echo(f"  - {p}")
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("path", type=_existing_ledger)
@click.argument("account", type=click.IntRange(0, 2**64 - 1))
@click.option("--lots", "show_lots", is_flag=True, help="Also list the account's lots (expiry, remaining).")
@_library_errors
def balance(path: Path, account: int, show_lots: bool) -> None:
    """Print the balance of ACCOUNT (a 64-bit id) in the ledger at PATH."""
    from .types import from_micros

    with Ledger.open(path, create=False, readonly=True) as ledger:
        try:
            acc = ledger.account(account)
            b = ledger.balance(account)
        except NotFoundError:
            raise Failure(f"account {account} does not exist in {path}") from None
        lots = ledger.lots(account) if show_lots else []
    click.echo(f"account {account} (asset {acc.asset}, flags {acc.flags!r})")
    for name in ("debits_posted", "credits_posted", "debits_pending", "credits_pending", "available"):
        click.echo(f"  {name:<16} {getattr(b, name):>20,}")
    for expires, remaining in lots:
        click.echo(f"  lot expiring {from_micros(expires).isoformat()}: {remaining:,}")


@main.command()
@click.argument("path", type=_existing_ledger)
@click.argument("out", type=click.Path(dir_okay=False, writable=True, path_type=Path))
@_library_errors
def export(path: Path, out: Path) -> None:
    """Write every transfer in the journal of the ledger at PATH to the Parquet file OUT."""
    with Ledger.open(path, create=False, readonly=True) as ledger:
        rows = ledger.export(out)
    click.echo(f"{out}: {rows:,} transfers")


@main.command()
@click.option("--path", type=click.Path(path_type=Path), default=None,
              help="Keep the demo ledgers in this directory (default: temporary ones, removed after).")
@click.option("--sync", type=click.Choice(SYNC_MODES), default="full", show_default=True)
@_library_errors
def demo(path: Path | None, sync: str) -> None:
    """Import the bundled CDNOW data (23,570 customers, 1997-98) under the example program
    (examples/cdnow_club/program.toml) and print the club's figures; then run eighteen months of the
    ledger's mechanics (holds, redemptions, expiry) on the same history and verify it."""
    from .club_demo import run_club_demo
    from .demo import run_demo

    run_club_demo(None if path is None else Path(f"{path}.club"), echo=click.echo, sync=sync)
    run_demo(path, echo=click.echo, sync=sync)


def _mapping(pairs: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        field, sep, column = pair.partition("=")
        if not sep or not field or not column:
            raise Failure(f"--map takes FIELD=COLUMN (e.g. member=customer_id), not {pair!r}")
        out[field.strip()] = column.strip()
    return out


@main.command(name="import")
@click.argument("ledger", type=click.Path(file_okay=False, path_type=Path))
@click.argument("source", nargs=-1, required=True)
@click.option("--program", "program_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="The club's program (TOML).")
@click.option("--map", "maps", multiple=True, metavar="FIELD=COLUMN",
              help="Which source column holds a field (member, at, amount, ref, kind, original, branch, "
                   "channel, category, sku, quantity); repeat it.")
@click.option("--quarantine", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write rejected rows (file, row, values, reason) here: .parquet, .csv or .arrow.")
@click.option("--scale", type=click.IntRange(0, 6), default=None,
              help="Decimal places of the source's amounts (2: 11.77 is 1177 in the minor unit).")
@click.option("--tz", default=None, help="Timezone of times and dates that carry none (e.g. Asia/Tehran).")
@click.option("--time-format", default=None, help="strptime format of text times (default ISO 8601).")
@click.option("--delimiter", default=None, help="CSV delimiter (default: sniffed; 'whitespace' for runs of spaces).")
@click.option("--chunk-rows", type=click.IntRange(1_000, 4_000_000), default=1_000_000, show_default=True,
              help="Rows per committed chunk (memory is bounded by it).")
@click.option("--resume", is_flag=True, help="Continue an import that stopped, from its checkpoint.")
@click.option("--no-enroll", is_flag=True, help="Reject rows of unknown members instead of enrolling them.")
@click.option("--sync", type=click.Choice(SYNC_MODES), default="full", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_library_errors
def import_(ledger: Path, source: tuple[str, ...], program_path: Path, maps: tuple[str, ...],
            quarantine: Path | None, scale: int | None, tz: str | None, time_format: str | None,
            delimiter: str | None, chunk_rows: int, resume: bool, no_enroll: bool, sync: str, quiet: bool) -> None:
    """Import sales history from SOURCE (Parquet, CSV, Arrow IPC files, directories or globs) into the
    club at LEDGER. Bad rows are quarantined and counted; good rows import. Each chunk commits with a
    checkpoint: running it again posts nothing twice, and --resume continues a stopped import."""
    from .engine import Engine
    from .program import Program

    prog = Program.from_toml(program_path)
    with Engine.open(ledger, program=prog, sync=sync) as engine:
        try:
            rep = engine.import_sales(list(source) if len(source) > 1 else source[0], columns=_mapping(maps),
                                      quarantine=quarantine, progress=False if quiet else None, resume=resume,
                                      enroll=not no_enroll, scale=scale, tz=tz, time_format=time_format,
                                      delimiter=delimiter, chunk_rows=chunk_rows)
        except LoyaltyError as e:
            if "resume" in str(e):
                raise Failure(f"{e}\n(found a checkpoint in {ledger}: add --resume to continue)") from e
            raise
    if rep.resumed_from_row:
        click.echo(f"resuming from the checkpoint after row {rep.resumed_from_row:,}")
    click.echo(rep.summary())


if __name__ == "__main__":  # pragma: no cover
    main()
