"""The ``loyalty-engine`` command line, for operators: create, check, inspect and export ledgers.

Exit status: 0 on success, 1 when ``verify`` finds problems, 2 on a usage error or a library error
(the message names the path or value at fault).
"""

from __future__ import annotations

import json
import sys
import tempfile
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
    from ._memory import keep_freed_memory
    from .engine import Engine
    from .program import Program

    prog = Program.from_toml(program_path)
    keep_freed_memory()         # this process is the import's: its chunks reuse freed memory
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



@main.command()
@click.option("--dir", "directory", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Run on a temporary club in this folder: put it on the disk you are sizing (default: the "
                   "system's temporary folder; fsync figures mean nothing on tmpfs).")
@click.option("--quick", is_flag=True, help="Small workloads, under a minute (the default takes a few minutes).")
@click.option("--size", type=click.Choice(["tiny", "quick", "standard"]), default=None, hidden=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures, with the machine's description, to this JSON file.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw throughput against batch size and latency percentiles into this SVG file.")
@_library_errors
def bench(directory: Path | None, quick: bool, size: str | None, json_path: Path | None, plot: Path | None) -> None:
    """Measure what this machine carries: online purchases per durability mode, latency percentiles,
    batched postings, bulk import, product codes, balance reads and verify(), each beside a SQLite peer
    (or pure-Python rules, or per-code FF1) in the same run, with a warm-up and repeats (median and
    spread). Feed the JSON to 'loyalty-engine capacity --from'."""
    from .bench.plot import write_svg
    from .bench.runner import format_table, run

    size = size or ("quick" if quick else "standard")
    click.echo(f"loyalty-engine bench ({size}) in {directory or 'the temporary folder'}; each row prints "
               f"when measured ...")
    result = run(directory, size=size, say=click.echo)       # the rows as they are measured
    click.echo(format_table(result, figures=False))
    m = result["machine"]
    click.echo(f"\n{m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.1f} GiB; disk "
               f"{m['disk']['device']} ({m['disk']['filesystem']}) at {m['disk']['dir']}; fsync floor "
               f"{result['disk']['fsync_floor_us']:,.0f} us, sequential writes {result['disk']['write_mb_per_s']:,.0f} "
               f"MB/s; {result['seconds']:.0f} s")
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
        click.echo(f"wrote {json_path}")
    if plot:
        write_svg(result, plot)
        click.echo(f"wrote {plot}")


@main.command()
@click.argument("profile_path", metavar="[PROFILE.toml]", required=False,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--members", type=click.IntRange(1), default=None, help="Members enrolled.")
@click.option("--purchases-per-day", type=click.IntRange(1), default=None, help="Purchases on an ordinary day.")
@click.option("--peak-hour-share", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="The busiest hour's share of a day's purchases (default 0.12).")
@click.option("--history-years", type=click.FloatRange(0), default=None, help="Years of history to import.")
@click.option("--code-batches-per-month", type=click.IntRange(0), default=None)
@click.option("--codes-per-batch", type=click.IntRange(0), default=None)
@click.option("--retention-years", type=click.FloatRange(0), default=None, help="Years of journal kept (default 5).")
@click.option("--from", "from_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A 'loyalty-engine bench --json' result (default: run a quick bench now).")
@click.option("--dir", "directory", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Where the fresh bench and --check run (the disk you are sizing).")
@click.option("--check", "run_check", is_flag=True,
              help="Then run the profile's busiest hour compressed in time on this machine and compare the "
                   "measured figures with the predicted ones.")
@click.option("--seconds", type=click.FloatRange(2, 3600), default=20, show_default=True,
              help="How long --check runs.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the plan (and the check) to this JSON file.")
@_library_errors
def capacity(profile_path: Path | None, members: int | None, purchases_per_day: int | None,
             peak_hour_share: float | None, history_years: float | None, code_batches_per_month: int | None,
             codes_per_batch: int | None, retention_years: float | None, from_path: Path | None,
             directory: Path | None, run_check: bool, seconds: float, json_path: Path | None) -> None:
    """Plan capacity: from a club's profile (a TOML file and/or the options) and a bench result, say in
    plain words the headroom at the peak (with and without an fsync per purchase, with group commit),
    the hours to import the history, disk after one and five years, memory for the member state, where
    the limit is, and whether the club outgrows one machine."""
    from .bench.capacity import Profile, check, plan
    from .bench.runner import run

    if profile_path is None and (members is None or purchases_per_day is None):
        raise Failure("say how big the club is: a PROFILE.toml with members and purchases_per_day, or "
                      "--members N --purchases-per-day N")
    profile = Profile.from_toml(profile_path, members=members, purchases_per_day=purchases_per_day,
                                peak_hour_share=peak_hour_share, history_years=history_years,
                                code_batches_per_month=code_batches_per_month, codes_per_batch=codes_per_batch,
                                retention_years=retention_years)
    if from_path is not None:
        try:
            result = json.loads(from_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise Failure(f"{from_path}: not a JSON bench result ({e})") from e
    else:
        click.echo("no --from bench.json: running a quick bench first ...")
        result = run(directory, size="quick", say=lambda line: None)
    p = plan(profile, result)
    click.echo(p.text())
    out: dict[str, Any] = {"plan": p.to_dict()}
    if run_check:
        click.echo("\nChecking the prediction on this machine:")
        out["check"] = check(profile, result, directory or Path(tempfile.gettempdir()), seconds=seconds,
                             say=click.echo)
    if json_path:
        json_path.write_text(json.dumps(out, indent=2, default=str))
        click.echo(f"wrote {json_path}")


if __name__ == "__main__":  # pragma: no cover
    main()
