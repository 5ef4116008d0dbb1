"""Product codes: FF1 against the NIST SP 800-38G samples, the Damm digit, generation, checking,
redemption exactly once (with real concurrent processes), guessing limits and bad input."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import segno

from loyalty_engine import _core
from loyalty_engine.codes import (
    CROCKFORD,
    CodeStatus,
    TooManyAttemptsError,
    load_key,
    parse_code,
    parse_shaped,
    pretty,
)
from loyalty_engine.engine import Engine, points_account
from loyalty_engine.errors import CodeError, StorageError, ValidationError
from loyalty_engine.ff1 import FF1
from loyalty_engine.program import Program

ALPHA = "0123456789abcdefghijklmnopqrstuvwxyz"
K128 = "2B7E151628AED2A6ABF7158809CF4F3C"
K192 = K128 + "EF4359D8D580AA4F"
K256 = K192 + "7F036D6F04FC6A94"
T2 = "39383736353433323130"
T3 = "3737373770717273373737"
NOW = datetime(2026, 12, 1, tzinfo=UTC)
KEY = bytes(range(32))


@pytest.mark.parametrize(("key", "radix", "tweak", "pt", "ct"), [
    (K128, 10, "", "0123456789", "2433477484"),
    (K128, 10, T2, "0123456789", "6124200773"),
    (K128, 36, T3, "0123456789abcdefghi", "a9tv40mll9kdu509eum"),
    (K192, 10, "", "0123456789", "2830668132"),
    (K192, 10, T2, "0123456789", "2496655549"),
    (K192, 36, T3, "0123456789abcdefghi", "xbj3kv35jrawxv32ysr"),
    (K256, 10, "", "0123456789", "6657667009"),
    (K256, 10, T2, "0123456789", "1001623463"),
    (K256, 36, T3, "0123456789abcdefghi", "xs8a0azh2avyalyzuwd"),
], ids=[f"sample{i}" for i in range(1, 10)])
def test_nist_sp800_38g_ff1_samples(key, radix, tweak, pt, ct):
    f = FF1(bytes.fromhex(key), radix, len(pt), bytes.fromhex(tweak))
    digits = [ALPHA.index(c) for c in pt]
    assert "".join(ALPHA[d] for d in f.encrypt_digits(digits)) == ct
    assert f.decrypt_digits([ALPHA.index(c) for c in ct]) == digits


def test_a_million_codes_round_trip_and_never_collide():
    f = FF1(KEY, 10, 9, b"LEtest\x00\x01")
    x = np.arange(1_000_000, dtype=np.uint64) * np.uint64(997) % np.uint64(10**9)
    y = f.encrypt_ints(x)
    assert y.max() < 10**9
    assert len(np.unique(y)) == len(y)
    assert (f.decrypt_ints(y) == x).all()
    assert [f.decrypt_int(int(v)) for v in y[:2000]] == x[:2000].tolist()


@pytest.mark.parametrize(("radix", "n"), [(10, 9), (10, 10), (10, 12), (10, 19), (2, 40), (32, 12), (36, 12)])
def test_whole_value_kernel_agrees_with_the_nist_checked_digit_path(radix, n):
    """encrypt_ints/decrypt_ints (split, rounds and join in one kernel, the fast paths for d == 8 and
    literal moduli) give what encrypt_digits gives (the path the NIST samples check), for every
    shape of code: 10**4/10**5 halves, other decimal halves, powers of two, and d == 12."""
    f = FF1(bytes.fromhex(K256), radix, n, b"shape")
    top = radix**n
    x = np.random.default_rng(n * radix).integers(0, top, 3000, dtype=np.uint64)
    x[:3] = [0, 1, top - 1]
    y = f.encrypt_ints(x)
    def digits(v: int) -> list[int]:
        return [(v // radix**k) % radix for k in range(n - 1, -1, -1)]
    def num(ds: list[int]) -> int:
        return sum(d * radix**k for k, d in enumerate(reversed(ds)))
    assert [num(f.encrypt_digits(digits(int(v)))) for v in x[:300]] == y[:300].tolist()
    assert (f.decrypt_ints(y) == x).all()
    # the kernel works a chunk at a time: a length that is not a multiple of the chunk, and one value
    assert (f.encrypt_ints(x[:4097 % len(x)]) == y[:4097 % len(x)]).all()
    assert f.encrypt_ints(x[5:6]).tolist() == y[5:6].tolist()
    assert [f.encrypt_int(int(v)) for v in x[:100]] == y[:100].tolist()          # the one-value kernel
    assert [f.decrypt_int(int(v)) for v in y[:100]] == x[:100].tolist()
    if radix**n < 1 << 64:                             # outside the domain: refused, not wrapped
        with pytest.raises(ValidationError, match="outside FF1's domain"):
            f.encrypt_int(radix**n)
        with pytest.raises(ValidationError, match="outside FF1's domain"):
            f.encrypt_ints(np.array([0, radix**n], np.uint64))


def test_big_outputs_come_from_a_mapping_and_behave_as_arrays():
    from loyalty_engine import _memory

    small = _memory.empty(10, np.uint64)
    big = _memory.empty((_memory.THRESHOLD // 40 + 1, 10), np.uint32)
    def owner(a: np.ndarray) -> object:
        b: object = a
        while isinstance(b, np.ndarray):
            b = b.base
        return b.obj if isinstance(b, memoryview) else b

    assert owner(small) is None                       # small ones: NumPy's own memory
    assert big.shape == (_memory.THRESHOLD // 40 + 1, 10) and big.dtype == np.uint32 and big.flags.c_contiguous
    assert type(owner(big)).__name__ == "mmap" and big.flags.writeable
    big[:] = 7
    view = big.view("U10")                            # what format_codes hands out
    assert view.shape == (len(big), 1) and int(big.sum()) == 7 * big.size


def test_wide_numerals_round_trip_through_the_byte_path():
    f = FF1(bytes.fromhex(K128), 10, 38, b"")        # B has 19 digits: 8 bytes, the general block path
    with pytest.raises(ValidationError, match="do not fit 64 bits"):
        f.encrypt_ints(np.zeros(3, np.uint64))        # 10**38 values are numerals, not integers
    rng = np.random.default_rng(4)
    for _ in range(20):
        ds = rng.integers(0, 10, 38).tolist()
        ct = f.encrypt_digits(ds)
        assert ct != ds and f.decrypt_digits(ct) == ds


def test_damm_detects_every_single_digit_error_and_adjacent_transposition():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 10**9, 300, dtype=np.uint64)
    check = np.zeros(len(values), np.uint8)
    _core.damm_digits(values, 9, check)
    for v, c in zip(values.tolist(), check.tolist(), strict=True):
        code = f"{v:09d}{c}"
        assert parse_code(code)[1] == CodeStatus.GENUINE
        for pos in range(10):
            for d in "0123456789":
                if d != code[pos]:
                    assert parse_code(code[:pos] + d + code[pos + 1:])[1] == CodeStatus.TYPO
        for pos in range(9):
            if code[pos] != code[pos + 1]:
                swapped = code[:pos] + code[pos + 1] + code[pos] + code[pos + 2:]
                assert parse_code(swapped)[1] == CodeStatus.TYPO


def test_python_and_kernel_parsers_agree():
    cases = ["000-000-5724", "۰۰۰۰۰۰۵۷۲۴", "٠٠٠٠٠٠٥٧٢٤", " 000 000 5724 ", "0000005725", "000000572",
             "00000057244", "0000005724x", "", "abc", "-", "0000000000000000000000", "12"]
    arr = np.array(cases, dtype="U32")
    values, status = np.zeros(len(arr), np.uint64), np.zeros(len(arr), np.uint8)
    _core.codes_parse(arr.view(np.uint32).reshape(len(arr), -1), 10, values, status)
    assert [parse_code(c) for c in cases] == list(zip(values.tolist(), status.tolist(), strict=True))
    assert status.tolist()[:5] == [0, 0, 0, 0, 1]


@pytest.fixture
def club(tmp_path):
    with Engine.open(tmp_path / "club", program=Program.from_dict({"name": "shop"}), sync="none",
                     code_key=KEY) as e:
        e.enroll("anna", at=NOW)
        e.enroll("bahram", at=NOW)
        yield e


def test_generate_check_redeem_once(club):
    b = club.codes.generate(1000, points=100, expires=NOW + timedelta(days=365), label="shampoo 400ml lot 7")
    codes = b.codes()
    assert len(set(codes.tolist())) == 1000 and all(len(c) == 10 for c in codes.tolist())
    c = club.codes.check(codes[7], at=NOW)
    assert (c.status, c.batch, c.serial, c.points) == (CodeStatus.GENUINE, b.id, 7, 100)
    shown = f"{codes[7][:3]}-{codes[7][3:6]}-{codes[7][6:]}"
    r = club.codes.redeem("anna", shown, at=NOW)
    assert (r.points, r.serial, r.code) == (100, 7, codes[7])
    assert club.ledger.balance(points_account(0)).available == 100
    assert club.codes.check(codes[7], at=NOW).status == CodeStatus.REDEEMED
    with pytest.raises(CodeError, match="REDEEMED"):
        club.codes.redeem("bahram", codes[7], at=NOW)
    assert club.ledger.balance(points_account(1)).available == 0
    assert club.codes.check(codes[8], at=NOW + timedelta(days=366)).status == CodeStatus.EXPIRED
    s = club.codes.stats(b.id)
    assert (s.issued, s.redeemed, s.points_given) == (1000, 1, 100)
    club.codes.void(b.id)
    assert club.codes.check(codes[9], at=NOW).status == CodeStatus.VOID
    many = club.codes.check_many([codes[7], codes[9], "1234567890", "x"], at=NOW)
    assert [m.status for m in many] == [CodeStatus.REDEEMED, CodeStatus.VOID, CodeStatus.TYPO, CodeStatus.INVALID]
    assert club.ledger.verify().ok


def test_batches_never_collide_and_survive_reopening(tmp_path):
    prog = Program.from_dict({"name": "shop"})
    with Engine.open(tmp_path / "c", program=prog, sync="none", code_key=KEY) as e:
        batches = [e.codes.generate(n, points=5) for n in (1, 10, 5000, 20_000)]
        e.codes.rotate_key()
        batches.append(e.codes.generate(3000, points=7))
        every = np.concatenate([b.codes() for b in batches])
        assert len(np.unique(every)) == len(every) == 28_011
        statuses = e.codes.check_array(every, at=NOW)
        assert (statuses == CodeStatus.GENUINE).all()
    with Engine.open(tmp_path / "c", program=prog, sync="none", code_key=KEY) as e:
        assert [b.count for b in e.codes.batches()] == [1, 10, 5000, 20_000, 3000]
        assert (e.codes.check_array(every, at=NOW) == CodeStatus.GENUINE).all()
        assert e.codes.key_version == 2
    other = Program.from_dict({"name": "another shop"})   # same key, other program: none of ours is valid
    with Engine.open(tmp_path / "d", program=other, sync="none", code_key=KEY) as e:
        e.codes.generate(10, points=1)
        assert (e.codes.check_array(every[:2000], at=NOW) == CodeStatus.INVALID).sum() >= 1990


def test_batched_checks_agree_with_one_by_one_checks(club):
    """check_array / check_many (kernels, bitmaps of the batches seen) against check() (one code, its own
    path): batches under two key versions, redemptions in two bitmap chunks of one batch, a voided and an
    expired batch, typos, strangers."""
    big = club.codes.generate(70_000, points=5)                      # two bitmap chunks (65,536 serials each)
    short = club.codes.generate(500, points=3, expires=NOW + timedelta(days=1))
    club.codes.rotate_key()
    stolen = club.codes.generate(300, points=2)
    fresh = club.codes.generate(400, points=9)
    codes = {b.id: b.codes() for b in (big, short, stolen, fresh)}
    for i in (3, 65_535, 65_536, 69_999):
        club.codes.redeem("anna", codes[big.id][i], at=NOW)
    club.codes.redeem("bahram", codes[fresh.id][0], at=NOW)
    club.codes.void(stolen.id)
    rng = np.random.default_rng(12)
    sample = [codes[big.id][i] for i in (3, 65_535, 65_536, 69_999, 0, 65_537)]
    sample += [c for b in codes.values() for c in rng.choice(b, 40).tolist()] + [codes[fresh.id][0]]
    sample += [c[:4] + str((int(c[4]) + 1) % 10) + c[5:] for c in sample[:30]]         # typos
    sample += np.char.zfill(rng.integers(0, 10**10, 300).astype("U10"), 10).tolist() + ["", "x1"]
    later = NOW + timedelta(days=2)                                # the short batch has expired
    one = [club.codes.check(c, at=later) for c in sample]
    assert club.codes.check_array(sample, at=later).tolist() == [c.status for c in one]
    assert club.codes.check_many(sample, at=later) == one
    got = {s for s in (c.status for c in one)}
    assert got == set(CodeStatus), got                              # every status occurred


def test_junk_never_matches_the_code_whose_value_is_zero(club):
    """Malformed input parses to the value 0, and 0 is a real code's FF1 output: with that code's
    serial issued, junk must still check INVALID and redeem nothing."""
    s0 = club.codes._cipher(club.codes.key_version).decrypt_int(0)
    left = s0 + 1
    while left:                                       # issue serials up to and including s0
        n = min(left, 100_000_000)
        b = club.codes.generate(n, points=500)
        left -= n
    zero_code = "0000000000"
    assert club.codes.check(zero_code, at=NOW).status == CodeStatus.GENUINE   # 0 + its Damm digit 0
    junk = ["hello", "", "12", "ABCDEFGHIJ", "000000000", "0000000001"]
    want = [CodeStatus.INVALID] * 4 + [CodeStatus.TYPO] * 2
    assert [club.codes.check(j, at=NOW).status for j in junk] == want
    assert club.codes.check_array(junk, at=NOW).tolist() == want
    assert [c.status for c in club.codes.check_many(junk, at=NOW)] == want
    for shape in ("digits16", "base32"):
        assert (club.codes.check_array(junk, at=NOW, shape=shape) != CodeStatus.GENUINE).all()
    with pytest.raises(CodeError, match="INVALID"):
        club.codes.redeem("anna", "hello", at=NOW)
    assert club.codes.check(zero_code, at=NOW).status == CodeStatus.GENUINE
    assert club.codes.stats(b.id).redeemed == 0


def test_a_batch_generated_during_checks_does_not_shift_their_answers(club):
    gifts = club.codes.generate(50, points=1000, shape="base32")
    codes = gifts.codes()
    status, idx, serial, tab = club.codes._check_arrays(codes, NOW, "base32")
    club.codes.generate(10, points=1)                 # a pack batch sorts before the base-32 one
    assert [tab["batches"][i].id for i in idx.tolist()] == [gifts.id] * 50
    assert {c.batch for c in club.codes.check_many(codes, at=NOW, shape="base32")} == {gifts.id}


def test_forged_codes_pass_at_the_expected_rate(club):
    club.codes.generate(1_000_000, points=1)                       # one live code in a thousand serials
    rng = np.random.default_rng(5)
    guesses = np.char.zfill(rng.integers(0, 10**10, 200_000).astype("U10"), 10)
    st = club.codes.check_array(guesses, at=NOW)
    typo = (st == CodeStatus.TYPO).mean()
    live = (st == CodeStatus.GENUINE).sum()
    assert abs(typo - 0.9) < 0.005                                 # nine in ten fail the check digit
    expected = 200_000 * 0.1 * 1_000_000 / 10**9                   # 20
    assert abs(live - expected) < 5 * expected**0.5 + 1            # five standard deviations


def test_failed_attempts_are_limited(club):
    club.codes.generate(10, points=1)
    bad = "0000005724"    # a well-formed code that is not one of ours (check digit holds)
    for _ in range(5):
        with pytest.raises(CodeError, match="INVALID"):
            club.codes.redeem("anna", bad, at=NOW)
    with pytest.raises(TooManyAttemptsError, match="5/hour"):
        club.codes.redeem("anna", bad, at=NOW + timedelta(minutes=5))
    with pytest.raises(CodeError, match="TYPO"):     # typos do not count ...
        club.codes.redeem("bahram", "0000005725", at=NOW)
    with pytest.raises(CodeError, match="INVALID"):  # ... and other members are not affected
        club.codes.redeem("bahram", bad, at=NOW)
    with pytest.raises(CodeError, match="INVALID"):  # an hour later anna may try again
        club.codes.redeem("anna", bad, at=NOW + timedelta(minutes=61))


def test_bad_input_never_raises_from_deep_inside(club):
    club.codes.generate(10, points=1)
    for junk in ["", " ", "abcdefghij", "12345", "1" * 200, "۱۲۳-۴۵۶-۷۸۹۰", "\x00" * 10, "🙂" * 10]:
        assert club.codes.check(junk, at=NOW).status in (CodeStatus.TYPO, CodeStatus.INVALID)
    assert club.codes.check(12345, at=NOW).status == CodeStatus.INVALID   # type: ignore[arg-type]
    assert list(club.codes.check_array(["", "abc", None, 5], at=NOW)) == [CodeStatus.INVALID] * 4


def test_keys_come_from_bytes_a_file_or_the_environment(tmp_path, monkeypatch):
    f = tmp_path / "key.hex"
    f.write_text(KEY.hex())
    assert load_key(f) == KEY == load_key(KEY)
    monkeypatch.setenv("LOYALTY_ENGINE_CODE_KEY", KEY.hex())
    assert load_key(None) == KEY
    monkeypatch.delenv("LOYALTY_ENGINE_CODE_KEY")
    with pytest.raises(CodeError, match="no code key"):
        load_key(None)
    with pytest.raises(CodeError, match="16 to 64 bytes"):
        load_key(b"short")


def test_export_csv_and_printable_sheet(club, tmp_path):
    b = club.codes.generate(45, points=3, label="soap <lot 2>")
    n = club.codes.export(b.id, tmp_path / "codes.csv", svg=tmp_path / "codes.svg")
    lines = (tmp_path / "codes.csv").read_text().splitlines()
    assert n == 45 and len(lines) == 46 and lines[0].startswith("batch,serial,code,printed")
    assert lines[1].split(",")[2] == b.codes()[0]
    svg = (tmp_path / "codes.svg").read_text()
    assert "soap &lt;lot 2&gt;" in svg
    root = ET.fromstring(svg)                         # one well-formed SVG document, two A4 pages in it
    ns = "{http://www.w3.org/2000/svg}"
    pages = [g for g in root.iter(f"{ns}g") if g.get("class") == "page"]
    assert len(pages) == 2 and root.get("viewBox") == "0 0 210 594"
    qrs = [e for e in root.iter(f"{ns}path") if e.get("class") == "qr"]
    assert [q.get("data-text") for q in qrs] == b.codes().tolist()
    # the squares drawn are the QR symbol's dark modules (segno's matrix), in place
    for q, code in ((qrs[0], b.codes()[0]), (qrs[44], b.codes()[44])):
        matrix = segno.make(code, error="m", micro=False, boost_error=False).matrix
        xs = [float(v) for v in re.findall(r"M([0-9.]+) ", q.get("d"))]
        ys = [float(v) for v in re.findall(r"M[0-9.]+ ([0-9.]+)h", q.get("d"))]
        step = 20 / (len(matrix) + 4)
        drawn = {(round((y - 2) / step) - 2, round((x - 1) / step) - 2) for x, y in zip(xs, ys, strict=True)}
        assert drawn == {(r, c) for r, row in enumerate(matrix) for c, on in enumerate(row) if on}


# -- other shapes -----------------------------------------------------------------------------------------

def test_gift_card_and_base32_shapes_issue_check_and_redeem(club):
    pack = club.codes.generate(100, points=10)
    gift = club.codes.generate(2000, points=500, shape="digits16", label="gift card 50,000")
    disc = club.codes.generate(3000, points=200, shape="base32", label="one-time discount")
    g, d = gift.codes(), disc.codes()
    assert all(len(c) == 16 and c.isdigit() for c in g.tolist())
    assert all(len(c) == 13 and set(c[:12]) <= set(CROCKFORD) for c in d.tolist())
    assert len(set(g.tolist())) == 2000 and len(set(d.tolist())) == 3000
    assert (club.codes.check_array(g, at=NOW, shape="digits16") == CodeStatus.GENUINE).all()
    assert (club.codes.check_array(d, at=NOW, shape="base32") == CodeStatus.GENUINE).all()
    assert (club.codes.check_array(pack.codes(), at=NOW) == CodeStatus.GENUINE).all()
    c = club.codes.check(pretty(g[7], "digits16"), at=NOW)       # "1234 5678 9012 3456"
    assert (c.status, c.batch, c.serial, c.points) == (CodeStatus.GENUINE, gift.id, 7, 500)
    typed = d[11].lower().replace("0", "o").replace("1", "l")        # how people type base-32
    typed = "-".join(typed[k: k + 4] for k in range(0, 13, 4))
    c = club.codes.check(typed, at=NOW)
    assert (c.status, c.batch, c.serial) == (CodeStatus.GENUINE, disc.id, 11)
    r = club.codes.redeem("anna", typed, at=NOW)
    assert (r.code, r.points, r.batch) == (d[11], 200, disc.id)
    assert club.codes.check(d[11], at=NOW).status == CodeStatus.REDEEMED
    with pytest.raises(CodeError, match="REDEEMED"):
        club.codes.redeem("bahram", d[11], at=NOW)
    assert club.ledger.balance(points_account(0)).available == 200
    # a pack code's serial space is its own: serial 7 of the pack batch is another code
    assert club.codes.check(pack.codes()[7], at=NOW).batch == pack.id
    odds = club.codes.odds()["shapes"]
    assert odds["base32"]["per_guess_passing_check"] == pytest.approx(3000 / 2**60)
    assert odds["digits16"]["per_guess_passing_check"] == pytest.approx(2000 / 10**15)


def test_base32_check_symbol_catches_every_substitution_and_adjacent_transposition(club):
    codes = club.codes.generate(40, points=1, shape="base32").codes().tolist()
    gift = club.codes.generate(40, points=1, shape="digits16").codes().tolist()
    for code, shape, alphabet in [(c, "base32", CROCKFORD + "*~$=U") for c in codes] + \
            [(c, "digits16", "0123456789") for c in gift]:
        assert parse_shaped(code, shape)[1] == CodeStatus.GENUINE
        for pos in range(len(code)):
            for ch in alphabet:
                if ch != code[pos]:
                    assert parse_shaped(code[:pos] + ch + code[pos + 1:], shape)[1] == CodeStatus.TYPO
            if pos + 1 < len(code) and code[pos] != code[pos + 1]:
                swapped = code[:pos] + code[pos + 1] + code[pos] + code[pos + 2:]
                assert parse_shaped(swapped, shape)[1] == CodeStatus.TYPO
    assert parse_shaped(codes[0][:-1], "base32")[1] == CodeStatus.TYPO           # one symbol short
    assert parse_shaped(codes[0][:5] + "!" + codes[0][6:], "base32")[1] == CodeStatus.INVALID
    assert club.codes.check("", at=NOW).status == CodeStatus.INVALID
    with pytest.raises(ValidationError, match="shape='hex' is not one of"):
        club.codes.generate(5, points=1, shape="hex")


def test_shapes_survive_reopening_and_pack_codes_keep_their_form(tmp_path):
    prog = Program.from_dict({"name": "shop"})
    with Engine.open(tmp_path / "c", program=prog, sync="none", code_key=KEY) as e:
        pack = e.codes.generate(45, points=3)
        disc = e.codes.generate(10, points=5, shape="base32")
        first = pack.codes()[:2].tolist(), disc.codes().tolist()
    # the first pack codes of program "shop" under this key, as printed before other shapes existed
    assert first[0] == ["0189456256", "3911521370"]
    with Engine.open(tmp_path / "c", program=prog, sync="none", code_key=KEY) as e:
        assert [(b.shape, b.count) for b in e.codes.batches()] == [("pack", 45), ("base32", 10)]
        assert e.codes.batch(disc.id).codes().tolist() == first[1]
        assert (e.codes.check_array(first[1], at=NOW, shape="base32") == CodeStatus.GENUINE).all()
        more = e.codes.generate(5, points=5, shape="base32")
        assert more.first_serial == 10


def _redeem_in_child(path: str, code: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    # one process, one engine: while the other child's engine holds the club, Engine.open is refused; wait
    deadline = time.monotonic() + 60
    while True:
        try:
            e = Engine.open(path, program=Program.from_dict({"name": "shop"}), sync="none", code_key=KEY)
            break
        except StorageError as exc:
            if "already open in an Engine" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    with e:
        try:
            e.codes.redeem("anna", code, at=NOW)
            out.put("ok")
        except CodeError as exc:
            out.put(str(exc))


def test_two_processes_redeeming_one_code_give_one_success(tmp_path: Path):
    path = tmp_path / "club"
    with Engine.open(path, program=Program.from_dict({"name": "shop"}), sync="none", code_key=KEY) as e:
        e.enroll("anna", at=NOW)
        codes = e.codes.generate(20, points=10).codes()
    ctx = mp.get_context("spawn")
    for code in codes[:4].tolist():
        q = ctx.Queue()
        procs = [ctx.Process(target=_redeem_in_child, args=(str(path), code, q)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        answers = sorted(q.get(timeout=10) for _ in procs)
        assert answers[1] == "ok" and "REDEEMED" in answers[0], answers
    with Engine.open(path, program=Program.from_dict({"name": "shop"}), sync="none", code_key=KEY) as e:
        assert e.ledger.balance(points_account(0)).available == 40
        assert e.codes.stats(1).redeemed == 4
        assert e.ledger.verify().ok


def test_codes_need_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("LOYALTY_ENGINE_CODE_KEY", raising=False)
    with Engine.open(tmp_path / "c", program=Program.from_dict({}), sync="none") as e, \
            pytest.raises(CodeError, match="no code key"):
        e.codes.generate(1, points=1)
    assert os.environ.get("LOYALTY_ENGINE_CODE_KEY") is None
